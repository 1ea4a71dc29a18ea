"""The runtime's CPU time per request against the time between requests, on an emulated testbed.

``optisplit calibrate`` reads the runtime's CPU costs on a shared host (``request_cpu_ms``,
``client_ms``, ``forward_ms``) from a probe model streaming through the testbed. What a process
spends on a request grows with how long it slept before it (caches and the CPU's idle state
to leave), so the probe's period decides what they read. This script deploys the whole probe on
the testbed's second device (the source relays its input and output), for probes of ``--layers``
convolutions (periods from about 7 to 27 ms on this host), each ``--rounds`` times per backend,
taking turns, and reads what each process spent per request: the source's relay, the client and
the delay forwarder (the client's share is what the helper cores' busy time leaves after the
other two, as ``calibrate`` reads it).

Run with the testbed up under ``lan`` (``optisplit testbed up local --condition lan``):
``.venv/bin/python bench/wakeups.py [--testbed local] [--layers 16,24,32,48,64] [--rounds 2]
[--backends socket,rpc]``; prints a table and writes ``bench/results/wakeups.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its scripts would shadow modules (profile)

LAYERS = (16, 24, 32, 48, 64)


def probe(layers: int) -> Any:
    """The calibration probe's convolutions without its gates (``hidden=0``), as the README's
    table was measured: the periods below are theirs."""
    from optisplit.calibrate import probe_model

    return probe_model(layers=layers, hidden=0)


# model factories for the workers (``module:function``, no arguments)
for _n in LAYERS:
    globals()[f"probe_{_n}"] = lambda n=_n: probe(n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="local")
    parser.add_argument("--layers", default=",".join(map(str, LAYERS)))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backends", default="socket,rpc")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "wakeups.json"))
    args = parser.parse_args()

    from optisplit import emulate
    from optisplit.testbed import load_testbed

    testbed = load_testbed(args.testbed)
    if not emulate.is_up(testbed):
        print(f"testbed {testbed.name} is not up: optisplit testbed up {testbed.name}")
        return 2
    layers = [int(n) for n in args.layers.split(",")]
    unknown = sorted(set(layers) - set(LAYERS))
    if unknown:
        print(f"--layers: only {', '.join(map(str, LAYERS))} (got {unknown})")
        return 2
    rows = []
    for backend in args.backends.split(","):
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in layers}
        for _ in range(args.rounds):  # the probes take turns: a slow spell spreads over all
            for n in layers:
                runs[n].append(_run(testbed, backend, n))
        for n in layers:
            row = {"backend": backend, "layers": n}
            row.update({k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]})
            row["runs"] = runs[n]
            rows.append(row)
    keys = ("period_ms", "relay_ms", "client_ms", "forwarder_ms", "helpers_ms")
    head = f"{'backend':8}{'layers':>7}" + "".join(f"{k[:-3] + ' ms':>14}" for k in keys)
    print(head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['backend']:8}{row['layers']:>7}" + "".join(f"{row[k]:14.2f}" for k in keys))
    doc = {"testbed": testbed.name, "rounds": args.rounds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _run(testbed: Any, backend: str, layers: int) -> dict[str, float]:
    """Deploy the whole probe on the testbed's second device once; its CPU per request."""
    factory = f"bench.wakeups:probe_{layers}"
    measured = deploy_probe_plan(testbed, backend, "probe", factory)
    return {"period_ms": 1000.0 / measured["throughput_rps"], **helper_figures(testbed, measured)}


def deploy_probe_plan(
    testbed: Any,
    backend: str,
    model: str,
    factory: str | None,
    *,
    warmup: int = 2,
    window_s: float = 2.0,
    split: float = 0.0,
) -> dict[str, Any]:
    """Deploy ``model`` once, 8 requests in flight, and return its measurement: whole on the
    testbed's second device (the source relays its input and output), or with ``split`` > 0
    split there, the source running the first ``split`` of the blocks (at least one) and the
    second device the rest."""
    from optisplit.chain import load_chain

    blocks = load_chain(model, module=factory).n_blocks
    source = testbed.source
    other = next(d for d in testbed.devices if d != source)
    plan = f"{other}[0:{blocks}]"
    if split > 0:
        cut = min(max(round(split * blocks), 1), blocks - 1)
        plan = f"{source}[0:{cut}] -> {other}[{cut}:{blocks}]"
    return measure_plan(
        testbed, backend, model, plan, factory, requests=40, warmup=warmup, depth=8,
        window_s=window_s,
    )  # fmt: skip


def measure_plan(
    testbed: Any,
    backend: str,
    model: str,
    plan: str,
    factory: str | None = None,
    *,
    requests: int = 20,
    warmup: int = 3,
    depth: int | None = None,
    window_s: float = 2.0,
) -> dict[str, Any]:
    """Deploy ``plan`` once (no profiles: nothing predicted) and return its measurement;
    exits with the plan's error when it failed."""
    from optisplit.validate import validate_plans

    with tempfile.TemporaryDirectory(prefix="optisplit-bench-") as out:
        (result,) = validate_plans(
            model,
            testbed,
            [plan],
            backend=backend,
            requests=requests,
            warmup=warmup,
            depth=depth,
            window_s=window_s,
            module=factory,
            out_dir=out,
            profiles_root=out,
        )
    if not result["measured"]:
        raise SystemExit(f"{backend} {model} {plan} failed: {result['error']}")
    measured: dict[str, Any] = result["measured"]
    return measured


def helper_figures(testbed: Any, measured: dict[str, Any]) -> dict[str, float]:
    """CPU ms per request of the source's relay, the client, the delay forwarder and the helper
    cores in all (the client's is what the helper cores' busy time leaves after the other two,
    as ``calibrate`` reads it)."""
    from optisplit import emulate

    host = measured["host"]
    source = testbed.source
    helpers = emulate.helper_cores(testbed) or ()
    busy = sum(host["cores_ms"].get(str(c), 0.0) for c in helpers)
    relay = host["devices_ms"].get(source, 0.0)
    forwarder = host["watched_ms"].get("forwarder", 0.0)
    pinned = testbed.devices[source].cores or ()
    on_helpers = sum(1 for c in pinned if c in helpers) / max(len(pinned), 1)
    return {
        "relay_ms": relay,
        "client_ms": busy - relay * on_helpers - forwarder,
        "forwarder_ms": forwarder,
        "helpers_ms": busy,
    }


if __name__ == "__main__":
    sys.exit(main())
