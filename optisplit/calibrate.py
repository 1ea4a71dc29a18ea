"""Calibration: measure a runtime backend's own costs on a testbed, for the cost model to use.

The cost model's formulas cover compute, wire time and copies; what a runtime adds on top is in
:class:`~optisplit.cost.Overheads`. Three of its terms depend on the backend and the host and
are measured here with a probe model (:func:`probe_model`, no profile of it needed): a stack of
3x3 convolutions on a 32x32 input, all but the first with a squeeze-and-excitation gate whose
1 MiB of weights make the probe read as many megabytes per request as a zoo model (a zoo
model's weights and activations push the runtime's own code and data out of the caches, and the
runtime costs more per request after them), about 7.5 ms of compute on one core of this host for
12 KB of input, so that on a LAN link its transfers take a fraction of its compute and the
runtime's own costs show (a zoo model's 224x224 input takes 4.8 ms per request on a 1 Gbit/s
link: as long as ``mobilenet_v3_small``'s compute, so the link and not the runtime would set
the probe's pace):

- ``handoff_ms`` and ``message_ms``: a split plan ``source[0:c] -> other[c:B]`` is deployed and
  its hop times read (medians over the rounds). ``handoff_ms`` is the mean of the two local
  hand-offs (client -> first stage at the source, last stage -> client at the sink);
  ``message_ms`` is the median, over the cross-device hops, of hop time - one-way delay - wire
  time - copy time.
- ``handoff_ms_per_mb``: a hand-off costs more the more bytes it carries (the client's copies,
  and on an emulated testbed the delay path's forwarding of the message), and the probe's
  12 KB input reads little of that: a zoo model hands 602 KB to the source. A third probe
  (:func:`wide_probe_model`: the probe's input widened to 3 x 224 x 224, pooled to 32 x 32 in
  its first block, 4 layers) is deployed whole on the source; the rise of its input's
  hand-off over the short probe's, per MB between them, is the term (medians over the rounds),
  and ``handoff_ms`` is what the short probe's hand-offs leave of it.
- ``queue_ms``: in both plans, the time a request spent inside the deployed stages and relays
  outside their compute (``Measurement.queue_ms``, one request in flight), per stage or relay
  (median over the plans and rounds).
- ``request_ms``: ``other[0:B]`` is deployed (the source relays input and output) with requests
  streaming; ``request_ms`` is what its period per request leaves beyond the stage's compute and
  copies, read with the cost model's rule (the stage's device pays it once, the relay twice; the
  period is the larger of the two). The compute is the stage's own, timed one request at a time
  in the same run, not a profile: how far a profile is off its run differs from model to model,
  and ``request_ms`` would carry the probe model's share of it into every prediction.

- ``client_ms``, ``forward_ms`` and ``forward_ms_per_mb`` (single-host testbeds only,
  ``Testbed.host_cores``): while each probe plan streams, the CPU time per request of every
  core of the host, of every device's worker and of the delay forwarder is read
  (``Measurement.host``). The helper cores (``emulate.helper_cores``) carry the client and the
  forwarder besides any device pinned there: ``client_ms`` is what their busy time leaves
  after those devices' workers, the forwarder and the copies of the probe's input and output
  (median over both plans). The forwarder passes four messages per request in both plans
  (input to the source, the source's transfer, the output back, the output to the client),
  24 KB in all in one and 274 KB in the other: the two fix its cost per message
  (``forward_ms``) and per MB (``forward_ms_per_mb``).
- ``request_cpu_ms``: the source's worker CPU time per request in the split plan, less its
  stage's compute (wall time at the source's share of a core, which a paced device's pacer
  makes its CPU time) and copies, per role (its stage, and the output's relay when it is the
  sink as well): what the runtime costs the cores of a shared host per stage or relay.

- ``client_wait_share`` and ``worker_wait_share`` (single-host testbeds only): what the client,
  the forwarder and a device's worker spend per request grows with the time between requests
  (threads that wait for the next one; ``bench/wakeups.py`` on ``local`` under ``lan``: the
  helper core's CPU per request rose from 0.93 to 1.65 ms over sockets and from 3.76 to 5.06
  ms over RPC as the period went from 7 to 27 ms). A longer probe (:func:`long_probe_model`,
  64 layers, about four times the compute) is deployed whole beside the short one's ``alone``
  plan; the slope of the relay's (the source's worker), the client's and the forwarder's CPU
  per request against the period over those plans is their share of a core while requests
  stream (the client's and the forwarder's add up to ``client_wait_share``). The per-request
  terms above are read with that share times their plan's period taken off.

The plans are measured ``rounds`` times (3 by default), taking turns, and the medians kept.

The result is stored per testbed and backend in ``<profiles>/overheads/<testbed>-<backend>.json``
(schema_version 1); :func:`optisplit.cost.load_cost_model` uses it when given the backend. These
costs drift with the host's load (by a millisecond or two over minutes on a shared VM), so
calibrate close to the runs it is meant for.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import os
import platform
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit._io import read_json, write_json
from optisplit.errors import ProfileError, RuntimeFailure, UsageError

if TYPE_CHECKING:
    from optisplit.cost import Overheads
    from optisplit.testbed import Testbed
    from optisplit.validate import ProgressCallback

__all__ = [
    "LONG_PROBE_FACTORY",
    "PROBE_FACTORY",
    "PROBE_MODEL",
    "WIDE_PROBE_FACTORY",
    "Calibration",
    "calibrate_overheads",
    "calibrated_overheads",
    "calibration_path",
    "load_calibration",
    "long_probe_model",
    "probe_model",
    "save_calibration",
    "wide_probe_model",
]

SCHEMA_VERSION = 1
PROBE_MODEL = "calibration-probe"
PROBE_FACTORY = "optisplit.calibrate:probe_model"
LONG_PROBE_FACTORY = "optisplit.calibrate:long_probe_model"
WIDE_PROBE_FACTORY = "optisplit.calibrate:wide_probe_model"
_MIN_SPAN_MS = 5.0
"""Periods of the two probes' whole-probe plans closer than this fix no waiting share."""
_PROBE_DEPTH = 8
"""Requests in flight while streaming: enough that the probe's latency does not bound its rate."""
_TERMS = ("message_ms", "handoff_ms", "request_ms")
_LATER_TERMS = ("queue_ms", "handoff_ms_per_mb")
"""Terms that calibrations written before them lack; they read as 0."""
_HOST_TERMS = (
    "client_ms",
    "forward_ms",
    "forward_ms_per_mb",
    "client_wait_share",
    "worker_wait_share",
)
"""Terms of single-host testbeds; calibrations without them read as 0."""
_MAX_WIRE_MS = 20.0
"""Refuse links on which the probe's input takes longer than this (wifi's 50 Mbit/s: 96 ms)."""


@dataclass(frozen=True)
class Calibration:
    """A backend's measured costs on one testbed, and what they were read from."""

    testbed: str
    backend: str
    message_ms: float
    handoff_ms: float
    request_ms: float
    queue_ms: float = 0.0
    handoff_ms_per_mb: float = 0.0
    client_ms: float = 0.0
    forward_ms: float = 0.0
    forward_ms_per_mb: float = 0.0
    request_cpu_ms: float | None = None
    client_wait_share: float = 0.0
    worker_wait_share: float = 0.0
    probe: str = PROBE_FACTORY
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The probe's raw figures: ``period_ms``, ``compute_ms``, ``hops`` (ms) and the plans."""
    created: str = ""
    host: str = ""

    def overheads(self, base: Overheads | None = None) -> Overheads:
        """``base`` (default :class:`Overheads`) with the calibrated terms."""
        from optisplit.cost import Overheads

        return dataclasses.replace(
            base or Overheads(),
            message_ms=self.message_ms,
            handoff_ms=self.handoff_ms,
            handoff_ms_per_mb=self.handoff_ms_per_mb,
            request_ms=self.request_ms,
            queue_ms=self.queue_ms,
            client_ms=self.client_ms,
            forward_ms=self.forward_ms,
            forward_ms_per_mb=self.forward_ms_per_mb,
            request_cpu_ms=self.request_cpu_ms,
            client_wait_share=self.client_wait_share,
            worker_wait_share=self.worker_wait_share,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Calibration:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in fields})


def probe_model(channels: int = 64, layers: int = 16, hidden: int = 2048) -> tuple[Any, Any]:
    """The calibration probe (a model factory, ``PROBE_FACTORY``): a 3x3 convolution with ReLU
    over a 3 x 32 x 32 input, then ``layers - 1`` blocks of a 3x3 convolution with ReLU and a
    squeeze-and-excitation gate through ``hidden`` units (:class:`optisplit._probe.ExciteBlock`:
    1 MiB of weights each, so that the probe reads as many megabytes per request as a zoo
    model; none with ``hidden=0``), then a pooled linear head; returns
    ``(module, example input)``."""
    from optisplit._probe import build

    return build(channels, layers, hidden)


def long_probe_model() -> tuple[Any, Any]:
    """The longer probe (``LONG_PROBE_FACTORY``): :func:`probe_model` with 64 layers, about
    four times its compute for the same input and output."""
    return probe_model(layers=64)


def wide_probe_model() -> tuple[Any, Any]:
    """The wide probe (``WIDE_PROBE_FACTORY``): :func:`probe_model`'s blocks, 4 layers of them,
    after a block that pools a zoo model's 3 x 224 x 224 input (602 KB) down to 32 x 32: a
    hand-off of as many bytes as a zoo model's, for about a quarter of the probe's compute."""
    from optisplit._probe import build

    return build(64, 4, 2048, size=224)


def calibration_path(
    testbed: str, backend: str, *, root: str | os.PathLike[str] = "profiles"
) -> Path:
    """``<root>/overheads/<testbed>-<backend>.json``."""
    return Path(root) / "overheads" / f"{testbed}-{backend}.json"


def save_calibration(
    calibration: Calibration, *, root: str | os.PathLike[str] = "profiles"
) -> Path:
    """Write ``calibration`` (atomically, replacing an earlier one); returns the path."""
    path = calibration_path(calibration.testbed, calibration.backend, root=root)
    return write_json(path, calibration.to_dict())


def load_calibration(
    testbed: str, backend: str, *, root: str | os.PathLike[str] = "profiles"
) -> Calibration | None:
    """The stored calibration of ``backend`` on ``testbed``, or None when there is none.

    Raises:
        ProfileError: the file exists but is unreadable, of another schema, or malformed.
    """
    path = calibration_path(testbed, backend, root=root)
    if not path.is_file():
        return None
    doc = read_json(
        path, kind="calibration", schema_versions=(SCHEMA_VERSION,), error=ProfileError
    )
    try:
        values = {k: float(doc[k]) for k in _TERMS}
        values.update({k: float(doc.get(k, 0.0)) for k in (*_LATER_TERMS, *_HOST_TERMS)})
        if doc.get("request_cpu_ms") is not None:
            values["request_cpu_ms"] = float(doc["request_cpu_ms"])
    except (KeyError, TypeError, ValueError):
        terms = ", ".join((*_TERMS, *_LATER_TERMS, *_HOST_TERMS, "request_cpu_ms"))
        raise ProfileError(f"{path}: calibration lacks numbers for {terms}") from None
    if not all(0.0 <= v < float("inf") for v in values.values()):
        raise ProfileError(f"{path}: calibration terms must be numbers >= 0, got {values}")
    if values["client_wait_share"] >= 1.0 or values["worker_wait_share"] >= 1.0:
        raise ProfileError(f"{path}: waiting shares must be below 1 (a share of a core)")
    return Calibration.from_dict({**doc, **values})


def calibrated_overheads(
    testbed: str, backend: str, *, root: str | os.PathLike[str] = "profiles"
) -> Overheads:
    """The cost model's overheads for ``backend`` on ``testbed``: calibrated where stored,
    the defaults otherwise."""
    from optisplit.cost import Overheads

    found = load_calibration(testbed, backend, root=root)
    return Overheads() if found is None else found.overheads()


def calibrate_overheads(
    testbed: Testbed,
    backend: str,
    *,
    requests: int = 40,
    warmup: int = 2,
    rounds: int = 3,
    window_s: float = 2.0,
    token: bytes | None = None,
    on_progress: ProgressCallback | None = None,
) -> Calibration:
    """Measure ``backend``'s overhead terms on ``testbed`` (see the module docstring).

    Deploys the probe plans where :func:`optisplit.validate.validate_plans` would: the testbed's
    workers, the emulated testbed when it is up, local processes otherwise; ``rounds`` times,
    the plans taking turns, and reads the medians. Nothing is written:
    :func:`save_calibration` stores the result.

    Raises:
        UsageError: the links are too slow for the probe to see the runtime's costs past its
            transfers (calibrate under a faster condition).
        RuntimeFailure: a probe plan failed.
    """
    from optisplit.chain import load_chain
    from optisplit.cost import Overheads
    from optisplit.validate import validate_plans

    if requests < 4 or rounds < 1:
        raise UsageError(
            f"calibration needs requests >= 4 and rounds >= 1, got {requests}, {rounds}"
        )
    chain = load_chain(PROBE_MODEL, module=PROBE_FACTORY)
    blocks = chain.n_blocks
    others = [d for d in testbed.devices if d != testbed.source]
    other = others[0] if others else testbed.source
    cut = blocks // 2
    alone = f"{other}[0:{blocks}]"
    split = f"{testbed.source}[0:{cut}] -> {other}[{cut}:{blocks}]"
    wire = 0.0
    if other != testbed.source:
        wire = _serialisation_ms(testbed, other, chain.input_bytes, chain.output_bytes)
        if wire > _MAX_WIRE_MS:
            raise _too_slow(testbed, wire)

    # the longer probe's whole-probe plan, for the waiting shares of a shared host's processes
    long_chain = load_chain(PROBE_MODEL, module=LONG_PROBE_FACTORY)
    long_alone = f"{other}[0:{long_chain.n_blocks}]"
    waits = bool(testbed.host_cores) and other != testbed.source
    # the wide probe on the source alone: a hand-off of a zoo model's input size
    wide_chain = load_chain(PROBE_MODEL, module=WIDE_PROBE_FACTORY)
    wide = f"{testbed.source}[0:{wide_chain.n_blocks}]"

    def run(plan: str, factory: str = PROBE_FACTORY, window: float = window_s) -> dict[str, Any]:
        """Deploy one probe plan once and return its measurement (raise when it failed)."""
        with tempfile.TemporaryDirectory(prefix="optisplit-calibrate-") as out:
            (result,) = validate_plans(
                PROBE_MODEL,
                testbed,
                [plan],
                backend=backend,
                requests=requests,
                warmup=warmup,
                depth=_PROBE_DEPTH,
                window_s=window,
                token=token,
                module=factory,
                out_dir=out,
                profiles_root=out,  # no profiles: no predictions needed
                on_progress=on_progress,
                warn_host_full=False,  # its own probe plans, not the user's
            )
        if not result["measured"]:
            raise RuntimeFailure(
                f"calibration of {backend} on {testbed.name} failed: {plan}: {result['error']}"
            )
        measured: dict[str, Any] = result["measured"]
        return measured

    base = Overheads()
    moved = base.copy_ms(chain.input_bytes) + base.copy_ms(chain.output_bytes)
    hops: list[list[dict[str, Any]]] = []
    periods: list[float] = []
    computes: list[float] = []
    queues: list[float] = []
    wide_hops: list[list[dict[str, Any]]] = []
    helpers = _HostCosts(testbed, chain)
    for _ in range(rounds):  # the plans take turns: a slow spell spreads over all
        wide_hops.append(run(wide, WIDE_PROBE_FACTORY, window=0.0)["transfers"])
        if other != testbed.source:
            measured = run(split)
            hops.append(measured["transfers"])
            queues += _queue_per_stage(measured)
            helpers.add(split, measured)
        if waits:
            helpers.add(
                long_alone,
                run(long_alone, LONG_PROBE_FACTORY),
                cut_bytes=_cut_bytes(long_chain),
                alone=True,
            )
        measured = run(alone)
        queues += _queue_per_stage(measured)
        helpers.add(alone, measured, alone=waits)
        period = 1000.0 / measured["throughput_rps"]
        if max(wire, measured["latency_ms"] / _PROBE_DEPTH) >= 0.9 * period:
            raise _too_slow(testbed, wire)  # the link or the delay set the pace
        periods.append(period)
        computes.append(next(s["compute_ms"] for s in measured["stages"] if s["device"] == other))
        if other == testbed.source:
            hops.append(measured["transfers"])
    if other == testbed.source:  # one device: it neither copies nor relays
        requests_ms = [p - c for p, c in zip(periods, computes, strict=True)]
    else:  # the device pays it once, the relay twice: the period is the larger of the two
        requests_ms = [
            min(p - c - moved, (p - moved) / 2) for p, c in zip(periods, computes, strict=True)
        ]
    sizes = {
        (testbed.source, other): chain.cuts[cut - 1].bytes,
        (other, testbed.sink): chain.output_bytes,
    }
    residuals = [
        hop["ms"]
        - _wire_ms(testbed, hop["src"], hop["dst"], sizes[hop["src"], hop["dst"]])
        - base.copy_ms(sizes[hop["src"], hop["dst"]])
        for h in hops
        for hop in h[1:-1]
        if hop["src"] != hop["dst"] and (hop["src"], hop["dst"]) in sizes
    ]
    message = statistics.median(residuals) if residuals else base.message_ms
    forward = helpers.forward_terms()
    request_cpu = helpers.request_cpu_ms()
    handoff, handoff_per_mb = _handoff_terms(
        hops, wide_hops, (chain.input_bytes, chain.output_bytes), wide_chain.input_bytes
    )
    return Calibration(
        testbed=testbed.name,
        backend=backend,
        message_ms=round(max(message, 0.0), 4),
        handoff_ms=round(handoff, 4),
        handoff_ms_per_mb=round(handoff_per_mb, 4),
        request_ms=round(max(statistics.median(requests_ms), 0.0), 4),
        queue_ms=round(max(statistics.median(queues), 0.0), 4) if queues else 0.0,
        client_ms=round(helpers.client_ms(), 4),
        forward_ms=round(forward[0], 4),
        forward_ms_per_mb=round(forward[1], 4),
        request_cpu_ms=None if request_cpu is None else round(request_cpu, 4),
        client_wait_share=round(helpers.client_wait_share(), 4),
        worker_wait_share=round(helpers.worker_wait_share(), 4),
        measured={
            "plans": [split, alone, *([long_alone] if waits else []), wide]
            if other != testbed.source
            else [alone, wide],
            "period_ms": periods,
            "compute_ms": computes,
            "request_ms": requests_ms,
            "queue_ms": queues,
            "hops": [[{"src": x["src"], "dst": x["dst"], "ms": x["ms"]} for x in h] for h in hops],
            "wide_hops": [
                [{"src": x["src"], "dst": x["dst"], "ms": x["ms"]} for x in h] for h in wide_hops
            ],
            "client_ms": [{"period_ms": t, "ms": ms} for t, ms in helpers.clients],
            "request_cpu_ms": [
                {"period_ms": t, "ms": ms, "roles": n} for t, ms, n in helpers.requests
            ],
            "waits": helpers.waits,
            "forwarder_ms": [
                {"messages": m, "mb": mb, "period_ms": t, "ms": ms}
                for (m, mb), v in helpers.forwards.items()
                for t, ms in v
            ],
            "requests": requests,
            "rounds": rounds,
            "window_s": window_s,
        },
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        host=platform.node(),
    )


class _HostCosts:
    """CPU time per request of the client, the forwarder and a device's runtime, read from
    the probe's measurements (``Measurement.host``), split into what each request costs and
    what the processes spend per unit of time while requests stream (their waiting shares).

    Every figure is kept with the period per request of the plan it came from. The whole-probe
    plans of both probes (``alone``: the source only relays) fix the waiting shares: the slope
    of each process's CPU per request against the period (:meth:`_slope`). The per-request
    terms are their samples less that slope times their period.
    """

    def __init__(self, testbed: Testbed, chain: Any) -> None:
        from optisplit import emulate
        from optisplit.cost import Overheads

        self.testbed = testbed
        self.cut_bytes = _cut_bytes(chain)
        self.copy_ms = Overheads().copy_ms
        host = testbed.host_cores
        self.cores = () if host is None else emulate.helper_cores(testbed) or host
        self.clients: list[tuple[float, float]] = []
        self.requests: list[tuple[float, float, int]] = []
        """(period, the source's runtime CPU per request, its roles) of split plans."""
        self.forwards: dict[tuple[int, float], list[tuple[float, float]]] = {}
        """(messages, MB) the forwarder passes per request -> (period, its CPU ms per request)."""
        self.waits: list[dict[str, float]] = []
        """Whole-probe plans: the period and the relay's, client's and forwarder's CPU."""

    def add(
        self,
        plan_text: str,
        measured: dict[str, Any],
        *,
        cut_bytes: list[int] | None = None,
        alone: bool = False,
    ) -> None:
        """Take one probe plan's figures (``cut_bytes``: its probe's, default the short
        one's; ``alone``: a whole-probe plan, whose figures also fix the waiting shares)."""
        from optisplit.cost import plan_transfers
        from optisplit.plan import Plan

        cuts = self.cut_bytes if cut_bytes is None else cut_bytes
        load = measured.get("host") or {}
        plan = Plan.parse(plan_text)
        period = 1000.0 / measured["throughput_rps"] if measured.get("throughput_rps") else 0.0
        devices_ms = load.get("devices_ms") or {}
        self._runtime(plan, measured, devices_ms, cuts, period)
        cores_ms = load.get("cores_ms") or {}
        watched = load.get("watched_ms") or {}
        wait: dict[str, float] | None = None
        if alone and period > 0 and self.testbed.source in devices_ms:
            wait = {"period_ms": period, "relay_ms": devices_ms[self.testbed.source]}
            if "forwarder" in watched:
                wait["forwarder_ms"] = watched["forwarder"]
            self.waits.append(wait)
        if not self.cores or not all(str(c) in cores_ms for c in self.cores):
            return  # not one host, or no per-core figures here
        busy = sum(cores_ms[str(c)] for c in self.cores)
        for device, ms in devices_ms.items():
            pinned = self.testbed.devices[device].cores or ()
            busy -= ms * sum(1 for c in pinned if c in self.cores) / max(len(pinned), 1)
        forwarder = watched.get("forwarder", 0.0)
        copies = self.copy_ms(cuts[0]) + self.copy_ms(cuts[-1])
        client = max(busy - forwarder - copies, 0.0)  # the model adds the copies
        self.clients.append((period, client))
        if wait is not None:
            wait["client_ms"] = client
        if "forwarder" not in watched:
            return
        # the client's input to the source and the sink's output to the client pass the
        # forwarder too, as does every transfer between two devices
        sizes = [cuts[0], cuts[-1]]
        sizes += [n for _, _, n in plan_transfers(self.testbed, plan, cuts)]
        key = (len(sizes), sum(sizes) / 1e6)
        self.forwards.setdefault(key, []).append((period, forwarder))

    def _runtime(
        self,
        plan: Any,
        measured: dict[str, Any],
        devices_ms: dict[str, float],
        cuts: list[int],
        period: float,
    ) -> None:
        """The runtime's CPU time per stage or relay on the source of a split plan: its
        worker's CPU time less the first stage's compute (its time at the device's share of a
        core: a paced device's pacer makes its compute's wall time its CPU time over the pace)
        and the copies; the source runs the stage and, as the sink, relays the output."""
        from optisplit.cost import CostModel

        source = self.testbed.source
        first = plan.stages[0]
        if len(plan.stages) < 2 or first.device != source or source not in devices_ms:
            return
        compute = next(
            (
                s["compute_ms"]
                for s in measured.get("stages", [])
                if (s["device"], s.get("start"), s.get("end")) == (source, first.start, first.end)
            ),
            None,
        )
        if compute is None:
            return
        device = self.testbed.devices[source]
        share = CostModel.share_of(device)
        roles, copies = 1, self.copy_ms(cuts[first.end])
        if self.testbed.sink == source:
            roles, copies = 2, copies + self.copy_ms(cuts[-1])
        self.requests.append((period, devices_ms[source] - compute * share - copies, roles))

    def _slope(self, key: str) -> float:
        """CPU ms per request per ms of period of one process over the whole-probe plans: the
        median of the slopes between every two of them whose periods differ by at least
        ``_MIN_SPAN_MS`` (a round disturbed by other work moves a few of them, not the median);
        0 when there are none, and at least 0."""
        points = [(w["period_ms"], w[key]) for w in self.waits if key in w]
        slopes = [
            (v2 - v1) / (t2 - t1)
            for (t1, v1), (t2, v2) in itertools.combinations(points, 2)
            if abs(t2 - t1) >= _MIN_SPAN_MS
        ]
        return max(statistics.median(slopes), 0.0) if slopes else 0.0

    def worker_wait_share(self) -> float:
        """The source's worker's waiting share: the slope of its relay's CPU per request."""
        return self._slope("relay_ms")

    def client_wait_share(self) -> float:
        """The client's and the forwarder's waiting shares together (both on helper cores)."""
        return self._slope("client_ms") + self._slope("forwarder_ms")

    def client_ms(self) -> float:
        if not self.clients:
            return 0.0
        slope = self._slope("client_ms")
        return max(statistics.median(ms - slope * t for t, ms in self.clients), 0.0)

    def request_cpu_ms(self) -> float | None:
        if not self.requests:
            return None
        slope = self.worker_wait_share()
        return max(statistics.median((ms - slope * t) / n for t, ms, n in self.requests), 0.0)

    def forward_terms(self) -> tuple[float, float]:
        """(ms per message, ms per MB) of the forwarder, its waiting taken off: least squares
        over the plans' medians (two plans of as many messages and different sizes fix both),
        neither below 0."""
        slope = self._slope("forwarder_ms")
        points = [
            (m, mb, statistics.median(ms - slope * t for t, ms in v))
            for (m, mb), v in self.forwards.items()
        ]
        if not points:
            return 0.0, 0.0
        per_message = max(statistics.median(ms / m for m, _, ms in points), 0.0)
        if len({round(mb / m, 9) for m, mb, _ in points}) < 2:
            return per_message, 0.0  # one mix of sizes: it cannot tell bytes from messages
        import numpy as np

        design = np.array([[m, mb] for m, mb, _ in points])
        spent = np.array([ms for _, _, ms in points])
        (fixed, rate), *_ = np.linalg.lstsq(design, spent, rcond=None)
        if fixed >= 0 and rate >= 0:
            return float(fixed), float(rate)
        if rate < 0:  # the bytes explain nothing: all per message
            return per_message, 0.0
        return 0.0, max(statistics.median(ms / mb for _, mb, ms in points), 0.0)


def _handoff_terms(
    hops: list[list[dict[str, Any]]],
    wide_hops: list[list[dict[str, Any]]],
    probe_bytes: tuple[int, int],
    wide_bytes: int,
) -> tuple[float, float]:
    """``(handoff_ms, handoff_ms_per_mb)`` from the probe plans' hops (first and last: the
    client's hand-offs of ``probe_bytes``, input and output) and the wide probe's (its first:
    the hand-off of ``wide_bytes``). The slope is the rise of the median input hand-off from
    the probe's to the wide probe's, per MB between them; the fixed part the median of the
    probe's hand-offs less that slope times their bytes. Neither is below 0; hops without a
    time (stages on other clocks) are left out, and without both inputs' hand-offs the slope
    is 0."""
    small_in = [h[0]["ms"] for h in hops if h and h[0]["ms"] is not None]
    small_out = [h[-1]["ms"] for h in hops if h and h[-1]["ms"] is not None]
    wide_in = [h[0]["ms"] for h in wide_hops if h and h[0]["ms"] is not None]
    span_mb = (wide_bytes - probe_bytes[0]) / 1e6
    slope = 0.0
    if small_in and wide_in and span_mb > 0:
        slope = max((statistics.median(wide_in) - statistics.median(small_in)) / span_mb, 0.0)
    fixed = [ms - slope * probe_bytes[0] / 1e6 for ms in small_in]
    fixed += [ms - slope * probe_bytes[1] / 1e6 for ms in small_out]
    return (max(statistics.median(fixed), 0.0) if fixed else 0.0), slope


def _queue_per_stage(measured: dict[str, Any]) -> list[float]:
    """A probe plan's queue time per stage or relay (``[]`` when it was not measured): its
    transfers are the hops between the client and the deployed stages, one more than those."""
    queue, hops = measured.get("queue_ms"), measured.get("transfers") or []
    if queue is None or len(hops) < 2:
        return []
    return [queue / (len(hops) - 1)]


def _cut_bytes(chain: Any) -> list[int]:
    """Bytes crossing every cut of ``chain``: its input, its interior cuts, its output."""
    return [chain.input_bytes, *(c.bytes for c in chain.cuts), chain.output_bytes]


def _wire_ms(testbed: Testbed, src: str, dst: str, nbytes: int) -> float:
    """One-way delay plus serialisation of ``nbytes`` on the route ``src`` -> ``dst``."""
    links = testbed.route(src, dst)
    if not links:
        return 0.0
    return sum(link.one_way_ms for link in links) + nbytes * 8 / (
        min(link.mbps for link in links) * 1e3
    )


def _serialisation_ms(testbed: Testbed, other: str, input_bytes: int, output_bytes: int) -> float:
    """Wire time per request, delay aside, of the busier direction between source and ``other``."""
    links_in, links_out = testbed.route(testbed.source, other), testbed.route(other, testbed.sink)
    return max(
        input_bytes * 8 / (min(link.mbps for link in links_in) * 1e3) if links_in else 0.0,
        output_bytes * 8 / (min(link.mbps for link in links_out) * 1e3) if links_out else 0.0,
    )


def _too_slow(testbed: Testbed, wire_ms: float) -> UsageError:
    return UsageError(
        f"testbed {testbed.name}'s links are too slow to calibrate on: the probe's transfers "
        f"({wire_ms:.1f} ms per request on the wire) or the links' delay set its pace and hide "
        "the runtime's own costs; "
        "calibrate under a fast condition (e.g. 'optisplit testbed up "
        f"{testbed.name} --condition lan' and 'optisplit calibrate --condition lan')"
    )
