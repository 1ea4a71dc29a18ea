"""Runtime benchmark: pipeline efficiency, activation move cost, socket vs RPC.

1. Two-stage resnet18 and mobilenet_v2 plans on two local workers (loopback, one core each):
   measured throughput against the bound ``1000 / slowest stage compute_ms``, the compute being
   the mean measured in the same throughput run (and, for reference, the latency phase median).
2. Moving one activation (1x64x56x56 and 8x64x56x56 float32) between two processes on loopback:
   our frames (``wire.send_frame``/``recv_frame``), a plain socket copy (8-byte length +
   ``sendall``, ``recv_into`` a preallocated buffer) and length-prefixed pickle; each is a round
   trip of the payload and a 1-byte acknowledgement, median over many.
3. Socket vs RPC on the same plans: latency and throughput ratios.

Run: ``.venv/bin/python bench/runtime.py [--requests N] [--moves N]``; writes
``bench/results/runtime.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pickle
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds scripts named like standard modules (profile.py): keep it off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

MODELS = {"resnet18": 6, "mobilenet_v2": 8}  # fallback cuts when no host profile exists
SHAPES = ((1, 64, 56, 56), (8, 64, 56, 56))


def balanced_cut(model: str, fallback: int) -> int:
    """The cut that best balances the two stages according to the shipped host profile."""
    from optisplit.profile import load_profile, profile_path

    path = profile_path(ROOT / "profiles", "host", model, 1)
    if not path.exists():
        return fallback
    times = [b.time_ms for b in load_profile(path).blocks]
    total = sum(times)
    return min(range(1, len(times)), key=lambda c: max(sum(times[:c]), total - sum(times[:c])))


# -- 1 and 3: pipelines ---------------------------------------------------------------------


def _testbed() -> Any:
    from optisplit.testbed import parse_testbed

    return parse_testbed(
        {
            "schema_version": 1,
            "name": "bench",
            "source": "a",
            "devices": {"a": {"cores": [0]}, "b": {"cores": [1]}},
            "links": [{"between": ["a", "b"], "rtt_ms": 0.2, "mbps": 1000}],
        }
    )


def run_pipelines(requests: int) -> list[dict[str, Any]]:
    import torch

    from optisplit.plan import Plan
    from optisplit.runtime.base import ModelSpec
    from optisplit.runtime.launcher import LocalWorkers
    from optisplit.runtime.measure import measure
    from optisplit.runtime.rpc_backend import RpcBackend
    from optisplit.runtime.socket_backend import SocketBackend
    from optisplit.validate import _reference, plan_placements

    torch.set_num_threads(1)
    testbed = _testbed()
    rows = []
    with LocalWorkers(testbed, ["a", "b"]) as workers:
        for model, fallback in MODELS.items():
            spec = ModelSpec(model)
            inputs, expected, n_blocks = _reference(spec)
            cut = balanced_cut(model, fallback)
            plan = Plan.parse(f"a[0:{cut}] -> b[{cut}:{n_blocks}]")
            stages = plan_placements(plan, testbed, workers.start())
            for backend in (SocketBackend(workers.token), RpcBackend(workers.token)):
                with backend.deploy(spec, stages) as deployment:
                    m = measure(deployment, inputs, expected, requests=requests, warmup=5, depth=4)
                rows.append(_pipeline_row(model, str(plan), backend.name, m))
    return rows


def _pipeline_row(model: str, plan: str, backend: str, m: Any) -> dict[str, Any]:
    tput_rows = [r for r in m.rows if r[1] == "throughput"]
    # the mean, not the median: a stage's rate is set by its mean service time
    compute_tput = [
        statistics.fmean((r[4 + 4 * i + 2] - r[4 + 4 * i + 1]) * 1e3 for r in tput_rows)
        for i in range(len(m.devices))
    ]
    compute_lat = [s["compute_ms"] for s in m.stages]
    bound = 1e3 / max(compute_tput)
    return {
        "model": model,
        "plan": plan,
        "backend": backend,
        "latency_ms": m.latency_ms,
        "latency_p95_ms": m.latency_p95_ms,
        "throughput_rps": m.throughput_rps,
        "stage_compute_ms_throughput_phase": compute_tput,
        "stage_compute_ms_latency_phase": compute_lat,
        "bound_rps": bound,
        "efficiency": m.throughput_rps / bound,
        "efficiency_vs_latency_phase_compute": m.throughput_rps * max(compute_lat) / 1e3,
        "hop_ms": [t["ms"] for t in m.transfers],
        "outputs_match": m.outputs_match,
        "cpu_percent": [s["cpu_percent"] for s in m.stages],
    }


# -- 2: moving one activation ---------------------------------------------------------------


def _echo_server(method: str, port_queue: Any, shape: tuple[int, ...], count: int) -> None:
    import torch

    from optisplit.runtime import wire

    torch.set_num_threads(1)
    if method == "optisplit":  # as configured in every worker process
        from optisplit.runtime.stage import tune_allocator

        tune_allocator()
    server = socket.create_server(("127.0.0.1", 0))
    port_queue.put(server.getsockname()[1])
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    nbytes = 4 * int(torch.Size(shape).numel())
    buf = bytearray(nbytes)
    view = memoryview(buf)
    for _ in range(count):
        if method == "optisplit":
            frame = wire.recv_frame(conn, idle_timeout=30.0)
            assert frame is not None and frame.tensors[0].shape == shape
        else:
            (length,) = struct.unpack("!Q", _recv_exact(conn, memoryview(bytearray(8))))
            target = view[:length] if method == "plain" else memoryview(bytearray(length))
            _recv_exact(conn, target)
            if method == "pickle":
                obj = pickle.loads(target)
                assert obj["tensor"].shape == shape
        conn.sendall(b"k")
    conn.close()


def _recv_exact(conn: socket.socket, view: memoryview) -> memoryview:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:], len(view) - got)
        if n == 0:
            raise ConnectionError("closed")
        got += n
    return view


def move_cost(method: str, shape: tuple[int, ...], count: int) -> float:
    """Median round trip (payload there, 1 byte back) in ms."""
    import torch

    from optisplit.runtime import wire

    ports: Any = mp.Queue()
    server = mp.Process(target=_echo_server, args=(method, ports, shape, count))
    server.start()
    sock = socket.create_connection(("127.0.0.1", ports.get(timeout=60)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tensor = torch.randn(shape)
    raw = memoryview(tensor.numpy()).cast("B")
    ack = bytearray(1)
    times = []
    for _ in range(count):
        begin = time.perf_counter()
        if method == "optisplit":
            wire.send_frame(sock, wire.Kind.DATA, 1, [tensor])
        elif method == "plain":
            sock.sendall(struct.pack("!Q", len(raw)))
            sock.sendall(raw)
        else:
            data = pickle.dumps({"tensor": tensor, "id": 1})
            sock.sendall(struct.pack("!Q", len(data)) + data)
        sock.recv_into(ack, 1)
        times.append((time.perf_counter() - begin) * 1e3)
    sock.close()
    server.join(timeout=30)
    return statistics.median(times[count // 10 :])


def run_moves(count: int) -> list[dict[str, Any]]:
    rows = []
    for shape in SHAPES:
        costs = {m: move_cost(m, shape, count) for m in ("plain", "optisplit", "pickle")}
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "bytes": 4 * int(__import__("math").prod(shape)),
                "plain_ms": costs["plain"],
                "optisplit_ms": costs["optisplit"],
                "pickle_ms": costs["pickle"],
                "optisplit_over_plain": costs["optisplit"] / costs["plain"],
                "pickle_over_optisplit": costs["pickle"] / costs["optisplit"],
            }
        )
    return rows


def _ratios(pipelines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for model in MODELS:
        by = {r["backend"]: r for r in pipelines if r["model"] == model}
        sock, rpc = by["socket"], by["rpc"]
        out.append(
            {
                "model": model,
                "plan": sock["plan"],
                "socket_latency_ms": sock["latency_ms"],
                "rpc_latency_ms": rpc["latency_ms"],
                "latency_reduction_pct": 100 * (1 - sock["latency_ms"] / rpc["latency_ms"]),
                "socket_rps": sock["throughput_rps"],
                "rpc_rps": rpc["throughput_rps"],
                "throughput_gain_pct": 100 * (sock["throughput_rps"] / rpc["throughput_rps"] - 1),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--moves", type=int, default=200)
    args = parser.parse_args()
    from optisplit.cli._common import print_table

    moves = run_moves(args.moves)
    print_table(
        ["shape", "bytes", "plain ms", "optisplit ms", "pickle ms", "ours/plain", "pickle/ours"],
        [list(r.values()) for r in moves],
        title="moving one activation between two processes (loopback round trip)",
    )
    pipelines = run_pipelines(args.requests)
    print_table(
        ["model", "plan", "backend", "p50 ms", "req/s", "bound req/s", "efficiency", "outputs ok"],
        [
            [
                r["model"],
                r["plan"],
                r["backend"],
                r["latency_ms"],
                r["throughput_rps"],
                r["bound_rps"],
                r["efficiency"],
                r["outputs_match"],
            ]
            for r in pipelines
        ],
        title="two-stage pipelines on two local workers (one core each)",
    )
    ratios = _ratios(pipelines)
    print_table(
        ["model", "socket ms", "rpc ms", "latency -%", "socket req/s", "rpc req/s", "tput +%"],
        [[r[k] for k in r if k != "plan"] for r in ratios],
        title="socket vs rpc on the same plans",
    )
    out = ROOT / "bench" / "results" / "runtime.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"moves": moves, "pipelines": pipelines, "socket_vs_rpc": ratios}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
