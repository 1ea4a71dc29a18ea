"""Faults: hostile connections never stop a worker; a killed worker fails one plan, not the run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_runtime_contract import FACTORY, ROOT, reference, tiny_testbed

from optisplit.errors import RuntimeFailure
from optisplit.runtime import wire
from optisplit.runtime.base import ModelSpec, StagePlacement
from optisplit.runtime.measure import measure
from optisplit.runtime.socket_backend import SocketBackend
from optisplit.runtime.wire import DESCRIPTOR, MAGIC, PREFIX, Kind
from optisplit.runtime.worker import Worker
from optisplit.validate import validate_plans

TOKEN = b"fuzz-token"


@pytest.fixture
def served() -> Iterator[list[Worker]]:
    workers = [Worker("127.0.0.1", 0, TOKEN) for _ in range(2)]
    for worker in workers:
        threading.Thread(target=worker.serve_forever, daemon=True).start()
    yield workers
    for worker in workers:
        worker.shutdown()


def _frame(kind: int = Kind.HELLO, n: int = 0, stamps: int = 0, body: bytes = b"") -> bytes:
    return PREFIX.pack(MAGIC, wire.VERSION, kind, n, 7, stamps, len(body)) + body


def _hostile_payloads(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    hello = _frame(body=b"n" * wire.NONCE_BYTES + b"control")
    huge_tensor = DESCRIPTOR.pack(1, 2, 1 << 40, 1 << 20, 1 << 20, *[0] * 6)
    while True:
        yield "garbage", rng.randbytes(rng.randint(1, 300))
        yield "garbage after magic", MAGIC + rng.randbytes(rng.randint(0, 300))
        yield "truncated", hello[: rng.randint(1, len(hello) - 1)]
        yield "oversized body", _frame(body=b"")[:-4] + (1 << 31).to_bytes(4, "big")
        yield "too many tensors", _frame(n=rng.randint(65, 65535))
        yield "too many stamps", _frame(stamps=rng.randint(5000, 1 << 30))
        yield "oversized tensor", _frame(kind=Kind.DATA, n=1) + huge_tensor
        yield "wrong kind first", _frame(kind=rng.choice([Kind.DATA, Kind.DEPLOY, 99]))


def _send_and_wait_close(address: tuple[str, int], payload: bytes) -> None:
    # the worker may drop the connection before reading everything: a reset is a rejection too
    with socket.create_connection(address, timeout=10.0) as sock, contextlib.suppress(OSError):
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


def _wrong_token(address: tuple[str, int], rng: random.Random) -> None:
    with socket.create_connection(address, timeout=10.0) as sock:
        wire.send_frame(sock, Kind.HELLO, body=rng.randbytes(wire.NONCE_BYTES) + b"control")
        challenge = wire.recv_frame(sock, idle_timeout=5.0)
        assert challenge is not None and challenge.kind == Kind.CHALLENGE
        wire.send_frame(sock, Kind.AUTH, body=rng.randbytes(32))
        assert wire.recv_frame(sock, idle_timeout=5.0, eof_ok=True) is None


def _bad_control(address: tuple[str, int], rng: random.Random) -> None:
    sock = wire.connect(address, TOKEN, "control")
    with sock:
        body = rng.choice(
            [
                b"not json",
                b"[1, 2]",
                json.dumps({"backend": "socket", "spec": {"model": 3}}).encode(),
                json.dumps({"backend": "ftp", "spec": {"model": "tiny"}}).encode(),
                json.dumps(
                    {"backend": "socket", "spec": {"model": "tiny"}, "stage": "x"}
                ).encode(),
            ]
        )
        wire.send_frame(sock, Kind.DEPLOY, body=body)
        reply = wire.recv_frame(sock, idle_timeout=10.0, eof_ok=True)
        assert reply is None or reply.kind == Kind.ERROR


def test_fuzzed_worker_logs_rejects_and_keeps_serving(
    served: list[Worker], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="optisplit.runtime.worker")
    target, other = served
    rng = random.Random(7)
    payloads = _hostile_payloads(rng)
    sent = 0
    for _ in range(1000):
        _, payload = next(payloads)
        _send_and_wait_close(target.address, payload)
        sent += 1
    for _ in range(60):
        _wrong_token(target.address, rng)
        _bad_control(target.address, rng)
        sent += 2
    assert sent >= 1000
    assert target.rejected >= 1060
    rejections = [r for r in caplog.records if "rejected connection" in r.getMessage()]
    assert len(rejections) >= 1060
    reasons = " ".join(r.getMessage() for r in rejections)
    for reason in ("exceed", "connection closed", "HMAC mismatch"):
        assert reason in reasons
    assert "bad magic" in reasons or "not a probe client" in reasons

    # the fuzzed worker still deploys and serves a normal request
    os.chdir(ROOT)
    inputs, expected = reference(batch=1)
    stages = [
        StagePlacement("a", 0, 3, target.address),
        StagePlacement("b", 3, 6, other.address),
    ]
    spec = ModelSpec("tiny", module=FACTORY)
    with SocketBackend(TOKEN).deploy(spec, stages) as deployment:
        result = measure(deployment, inputs, expected, requests=2, warmup=0, depth=2)
    assert result.outputs_match


def test_link_probes_are_answered_on_the_worker_port(served: list[Worker]) -> None:
    from optisplit.probe import ProbeError, probe_link

    host, port = served[0].address
    link = probe_link(host, port, token=TOKEN, rtt_samples=5, bulk_bytes=1 << 20)
    assert link.rtt_ms > 0
    with pytest.raises(ProbeError):
        probe_link(host, port, token=b"wrong", rtt_samples=2, bulk_bytes=1 << 16)
    deadline = time.monotonic() + 5.0
    while served[0].rejected < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served[0].rejected == 1


def test_a_second_orchestrator_is_refused_while_one_deploys(served: list[Worker]) -> None:
    target = served[0]
    os.chdir(ROOT)
    spec = ModelSpec("tiny", module=FACTORY)
    stages = [StagePlacement("a", 0, 6, target.address)]
    with SocketBackend(TOKEN).deploy(spec, stages):
        intruder = wire.connect(target.address, TOKEN, "control")
        doc = {"backend": "socket", "spec": spec.to_dict(), "stage": 0, "start": 0, "end": 6}
        wire.send_control(
            intruder, Kind.DEPLOY, {**doc, "next": {"address": ["127.0.0.1", 1], "stage": 0}}
        )
        with pytest.raises(wire.FrameError, match="busy"):
            wire.expect(intruder, Kind.READY, timeout=10.0)
        intruder.close()


def _worker_children() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "worker" in " ".join(p.cmdline()) and p.is_running()
    ]


PLANS = ["d0[0:3] -> d1[3:6]", "d1[0:6]", "d0[0:6]"]


@pytest.mark.slow
def test_killed_worker_fails_one_plan_keeps_results_and_resume_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    killed: list[int] = []

    def kill_during_second_plan(plan: str, phase: str, done: int, total: int) -> None:
        if plan == PLANS[1] and phase == "latency" and done == 1 and not killed:
            victim = _worker_children()[0]
            killed.append(victim.pid)
            os.kill(victim.pid, signal.SIGKILL)

    common = {
        "backend": "socket",
        "requests": 4,
        "warmup": 1,
        "module": FACTORY,
        "out_dir": tmp_path,
    }
    results = validate_plans(
        "tiny", tiny_testbed(2), PLANS, on_progress=kill_during_second_plan, **common
    )
    assert killed
    ok0, failed, ok2 = results
    assert ok0["error"] is None and ok0["outputs_match"] is True
    assert ok2["error"] is None and ok2["outputs_match"] is True  # the dead worker was restarted
    assert failed["measured"] is None
    assert "died or was killed" in failed["error"] or "closed" in failed["error"]
    saved = json.loads((tmp_path / "validate-socket.json").read_text())
    assert [r["plan"] for r in saved["results"]] == PLANS
    assert saved["results"][1]["error"] == failed["error"]
    assert len(list(tmp_path.glob("timestamps-socket-*.csv"))) == 2
    assert _worker_children() == []  # no orphans

    again = validate_plans("tiny", tiny_testbed(2), PLANS, resume=True, **common)
    assert [r.get("resumed", False) for r in again] == [True, False, True]
    assert again[1]["error"] is None and again[1]["outputs_match"] is True
    assert again[0]["measured"] == ok0["measured"]
    assert _worker_children() == []


@pytest.mark.slow
def test_ctrl_c_stops_every_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)

    def interrupt(plan: str, phase: str, done: int, total: int) -> None:
        if phase == "latency":
            assert len(_worker_children()) == 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        validate_plans(
            "tiny",
            tiny_testbed(2),
            PLANS[:1],
            backend="socket",
            module=FACTORY,
            out_dir=tmp_path,
            on_progress=interrupt,
        )
    assert _worker_children() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "nohost", "--token-file", "TOKEN"], "expected HOST:PORT"),
        (["--token-file", "missing-token-file"], "cannot read token file"),
        (["--token-file", "EMPTY"], "is empty"),
    ],
)
def test_worker_usage_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    import subprocess
    import sys

    (tmp_path / "TOKEN").write_text("t")
    (tmp_path / "EMPTY").write_text("  \n")
    out = subprocess.run(
        [sys.executable, "-m", "optisplit", "worker", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["socket", "rpc"])
def test_killed_worker_fails_the_deployment_with_its_name(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optisplit.runtime import backend_class
    from optisplit.runtime.launcher import LocalWorkers

    monkeypatch.chdir(ROOT)
    inputs, expected = reference(batch=1)
    spec = ModelSpec("tiny", module=FACTORY)
    with LocalWorkers(tiny_testbed(2), ["d0", "d1"]) as workers:
        stages = [
            StagePlacement("d0", 0, 3, workers.addresses["d0"]),
            StagePlacement("d1", 3, 6, workers.addresses["d1"]),
        ]
        deployment = backend_class(backend)(workers.token).deploy(spec, stages)
        measure(deployment, inputs, expected, requests=2, warmup=0, depth=2)
        os.kill(workers.procs["d1"].pid, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(RuntimeFailure, match=r"worker d1 .*(died or was killed|closed)"):
            measure(deployment, inputs, expected, requests=2, warmup=0, depth=2, timeout_s=60)
        deployment.close()
        assert time.monotonic() - began < 60
        assert workers.procs["d1"].wait(timeout=10) == -signal.SIGKILL
        assert workers.dead() == ["d1"]
    assert _worker_children() == [] and not [
        p
        for p in psutil.Process().children(recursive=True)
        if "rpc_backend" in " ".join(p.cmdline())
    ]
