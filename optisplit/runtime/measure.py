"""Measuring a live deployment: latency, throughput, correctness, per-request timestamps.

Definitions (DESIGN §5):

- **latency**: one request in flight; from ``submit`` at the source to ``receive`` at the sink on
  the orchestrator's monotonic clock; p50 and p95 over ``requests`` after ``warmup``.
- **throughput**: closed loop with ``depth`` requests in flight; completions per second over the
  steady window, which opens when the last warm-up request completes and closes with the last.
  The window holds at least ``requests`` completions and, with ``window_s``, lasts at least that
  many seconds (new requests are sent until it has; those in flight then complete): a handful of
  requests spans a fraction of a second, and one hiccup of the host then decides the figure.
- **correctness**: every output of every request is compared with the single-process model's
  output for the same input (``allclose``, rtol 1e-4, atol 1e-4 × the largest magnitude).
- **per-stage compute** is the median of ``compute end - compute start`` on the stage's own clock
  (latency phase), and ``streaming_compute_ms`` the same in the throughput phase, where the
  stage shares its device's core with the pipeline's other work; **hop times** are
  ``receive(i+1) - send(i)`` and need one clock, so they are reported only when every stage
  runs on the orchestrator's host (``Deployment.same_clock``).
- **queue time** (``queue_ms``): per request, the time it spent inside the deployed stages
  (relays included) outside their compute, from a stage's receiving its input to its compute's
  start and from its compute's end to its sending the output (hand-offs between a worker's
  receiving, computing and sending threads); the median over the latency phase. Each stage's
  four stamps come from its own clock, so it is reported on any testbed.
- **CPU per request** (``host``) over the throughput phase, its warm-up included, divided by the
  requests it completed: ``devices_ms`` per device (its worker's process CPU time, stages and
  relays; empty in process), ``watched_ms`` per named process (``watch``: e.g. the delay
  forwarder), ``cores_ms`` per core of this host (``/proc/stat``: everything that ran there,
  the client and any other process included; empty where there is no ``/proc/stat``), and
  ``busiest_core``: the busiest of the ``spare_cores`` (where the host's own work runs beside
  the devices) and its utilisation at the measured throughput (near 1: the host, not only the
  plan, set the pace). Clock ticks are 10 ms, so these need a phase of a few hundred requests
  or a few seconds to read well.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optisplit.errors import RuntimeFailure
from optisplit.runtime.base import STAMPS_PER_STAGE, Deployment, Reply

if TYPE_CHECKING:
    import torch

__all__ = ["Measurement", "measure", "merge_rounds", "stamp_columns"]

_PHASE, _SENT = 1, 3
"""Columns of a timestamp row: the phase, the time the request was sent (:func:`stamp_columns`)."""

OnRequest = Callable[[str, int, int], None]
"""Called after each completed request with (phase, done, total)."""


@dataclass
class Measurement:
    """What one plan did on a live deployment (the ``measured`` object of ``validate``)."""

    latency_ms: float
    latency_p95_ms: float
    throughput_rps: float
    items_per_s: float
    requests: int
    outputs_match: bool
    max_abs_diff: float
    stages: list[dict[str, Any]]
    transfers: list[dict[str, Any]]
    devices: list[str] = field(default_factory=list)
    """Devices of the deployed stages in timestamp order (relays included)."""
    rows: list[list[Any]] = field(default_factory=list, repr=False)
    """Timestamp rows (see :func:`stamp_columns`), every round's in order."""
    rounds: list[dict[str, float]] = field(default_factory=list)
    """Each round's ``latency_ms`` and ``throughput_rps`` (empty for a single measurement)."""
    host: dict[str, Any] = field(default_factory=dict)
    """CPU per request over the throughput phase (see the module docstring)."""
    queue_ms: float | None = None
    """Time per request inside the stages outside their compute (see the module docstring)."""

    def to_dict(self) -> dict[str, Any]:
        out = {
            "latency_ms": self.latency_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "throughput_rps": self.throughput_rps,
            "items_per_s": self.items_per_s,
            "requests": self.requests,
            "stages": self.stages,
            "transfers": self.transfers,
            "queue_ms": self.queue_ms,
            "host": self.host,
        }
        if self.rounds:
            out["rounds"] = self.rounds
        return out

    def latencies_ms(self) -> list[float]:
        """Latency-phase request latencies, in milliseconds, sorted."""
        return _latencies_ms(r for r in self.rows if r[_PHASE] == "latency")


def stamp_columns(devices: Sequence[str]) -> list[str]:
    """CSV header of the timestamp rows: round, phase, request id, sent, per-stage stamps,
    received (times in seconds)."""
    per_stage = ("recv", "compute_start", "compute_end", "send")
    cols = ["round", "phase", "request_id", "sent"]
    for i, device in enumerate(devices):
        cols += [f"s{i}_{device}_{name}" for name in per_stage]
    return [*cols, "received"]


class _Checker:
    def __init__(self, expected: Sequence[Sequence[torch.Tensor]] | None) -> None:
        self.expected = expected
        self.match = True
        self.max_abs_diff = 0.0

    def check(self, reply: Reply, index: int) -> None:
        if self.expected is None:
            return
        import torch

        want = self.expected[index % len(self.expected)]
        if len(want) != len(reply.outputs):
            self.match = False
            return
        for got, ref in zip(reply.outputs, want):
            if got.shape != ref.shape or got.dtype != ref.dtype:
                self.match = False
                continue
            diff = float((got.float() - ref.float()).abs().max()) if ref.numel() else 0.0
            self.max_abs_diff = max(self.max_abs_diff, diff)
            scale = float(ref.float().abs().max()) if ref.numel() else 1.0
            if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * max(scale, 1.0)):
                self.match = False


def measure(
    deployment: Deployment,
    inputs: Sequence[Sequence[torch.Tensor]],
    expected: Sequence[Sequence[torch.Tensor]] | None,
    *,
    requests: int = 20,
    warmup: int = 3,
    depth: int | None = None,
    batch_size: int = 1,
    timeout_s: float = 120.0,
    source: str = "source",
    sink: str = "sink",
    on_request: OnRequest | None = None,
    round_: int = 1,
    window_s: float = 0.0,
    watch: Mapping[str, int] | None = None,
    spare_cores: Iterable[int] | None = None,
) -> Measurement:
    """Run the latency phase then the throughput phase on ``deployment``.

    Args:
        inputs: request inputs, used in turn (request i gets ``inputs[i % len]``).
        expected: the single-process outputs for ``inputs`` (None: not checked).
        depth: requests in flight in the throughput phase (default 2 × stages).
        source, sink: device names for the first and last hop in ``transfers``.
        round_: the round number written in the timestamp rows.
        window_s: the throughput phase's steady window lasts at least this many seconds.
        watch: processes (name -> pid) whose CPU time per request to report in ``host``.
        spare_cores: the cores ``host.busiest_core`` looks at (default: all): those where the
            host's own work runs beside the devices, whose filling up means the host, not the
            plan, set the pace (a device's own core fills when the device is the bottleneck).

    Raises:
        RuntimeFailure: a stage failed or a reply did not come within ``timeout_s``.
    """
    if requests < 1:
        raise RuntimeFailure(f"requests must be >= 1, got {requests}")
    if not window_s >= 0:
        raise RuntimeFailure(f"window_s must be >= 0, got {window_s}")
    depth = depth or 2 * len(deployment.stages)
    checker = _Checker(expected)
    deployment.reset_stats()
    lat_rows = _latency_phase(
        deployment, inputs, checker, requests, warmup, timeout_s, on_request, round_
    )
    stats = deployment.stats()
    tput_requests = max(requests, 2 * depth)
    deployment.reset_stats()
    before = _cpu_snapshot(watch or {})
    tput_rows, rps = _throughput_phase(
        deployment,
        inputs,
        checker,
        tput_requests,
        warmup,
        depth,
        timeout_s,
        on_request,
        round_,
        window_s,
    )
    after = _cpu_snapshot(watch or {})
    host = _host_load(deployment, before, after, warmup + len(tput_rows), rps, spare_cores)
    latencies = _latencies_ms(lat_rows)
    return Measurement(
        latency_ms=statistics.median(latencies),
        latency_p95_ms=_quantile(latencies, 0.95),
        throughput_rps=rps,
        items_per_s=rps * batch_size,
        requests=len(lat_rows) + len(tput_rows),
        outputs_match=checker.match,
        max_abs_diff=checker.max_abs_diff,
        stages=_stage_summary(deployment, lat_rows, tput_rows, stats),
        transfers=_transfer_summary(deployment, lat_rows, source, sink),
        devices=[s.device for s in deployment.stages],
        rows=lat_rows + tput_rows,
        host=host,
        queue_ms=_queue_ms(lat_rows, len(deployment.stages)),
    )


def _cpu_snapshot(watch: Mapping[str, int]) -> dict[str, Any]:
    """Busy clock ticks per core (``/proc/stat``), CPU seconds of watched processes, the time."""
    import psutil

    cores: dict[str, int] = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name != "cpu":
                    ticks = [int(x) for x in fields[:8]]
                    cores[name[3:]] = sum(ticks) - ticks[3] - ticks[4]  # less idle, iowait
    except (OSError, ValueError, IndexError):
        cores = {}
    watched: dict[str, float] = {}
    for name, pid in watch.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:  # gone: it is not reported
            continue
        watched[name] = float(times.user + times.system)
    return {"cores": cores, "watched": watched, "wall": time.perf_counter()}


def _host_load(
    deployment: Deployment,
    before: dict[str, Any],
    after: dict[str, Any],
    done: int,
    rps: float,
    spare_cores: Iterable[int] | None = None,
) -> dict[str, Any]:
    """CPU per request between two snapshots (and the workers' stats since their reset)."""
    if done <= 0:
        return {}
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    wall = after["wall"] - before["wall"]
    devices: dict[str, float] = {}
    try:
        stats = deployment.stats()
    except RuntimeFailure:  # a stage that cannot answer leaves the figures out
        stats = []
    seen: set[Any] = set()
    for stage, stat in zip(deployment.stages, stats):
        worker = stage.address
        if worker is None or worker in seen:  # in process (no worker of its own), or a
            continue  # worker already counted: one runs all of a device's stages and relays
        seen.add(worker)
        ms = stat.cpu_percent / 100.0 * wall * 1e3 / done
        devices[stage.device] = devices.get(stage.device, 0.0) + ms
    cores_ms = {
        core: (after["cores"][core] - t0) / hz * 1e3 / done
        for core, t0 in before["cores"].items()
        if core in after["cores"]
    }
    spare = None if spare_cores is None else {str(c) for c in spare_cores}
    candidates = [c for c in cores_ms if spare is None or c in spare]
    busiest = max(candidates, key=cores_ms.__getitem__, default=None)
    return {
        "requests": done,
        "busiest_core": None
        if busiest is None or not rps > 0
        else {"core": busiest, "utilization": round(cores_ms[busiest] * rps / 1e3, 3)},
        "devices_ms": devices,
        "watched_ms": {
            name: (after["watched"][name] - t0) * 1e3 / done
            for name, t0 in before["watched"].items()
            if name in after["watched"]
        },
        "cores_ms": cores_ms,
    }


def merge_rounds(parts: Sequence[Measurement]) -> Measurement:
    """One plan's measurements of several rounds as one (see the module docstring)."""
    if not parts:
        raise ValueError("no rounds to merge")
    if len(parts) == 1:
        return parts[0]
    latencies = sorted(ms for p in parts for ms in p.latencies_ms())
    first = parts[0]
    stages = []
    for j, stage in enumerate(first.stages):
        stages.append(
            {
                **stage,
                "compute_ms": statistics.median(p.stages[j]["compute_ms"] for p in parts),
                "streaming_compute_ms": statistics.median(
                    p.stages[j]["streaming_compute_ms"] for p in parts
                ),
                "cpu_percent": statistics.median(p.stages[j]["cpu_percent"] for p in parts),
                "memory_bytes": max(p.stages[j]["memory_bytes"] for p in parts),
            }
        )
    queued = [p.queue_ms for p in parts if p.queue_ms is not None]
    transfers = []
    for j, hop in enumerate(first.transfers):
        ms = [p.transfers[j]["ms"] for p in parts if p.transfers[j]["ms"] is not None]
        transfers.append({**hop, "ms": statistics.median(ms) if ms else None})
    return Measurement(
        host=_merge_host([p.host for p in parts]),
        latency_ms=statistics.median(latencies),
        latency_p95_ms=_quantile(latencies, 0.95),
        throughput_rps=statistics.median(p.throughput_rps for p in parts),
        items_per_s=statistics.median(p.items_per_s for p in parts),
        requests=sum(p.requests for p in parts),
        outputs_match=all(p.outputs_match for p in parts),
        max_abs_diff=max(p.max_abs_diff for p in parts),
        stages=stages,
        transfers=transfers,
        devices=first.devices,
        rows=[row for p in parts for row in p.rows],
        rounds=[{"latency_ms": p.latency_ms, "throughput_rps": p.throughput_rps} for p in parts],
        queue_ms=statistics.median(queued) if queued else None,
    )


def _merge_host(hosts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rounds' ``host`` figures as one: the median of each figure over the rounds that have it."""
    hosts = [h for h in hosts if h]
    if not hosts:
        return {}
    merged: dict[str, Any] = {"requests": sum(h["requests"] for h in hosts)}
    busiest = [h["busiest_core"] for h in hosts if h.get("busiest_core")]
    merged["busiest_core"] = max(busiest, key=lambda b: b["utilization"], default=None)
    for key in ("devices_ms", "watched_ms", "cores_ms"):
        names = dict.fromkeys(n for h in hosts for n in h.get(key, {}))
        merged[key] = {
            n: statistics.median(h[key][n] for h in hosts if n in h.get(key, {})) for n in names
        }
    return merged


def _latencies_ms(rows: Iterable[list[Any]]) -> list[float]:
    return sorted((r[-1] - r[_SENT]) * 1e3 for r in rows)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _row(round_: int, phase: str, sent: float, reply: Reply, n_stages: int) -> list[Any]:
    sent = reply.sent if reply.sent is not None else sent
    if len(reply.stamps) != STAMPS_PER_STAGE * n_stages:
        raise RuntimeFailure(
            f"reply {reply.request_id} carries {len(reply.stamps)} timestamps, "
            f"expected {STAMPS_PER_STAGE * n_stages}"
        )
    return [round_, phase, reply.request_id, sent, *reply.stamps, reply.received]


def _latency_phase(
    deployment: Deployment,
    inputs: Sequence[Sequence[torch.Tensor]],
    checker: _Checker,
    requests: int,
    warmup: int,
    timeout_s: float,
    on_request: OnRequest | None,
    round_: int,
) -> list[list[Any]]:
    rows = []
    for i in range(warmup + requests):
        sent = deployment.submit(i, inputs[i % len(inputs)])
        reply = deployment.receive(timeout_s)
        if reply.request_id != i:
            raise RuntimeFailure(f"expected reply {i}, got {reply.request_id}")
        checker.check(reply, i)
        if i >= warmup:
            rows.append(_row(round_, "latency", sent, reply, len(deployment.stages)))
            if on_request is not None:
                on_request("latency", len(rows), requests)
    return rows


def _throughput_phase(
    deployment: Deployment,
    inputs: Sequence[Sequence[torch.Tensor]],
    checker: _Checker,
    requests: int,
    warmup: int,
    depth: int,
    timeout_s: float,
    on_request: OnRequest | None,
    round_: int,
    window_s: float = 0.0,
) -> tuple[list[list[Any]], float]:
    base = 1_000_000
    total = warmup + requests
    sent: dict[int, float] = {}
    rows: list[list[Any]] = []
    submitted = received = 0
    window_start = None

    def submit() -> None:
        nonlocal submitted
        request_id = base + submitted
        sent[request_id] = deployment.submit(request_id, inputs[submitted % len(inputs)])
        submitted += 1

    for _ in range(min(depth, total)):
        submit()
    opened = min(sent.values())  # stands in for the window's start while warm-up runs
    while received < submitted:
        reply = deployment.receive(timeout_s)
        received += 1
        index = reply.request_id - base
        checker.check(reply, index)
        start = opened if window_start is None else window_start
        if submitted < total or reply.received - start < window_s:
            submit()
        if received == warmup:
            window_start = reply.received
            sent.pop(reply.request_id, None)
        elif received > warmup:
            rows.append(
                _row(
                    round_,
                    "throughput",
                    sent.pop(reply.request_id),
                    reply,
                    len(deployment.stages),
                )
            )
            if on_request is not None:
                on_request("throughput", len(rows), max(requests, submitted - warmup))
    if window_start is None:
        window_start = min(r[_SENT] for r in rows)
    elapsed = rows[-1][-1] - window_start
    return rows, len(rows) / elapsed if elapsed > 0 else float("nan")


def _stage_summary(
    deployment: Deployment,
    rows: list[list[Any]],
    streaming: list[list[Any]],
    stats: Sequence[Any],
) -> list[dict[str, Any]]:
    """Per stage: its median compute with one request in flight (``rows``) and while the
    pipeline streams (``streaming``: the throughput phase, where its device's core may be
    shared with the other stages' work)."""
    out = []
    for i, stage in enumerate(deployment.stages):
        if stage.relay:
            continue
        base = _SENT + 1 + STAMPS_PER_STAGE * i
        compute = [(r[base + 2] - r[base + 1]) * 1e3 for r in rows]
        busy = [(r[base + 2] - r[base + 1]) * 1e3 for r in streaming] or compute
        out.append(
            {
                "device": stage.device,
                "start": stage.start,
                "end": stage.end,
                "compute_ms": statistics.median(compute),
                "streaming_compute_ms": statistics.median(busy),
                "cpu_percent": stats[i].cpu_percent,
                "memory_bytes": stats[i].memory_bytes,
            }
        )
    return out


def _queue_ms(rows: list[list[Any]], n_stages: int) -> float | None:
    """Median over ``rows`` of the time each request spent in its ``n_stages`` stages outside
    their compute (receive to compute start, compute end to send); None without rows."""
    if not rows:
        return None
    spent = []
    for r in rows:
        total = 0.0
        for i in range(n_stages):
            recv, start, end, send = r[_SENT + 1 + STAMPS_PER_STAGE * i :][:STAMPS_PER_STAGE]
            total += (start - recv) + (send - end)
        spent.append(total * 1e3)
    return statistics.median(spent)


def _transfer_summary(
    deployment: Deployment, rows: list[list[Any]], source: str, sink: str
) -> list[dict[str, Any]]:
    names = [source, *(s.device for s in deployment.stages), sink]
    out = []
    n = len(deployment.stages)
    for hop in range(n + 1):
        if hop == 0:
            send_col, recv_col = _SENT, _SENT + 1
        else:
            send_col = _SENT + STAMPS_PER_STAGE * hop
            recv_col = _SENT + 1 + STAMPS_PER_STAGE * hop if hop < n else -1
        ms: float | None = None
        if deployment.same_clock:
            ms = statistics.median((r[recv_col] - r[send_col]) * 1e3 for r in rows)
        out.append({"src": names[hop], "dst": names[hop + 1], "ms": ms})
    return out
