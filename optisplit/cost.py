"""The cost model: predicted latency, throughput, memory and feasibility of a split plan (pure).

Formulas (``DESIGN.md`` §4, with every overhead term named). A plan has stages
``(d_i, [c_{i-1}, c_i))``, ``i = 1..k``; ``s`` is the testbed's source, ``t`` its sink, ``b(c)``
the bytes crossing cut ``c`` (``b(0)`` the input, ``b(B)`` the output).

* ``compute_i = scale(d_i) * w(d_i) * Σ time_ms of blocks c_{i-1} .. c_i - 1`` on ``d_i``'s
  profile, where ``w(d) = whole_ms / Σ time_ms`` of that profile (``Overheads.whole_model``): the
  whole model timed in one piece, spread over the blocks in proportion to their medians. Block
  medians undercount back-to-back execution (cache refills between blocks; and on a
  CPU-quota-throttled device a short block mostly runs at full speed while a later one pays for
  it, so medians miss the stalls); a stage runs its blocks back to back like the whole model.
  Measured on the emulated testbed: mobilenet_v2 on a quota-0.5 device sums to 43.7 ms of block
  medians against 60.8 ms whole, and the stages ran 57-82 ms (``bench/fidelity.py``). A paced
  device (``throttle: pace``) runs its stages block by block, as its profile timed them, so
  ``w = 1`` there. A stage also pays its first block's start (``Overheads.stage_entry``):
  ``+ scale(d_i) * (entry_ms - time_ms)`` of block ``c_{i-1}`` (at least 0; see
  ``optisplit.profiler``): the block measured alone after a rest, on a fresh copy of its input,
  as a stage starts when its input arrives. In the middle of the chain the block found the
  previous one's output and caches at hand; a stage that starts there does not.
* A profile timed with the CPU clock (provenance ``clock: cpu``: the thread's CPU time, immune to
  other processes on a shared host) measures work, not wall time; on a device limited to a CPU
  quota ``q`` (a fraction of one core; emulated devices) that work takes ``1 / min(q, 1)`` times
  as long, so ``compute_i`` is further divided by ``min(q, 1)``. Wall-clock profiles (the
  default) already include the quota.
* ``transfer(n bytes, u -> v) = Σ_hops rtt_ms / 2 + n * 8 / (min_hops mbps * 1e3)
  + message_ms + copy(n)``, zero when ``u == v``. The route is the testbed's least-RTT path
  (``Testbed.path``). ``message_ms`` is the fixed cost of one framed message (header, system
  calls, wake-ups); ``copy(n) = n * 8 / (copy_gbps * 1e6)`` ms is the serialisation cost of
  moving ``n`` bytes between tensors and socket buffers (see ``Overheads``).
* ``latency_ms = transfer(b(0), s -> d_1) + Σ_i compute_i
  + Σ_{i<k} transfer(b(c_i), d_i -> d_{i+1}) + transfer(b(B), d_k -> t) + handoff(b(0))
  + handoff(b(B)) + queue_ms * (k + [s != d_1] + [d_k != t])`` (``handoff(n) = handoff_ms
  + handoff_ms_per_mb * n / 1e6``: the client's local hand-off of the input at ``s`` and of
  the output at ``t``, a fixed part and one that grows with the bytes; ``queue_ms``: a
  request's time inside each stage outside its compute, passed from the thread that received
  it to the one that computes and on to the one that sends, in each of the ``k`` stages and in
  the relays that pass the input on at ``s`` and the output at ``t`` when they run no stage
  there).
* Busy time per request of each **device**: its compute, plus ``copy(n)`` for every transfer it
  sends or receives (the source also sends the input, the sink also receives the output, even
  when they run no stage), plus ``request_ms`` for each stage it runs or relays (the runtime's
  fixed work per request on a device: waking its threads, framing, handing tensors between
  them; an RPC agent's request handling). A paced device (``throttle: pace``) computes for
  ``pace`` of its compute time and rests for the remainder, and its runtime threads work
  during those rests: its busy time is ``max(compute, pace * compute + copies + request_ms)``.
  Busy time of each **link direction** ``u -> v``: the sum, over the plan's transfers routed
  through it, of ``n * 8 / (mbps * 1e3)``. Links are full duplex; propagation delay occupies
  no resource.
* Busy time per request of each **core of a shared host**, on a testbed whose every device is
  pinned to ``cores`` of one machine (``Testbed.host_cores``: an emulated testbed): the CPU
  time per request of all the work pinned to it. A device's CPU per request is its compute
  times its share of a core (``pace`` on a paced device, ``min(cpu_quota, 1)`` on a
  quota-limited one, 1 otherwise), plus its copies and ``request_cpu_ms`` for each stage or
  relay (its runtime's CPU time); it is spread evenly over the device's cores. The
  emulation's own processes run on the testbed's helper cores (``testbed.helper_cores``: the
  least-allotted ones; every core when all are full), spread evenly over them: ``client_ms``
  per request plus ``copy`` of the input and the output (the client that sends inputs and
  takes outputs), and ``forward_ms`` plus ``forward_ms_per_mb`` per MB for every message the
  userspace delay path forwards: each transfer between two devices, the input from the client
  to the source and the output from the sink to the client. A core does that work with what
  the waiting of the processes on it leaves (``Overheads.client_wait_share`` of the client and
  forwarder, ``worker_wait_share`` of the source's and sink's workers, spread as their work
  is): its busy time is its load over that capacity. Each device's own bound leaves
  its rests to others; this one says whether they all fit: two paced devices, their runtime
  threads, the client and the forwarder on one core saturated it at 9.0 ms per request
  (socket) and 15.2 ms (RPC) in a three-device mobilenet_v2 pipeline on ``local3``
  (``bench/hostload.py``), where every device's own busy time was under 8 ms.
* ``throughput_rps = 1000 / max(bottleneck_ms, latency_ms / depth)``: the asymptotic bounds of
  a closed queueing network (Lazowska et al., *Quantitative System Performance*, 1984, §5.2)
  with ``depth`` requests in flight. ``depth`` defaults to ``2 * k``, the default of
  ``optisplit validate``; ``depth=0`` drops the second bound (unbounded requests in flight).
  ``items_per_s = throughput_rps * batch_size``.
* ``memory_bytes[d_i] = Σ param_bytes + max mem_bytes`` over the stage's blocks
  ``+ buffers * (b(c_{i-1}) + b(c_i))`` (received inputs and outputs waiting to be sent in the
  runtime's bounded queues). A plan is feasible when every stage device fits its
  ``memory_bytes`` limit (devices without a limit always fit).

``loss_pct`` and ``jitter_ms`` are emulated but not predicted: the mean effect of jitter is zero
and TCP loss recovery is not modelled. Forwarding through a device (a multi-hop route) costs it no
CPU time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optisplit.errors import ProfileError
from optisplit.plan import Plan
from optisplit.profile import BlockProfile, load_profile, profile_path
from optisplit.testbed import Device, Testbed, helper_cores

_MIN_CAPACITY = 0.05
"""Least share of a core :meth:`CostModel._core_capacity` leaves (waiting shares are small)."""

__all__ = [
    "CostModel",
    "Evaluation",
    "Overheads",
    "Route",
    "StageCost",
    "Transfer",
    "load_cost_model",
    "plan_transfers",
]


@dataclass(frozen=True)
class Overheads:
    """Overhead terms of the cost model beyond the formulas of the design.

    Attributes:
        message_ms: fixed cost of one message (framing, system calls, thread wake-ups); the
            runtime's loopback figure is about 0.05 ms.
        copy_gbps: rate at which a device moves tensor bytes in or out of a socket (one side);
            about 0.14 ms for 0.8 MB on loopback here, i.e. ~46 Gbit/s. ``0`` disables the term.
        buffers: activations a stage holds per direction (bounded queues of the runtime).
        whole_model: spread each profile's whole-model time over its blocks in proportion to
            the block medians (see the module docstring); ``False`` sums the medians.
        handoff_ms: cost of handing the input to the pipeline at the source and taking the
            output from it at the sink (a local message each, on top of any transfer); added
            twice to the latency. ``0`` by default; ``optisplit calibrate`` measures it.
        handoff_ms_per_mb: what each of those two hand-offs costs per MB it carries, on top of
            ``handoff_ms`` (the client's copies into and out of its socket, and on an emulated
            testbed the delay path's forwarding of the message). ``0`` by default;
            ``optisplit calibrate`` measures it with a probe of a zoo model's input size.
        queue_ms: time a request spends inside one stage (or relay) outside its compute: its
            input handed from the thread that received it to the one that computes, its
            output on to the one that sends. Added to the latency once per stage and relay;
            the threads overlap while requests stream, so it does not bound throughput (their
            CPU time is in ``request_ms``). ``0`` by default; ``optisplit calibrate`` measures
            it with its probe: 0.07-0.13 ms on the emulated testbeds here, where the zoo
            models' own stages took 0.09-0.15 ms (``bench/fidelity.py``, both backends).
        request_ms: busy time per request a device spends on each stage it runs (or relays)
            beyond compute and copies (its runtime threads, and on a shared host other processes
            taking its core while requests stream in); it bounds throughput, not latency (the
            latency's share of it is in ``message_ms``). ``0`` by default;
            ``optisplit calibrate`` measures it per runtime backend with a probe: 0-0.16 ms on
            the socket backend and 0.70-0.88 ms over RPC on the emulated testbeds here.

        request_cpu_ms: CPU time per request a device's runtime spends on each stage it runs or
            relays, beyond compute and copies, for the shared host's cores (``None``: as
            ``request_ms``). It differs from ``request_ms``, a share of a period: a paced
            device's runtime threads work during its rests, where they cost its core's time
            but not the device's. ``optisplit calibrate`` reads it from the workers' CPU time.
        client_ms: CPU time per request of the client that feeds the pipeline (sends inputs,
            takes and checks outputs) on a shared host's helper cores; only single-host
            (emulated) testbeds count it. ``0`` by default; ``optisplit calibrate`` measures it.
        forward_ms, forward_ms_per_mb: CPU time of the userspace delay path (the emulation's
            forwarder) per message and per MB it forwards, on the helper cores of a single-host
            testbed. Every message between two devices passes it once, and so do the input
            from the client to the source and the output from the sink to the client. ``0`` by
            default; ``optisplit calibrate`` measures them.
        client_wait_share, worker_wait_share: share of a core that the client and forwarder
            together, and a device's worker, keep busy while requests stream, on top of their
            costs per request: CPU time that grows with the time between requests rather than
            with their number (threads that wait for the next request; ``bench/wakeups.py``).
            On a single-host testbed they take their part of each core that the client and
            forwarder, and the source's and sink's workers, run on (every plan keeps those
            busy), and leave the rest to per-request work (``CostModel.core_load``). ``0`` by
            default; ``optisplit calibrate`` measures them with a second, longer probe.

    ``message_ms``, ``handoff_ms``, ``handoff_ms_per_mb``, ``queue_ms``, ``request_ms``,
    ``request_cpu_ms``, ``client_ms``, ``forward_ms``, ``forward_ms_per_mb`` and the waiting
    shares depend on the runtime backend and the host:
    ``optisplit calibrate`` measures them per testbed and backend (:mod:`optisplit.calibrate`).
    """

    message_ms: float = 0.05
    copy_gbps: float = 40.0
    buffers: int = 2
    whole_model: bool = True
    handoff_ms: float = 0.0
    handoff_ms_per_mb: float = 0.0
    queue_ms: float = 0.0
    request_ms: float = 0.0
    client_ms: float = 0.0
    forward_ms: float = 0.0
    forward_ms_per_mb: float = 0.0
    request_cpu_ms: float | None = None
    stage_entry: bool = True
    client_wait_share: float = 0.0
    worker_wait_share: float = 0.0

    @property
    def cpu_per_request_ms(self) -> float:
        """``request_cpu_ms``, or ``request_ms`` where it is not set."""
        return self.request_ms if self.request_cpu_ms is None else self.request_cpu_ms

    def handoffs_ms(self, input_bytes: int, output_bytes: int) -> float:
        """The client's two local hand-offs of a request: its input at the source and its
        output at the sink."""
        moved_mb = (input_bytes + output_bytes) / 1e6
        return 2 * self.handoff_ms + self.handoff_ms_per_mb * moved_mb

    def copy_ms(self, nbytes: int) -> float:
        """Serialisation time of ``nbytes`` on one side of a transfer."""
        return nbytes * 8 / (self.copy_gbps * 1e6) if self.copy_gbps > 0 else 0.0

    @classmethod
    def none(cls) -> Overheads:
        """No overheads: the bare formulas of the design."""
        return cls(message_ms=0.0, copy_gbps=0.0, buffers=0, whole_model=False, stage_entry=False)


@dataclass(frozen=True)
class Route:
    """A precomputed route: the directed hops and their totals."""

    nodes: tuple[str, ...]
    hops: tuple[tuple[str, str, float], ...]
    """``(u, v, mbps)`` for each hop in order."""
    one_way_ms: float
    mbps: float
    """The smallest bandwidth on the route (``inf`` for an empty route)."""


@dataclass(frozen=True)
class StageCost:
    """Predicted compute of one stage."""

    device: str
    start: int
    end: int
    compute_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "start": self.start,
            "end": self.end,
            "compute_ms": self.compute_ms,
        }


@dataclass(frozen=True)
class Transfer:
    """Predicted time of one transfer between devices (input, a cut, or the output)."""

    src: str
    dst: str
    bytes: int
    ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"src": self.src, "dst": self.dst, "bytes": self.bytes, "ms": self.ms}


@dataclass(frozen=True)
class Evaluation:
    """The predicted objectives of one plan."""

    plan: Plan
    latency_ms: float
    throughput_rps: float
    items_per_s: float
    memory_bytes: dict[str, int] = field(hash=False)
    feasible: bool
    stages: tuple[StageCost, ...]
    transfers: tuple[Transfer, ...]
    bound: str = ""
    """What sets the throughput: ``device NAME``, ``link U->V``, ``core N`` (a shared host's
    core with more than one device's work, or the client's and forwarder's) or ``in flight``
    (the latency over the requests in flight)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": str(self.plan),
            "latency_ms": self.latency_ms,
            "throughput_rps": self.throughput_rps,
            "items_per_s": self.items_per_s,
            "memory_bytes": dict(self.memory_bytes),
            "feasible": self.feasible,
            "stages": [s.to_dict() for s in self.stages],
            "transfers": [t.to_dict() for t in self.transfers],
            "bound": self.bound,
        }


class CostModel:
    """Predicts plans of one model (one batch size, one granularity) on one testbed.

    Args:
        testbed: the devices and links.
        profiles: one profile per testbed device, keyed by device name, as measured (the
            constructor multiplies each by the device's ``scale``). All must describe the same
            chain: same blocks and cut bytes.
        overheads: overhead terms (``Overheads()`` defaults; ``Overheads.none()`` for the bare
            formulas).
        depth: requests in flight assumed by the throughput bound; ``None`` = 2 x stages,
            ``0`` = unbounded.

    Raises:
        ProfileError: a device without a profile, or profiles that disagree.
    """

    def __init__(
        self,
        testbed: Testbed,
        profiles: Mapping[str, BlockProfile],
        *,
        overheads: Overheads | None = None,
        depth: int | None = None,
    ) -> None:
        self.testbed = testbed
        self.devices: tuple[str, ...] = tuple(testbed.devices)
        self.overheads = overheads if overheads is not None else Overheads()
        self.depth = depth
        reference = self._check_profiles(profiles)
        self.model = reference.model
        self.batch_size = reference.batch_size
        self.granularity = reference.granularity
        self.n_blocks = reference.n_blocks
        self.cut_bytes: tuple[int, ...] = tuple(
            reference.cut_bytes(c) for c in range(self.n_blocks + 1)
        )
        self._times = {
            d: tuple(
                b.time_ms
                * testbed.devices[d].scale
                * self._whole_factor(d, profiles[d])
                * self._quota_factor(d, profiles[d])
                for b in profiles[d].blocks
            )
            for d in self.devices
        }
        self._prefix = {
            d: tuple(itertools.accumulate(t, initial=0.0)) for d, t in self._times.items()
        }
        self._entry = {
            d: tuple(
                (b.entry_cost_ms if self.overheads.stage_entry else 0.0)
                * testbed.devices[d].scale
                * self._quota_factor(d, profiles[d])
                for b in profiles[d].blocks
            )
            for d in self.devices
        }
        self.param_prefix = tuple(
            itertools.accumulate((b.param_bytes for b in reference.blocks), initial=0)
        )
        self.block_mem_bytes = tuple(b.mem_bytes for b in reference.blocks)
        self._routes: dict[tuple[str, str], Route] = {}
        self.host_cores: tuple[int, ...] = testbed.host_cores or ()
        """Cores of the shared host (empty: devices are machines of their own)."""
        self._core_share: dict[str, dict[int, float]] = {}
        self._helper_share: dict[int, float] = {}
        self._capacity: dict[int, float] = {}
        if self.host_cores:
            for name, dev in testbed.devices.items():
                cores = dev.cores or ()
                self._core_share[name] = {c: 1.0 / len(cores) for c in cores}
            helpers = helper_cores(testbed.devices.values(), self.host_cores) or self.host_cores
            self._helper_share = {c: 1.0 / len(helpers) for c in helpers}
            self._capacity = self._core_capacity()

    def _core_capacity(self) -> dict[int, float]:
        """Share of each host core left to per-request work while requests stream: 1 less the
        waiting shares of the client and forwarder (spread as :meth:`helper_load`) and of the
        source's and sink's workers (spread over their cores), which every plan keeps busy."""
        waiting = dict.fromkeys(self.host_cores, 0.0)
        for core, share in self._helper_share.items():
            waiting[core] += self.overheads.client_wait_share * share
        for device in {self.testbed.source, self.testbed.sink}:
            for core, share in self._core_share.get(device, {}).items():
                waiting[core] += self.overheads.worker_wait_share * share
        return {c: max(1.0 - w, _MIN_CAPACITY) for c, w in waiting.items()}

    def _whole_factor(self, device: str, profile: BlockProfile) -> float:
        """``whole_ms / Σ block medians`` when ``Overheads.whole_model`` is on, else 1.

        Always 1 on a paced device: its workers run a stage's block modules one after another
        (and rest once after them), just as the profiler timed the blocks.
        """
        total = profile.sum_ms
        if not self.overheads.whole_model or total <= 0 or profile.whole_ms <= 0:
            return 1.0
        if self.testbed.devices[device].pace is not None:
            return 1.0
        return profile.whole_ms / total

    def _quota_factor(self, device: str, profile: BlockProfile) -> float:
        """``1 / min(cpu_quota, 1)`` for a CPU-clock profile on a quota-limited device, else 1."""
        quota = self.testbed.devices[device].cpu_quota
        if profile.provenance.get("clock") != "cpu" or quota is None or quota <= 0:
            return 1.0
        return 1.0 / min(quota, 1.0)

    def _check_profiles(self, profiles: Mapping[str, BlockProfile]) -> BlockProfile:
        missing = [d for d in self.devices if d not in profiles]
        if missing:
            raise ProfileError(
                f"no profile for device {missing[0]} of testbed {self.testbed.name}"
            )
        reference = profiles[self.devices[0]]
        for device in self.devices[1:]:
            other = profiles[device]
            same = (
                other.n_blocks == reference.n_blocks
                and other.interior_cut_bytes == reference.interior_cut_bytes
                and other.input_bytes == reference.input_bytes
            )
            if not same:
                raise ProfileError(
                    f"profiles of {reference.model} disagree: device {self.devices[0]} has "
                    f"{reference.n_blocks} blocks (batch {reference.batch_size}), device {device} "
                    f"has {other.n_blocks} (batch {other.batch_size}) or other cut sizes"
                )
        return reference

    # ----- tables shared with the exact solver -------------------------------------------

    def block_ms(self, device: str, block: int) -> float:
        """Predicted time of one block on ``device`` (scale applied)."""
        return self._times[device][block]

    def compute_prefix(self, device: str) -> tuple[float, ...]:
        """``P[c]`` = time of blocks ``0..c-1`` on ``device``; stage compute is
        ``P[b] - P[a] + E[a]`` (:meth:`entry_costs`)."""
        return self._prefix[device]

    def entry_costs(self, device: str) -> tuple[float, ...]:
        """``E[a]``: what a stage on ``device`` that starts at block ``a`` pays for its start."""
        return self._entry[device]

    def compute_ms(self, device: str, start: int, end: int) -> float:
        """Compute of a stage over blocks ``start..end-1``: ``P[end] - P[start] + E[start]``."""
        prefix = self._prefix[device]
        return prefix[end] - prefix[start] + self._entry[device][start]

    def memory(self, start: int, end: int) -> int:
        """Memory of a stage running blocks ``start..end-1`` (same on every device)."""
        params = self.param_prefix[end] - self.param_prefix[start]
        peak = max(self.block_mem_bytes[start:end])
        buffers = self.overheads.buffers * (self.cut_bytes[start] + self.cut_bytes[end])
        return params + peak + buffers

    def fits(self, device: str, memory_bytes: int) -> bool:
        limit = self.testbed.devices[device].memory_bytes
        return limit is None or memory_bytes <= limit

    def route(self, src: str, dst: str) -> Route:
        """The precomputed route between two devices."""
        key = (src, dst)
        found = self._routes.get(key)
        if found is None:
            nodes = tuple(self.testbed.path(src, dst))
            graph = self.testbed.graph()
            hops = tuple(
                (u, v, float(graph.edges[u, v]["link"].mbps)) for u, v in itertools.pairwise(nodes)
            )
            found = Route(
                nodes=nodes,
                hops=hops,
                one_way_ms=sum(graph.edges[u, v]["link"].one_way_ms for u, v, _ in hops),
                mbps=min((m for _, _, m in hops), default=math.inf),
            )
            self._routes[key] = found
        return found

    def transfer_ms(self, nbytes: int, src: str, dst: str) -> float:
        """Predicted time of one transfer (0 when ``src == dst``)."""
        if src == dst:
            return 0.0
        route = self.route(src, dst)
        wire = nbytes * 8 / (route.mbps * 1e3)
        return route.one_way_ms + wire + self.overheads.message_ms + self.overheads.copy_ms(nbytes)

    def link_loads(self, nbytes: int, src: str, dst: str) -> list[tuple[tuple[str, str], float]]:
        """Busy time per link direction of one transfer: ``[((u, v), ms), ...]``."""
        if src == dst:
            return []
        return [((u, v), nbytes * 8 / (mbps * 1e3)) for u, v, mbps in self.route(src, dst).hops]

    def stage_busy(self, device: str, start: int, end: int, *, first: bool, last: bool) -> float:
        """Busy time per request of a stage's device: compute + ``request_ms`` + copies of what
        it moves.

        ``first``/``last`` say whether the stage is the plan's first/last. The source's relaying
        of the input and the sink's of the output are included when they run this stage
        without being the first/last one.
        """
        compute, extra = self._stage_parts(device, start, end, first=first, last=last)
        pace = self.testbed.devices[device].pace
        if pace is not None:
            # a paced device computes for pace x its compute time and rests for the remainder;
            # its runtime's threads work during the rests, so only what overflows them counts
            return max(compute, compute * pace + extra)
        return compute + extra

    def cpu_share(self, device: str) -> float:
        """The share of a core a device's compute keeps busy: ``pace`` when paced,
        ``min(cpu_quota, 1)`` under a quota, 1 otherwise."""
        return self.share_of(self.testbed.devices[device])

    @staticmethod
    def share_of(dev: Device) -> float:
        """:meth:`cpu_share` of a device."""
        if dev.pace is not None:
            return dev.pace
        if dev.cpu_quota is not None and dev.cpu_quota > 0:
            return min(dev.cpu_quota, 1.0)
        return 1.0

    def stage_cpu(self, device: str, start: int, end: int, *, first: bool, last: bool) -> float:
        """CPU time per request of a stage's device: its compute at :meth:`cpu_share`, plus the
        copies of :meth:`stage_busy` and ``request_cpu_ms`` for each stage or relay."""
        request = self.overheads.cpu_per_request_ms
        compute, extra = self._stage_parts(
            device, start, end, first=first, last=last, request=request
        )
        return compute * self.cpu_share(device) + extra

    def idle_cpu(self, device: str) -> float:
        """CPU time of the source or sink when it runs no stage (relaying input/output)."""
        return self.idle_busy(device, request=self.overheads.cpu_per_request_ms)

    def core_load(self, device: str, cpu_ms: float) -> dict[int, float]:
        """``cpu_ms`` of work on ``device`` spread over its cores of the shared host, each
        core's part over that core's capacity (the time it takes there while requests stream)."""
        capacity = self._capacity
        return {
            c: cpu_ms * share / capacity[c]
            for c, share in self._core_share.get(device, {}).items()
        }

    def helper_load(self, ms: float) -> dict[int, float]:
        """``ms`` of the emulation's own work spread over the helper cores (over each core's
        capacity, as :meth:`core_load`)."""
        return {c: ms * share / self._capacity[c] for c, share in self._helper_share.items()}

    def client_cpu_ms(self) -> float:
        """CPU time per request on the helper cores that every plan costs: the client
        (``client_ms``, copying the input out and the output in) and the delay path's
        forwarding of the input and the output between client and testbed (0 unless the
        testbed shares one host)."""
        if not self.host_cores:
            return 0.0
        copy = self.overheads.copy_ms
        first, last = self.cut_bytes[0], self.cut_bytes[-1]
        client = self.overheads.client_ms + copy(first) + copy(last)
        return client + self.forward_cpu_ms(first) + self.forward_cpu_ms(last)

    def forward_cpu_ms(self, nbytes: int) -> float:
        """CPU time of the delay path for one message of ``nbytes`` (0 unless the testbed shares
        one host)."""
        if not self.host_cores:
            return 0.0
        return self.overheads.forward_ms + self.overheads.forward_ms_per_mb * nbytes / 1e6

    def forward_transfer_ms(self, nbytes: int, src: str, dst: str) -> float:
        """CPU time of the delay path for one transfer (0 when ``src == dst``)."""
        return 0.0 if src == dst else self.forward_cpu_ms(nbytes)

    def core_loads(self, plan: Plan) -> dict[int, float]:
        """Busy time per request of each core of the shared host (empty when there is none)."""
        return {core: ms for core, (ms, _) in self._core_work(plan).items()}

    def _core_work(self, plan: Plan) -> dict[int, tuple[float, set[str]]]:
        """Per core of the shared host: busy time per request, and whose work it is (device
        names; ``""`` for the client and forwarder)."""
        if not self.host_cores:
            return {}
        loads = dict.fromkeys(self.host_cores, 0.0)
        owners: dict[int, set[str]] = {c: set() for c in self.host_cores}

        def add(part: Mapping[int, float], owner: str) -> None:
            for core, ms in part.items():
                loads[core] += ms
                if ms > 0:
                    owners[core].add(owner)

        stages = plan.stages
        for i, s in enumerate(stages):
            cpu = self.stage_cpu(s.device, s.start, s.end, first=i == 0, last=i == len(stages) - 1)
            add(self.core_load(s.device, cpu), s.device)
        for d in {self.testbed.source, self.testbed.sink} - set(plan.devices):
            add(self.core_load(d, self.idle_cpu(d)), d)
        helpers = self.client_cpu_ms()
        helpers += sum(
            self.forward_transfer_ms(n, src, dst) for src, dst, n in self.transfers_of(plan)
        )
        add(self.helper_load(helpers), "")
        return {c: (loads[c], owners[c]) for c in self.host_cores}

    def _stage_parts(
        self,
        device: str,
        start: int,
        end: int,
        *,
        first: bool,
        last: bool,
        request: float | None = None,
    ) -> tuple[float, float]:
        """(compute, copies + ``request`` per stage or relay) of a stage, as :meth:`stage_busy`
        counts them (``request`` defaults to ``request_ms``)."""
        copy = self.overheads.copy_ms
        request = self.overheads.request_ms if request is None else request
        source, sink = self.testbed.source, self.testbed.sink
        compute = self.compute_ms(device, start, end)
        extra = request
        if not (first and device == source):
            extra += copy(self.cut_bytes[start])
        if not (last and device == sink):
            extra += copy(self.cut_bytes[end])
        if device == source and not first:  # it also relays the input to the first stage
            extra += copy(self.cut_bytes[0]) + request
        if device == sink and not last:  # and the output from the last one
            extra += copy(self.cut_bytes[self.n_blocks]) + request
        return compute, extra

    def idle_busy(self, device: str, *, request: float | None = None) -> float:
        """Busy time of the source or sink when it runs no stage (relaying input/output), with
        ``request`` (default ``request_ms``) per relay."""
        copy = self.overheads.copy_ms
        request = self.overheads.request_ms if request is None else request
        busy = 0.0
        if device == self.testbed.source:
            busy += copy(self.cut_bytes[0]) + request
        if device == self.testbed.sink:
            busy += copy(self.cut_bytes[self.n_blocks]) + request
        return busy

    def throughput_rps(self, latency_ms: float, bottleneck_ms: float, n_stages: int) -> float:
        """``1000 / max(bottleneck, latency / depth)`` (see the module docstring)."""
        depth = 2 * n_stages if self.depth is None else self.depth
        cycle = bottleneck_ms if depth <= 0 else max(bottleneck_ms, latency_ms / depth)
        return 1000.0 / cycle if cycle > 0 else math.inf

    # ----- evaluation ----------------------------------------------------------------------

    def transfers_of(self, plan: Plan) -> list[tuple[str, str, int]]:
        """``(src, dst, bytes)`` of the plan's transfers in order: input, cuts, output."""
        return plan_transfers(self.testbed, plan, self.cut_bytes)

    def queue_slots(self, plan: Plan) -> int:
        """Stages and relays a request passes through: the plan's stages, and a relay at the
        source or the sink when the plan runs no stage there first or last."""
        devices = plan.devices
        relays = (devices[0] != self.testbed.source) + (devices[-1] != self.testbed.sink)
        return len(plan.stages) + relays

    def evaluate(self, plan: Plan) -> Evaluation:
        """Predict one plan.

        Raises:
            InvalidPlanError: an unknown device or a block range that does not fit the chain.
        """
        plan.check(self.n_blocks, self.devices, model=f"{self.model} ({self.granularity})")
        stages = plan.stages
        k = len(stages)
        source = self.testbed.source
        first_move = source != stages[0].device
        latency = (
            self.transfer_ms(self.cut_bytes[0], source, stages[0].device) if first_move else 0.0
        )
        latency += self.overheads.handoffs_ms(self.cut_bytes[0], self.cut_bytes[-1])
        latency += self.overheads.queue_ms * self.queue_slots(plan)
        costs = []
        for i, stage in enumerate(stages):
            compute = self.compute_ms(stage.device, stage.start, stage.end)
            latency += compute
            costs.append(StageCost(stage.device, stage.start, stage.end, compute))
            nxt = stages[i + 1].device if i + 1 < k else self.testbed.sink
            latency += self.transfer_ms(self.cut_bytes[stage.end], stage.device, nxt)
        bottleneck, bound = self._bottleneck(plan)
        memory = {s.device: self.memory(s.start, s.end) for s in stages}
        throughput = self.throughput_rps(latency, bottleneck, k)
        depth = 2 * k if self.depth is None else self.depth
        if depth > 0 and latency / depth > bottleneck:
            bound = "in flight"
        return Evaluation(
            plan=plan,
            latency_ms=latency,
            throughput_rps=throughput,
            items_per_s=throughput * self.batch_size,
            memory_bytes=memory,
            feasible=all(self.fits(d, m) for d, m in memory.items()),
            stages=tuple(costs),
            transfers=tuple(
                Transfer(src, dst, n, self.transfer_ms(n, src, dst))
                for src, dst, n in self.transfers_of(plan)
            ),
            bound=bound,
        )

    def _bottleneck(self, plan: Plan) -> tuple[float, str]:
        """The largest busy time per request over devices, link directions and shared cores,
        and which it is (the first of equals in that order)."""
        stages = plan.stages
        busy = [
            (
                self.stage_busy(s.device, s.start, s.end, first=i == 0, last=i == len(stages) - 1),
                f"device {s.device}",
            )
            for i, s in enumerate(stages)
        ]
        idle = sorted({self.testbed.source, self.testbed.sink} - set(plan.devices))
        busy += [(self.idle_busy(d), f"device {d}") for d in idle]
        loads: dict[tuple[str, str], float] = {}
        for src, dst, nbytes in self.transfers_of(plan):
            for hop, ms in self.link_loads(nbytes, src, dst):
                loads[hop] = loads.get(hop, 0.0) + ms
        busy += [(ms, f"link {u}->{v}") for (u, v), ms in loads.items()]
        for core, (ms, owners) in self._core_work(plan).items():
            # a core that runs one device's work alone is that device's limit
            alone = len(owners) == 1 and "" not in owners
            busy.append((ms, f"device {next(iter(owners))}" if alone else f"core {core}"))
        ms, label = busy[0]
        for value, name in busy[1:]:
            if value > ms:
                ms, label = value, name
        return ms, label


def plan_transfers(
    testbed: Testbed, plan: Plan, cut_bytes: Sequence[int]
) -> list[tuple[str, str, int]]:
    """``(src, dst, bytes)`` of a plan's transfers between devices, in order: the input from the
    source, the cuts, the output to the sink; ``cut_bytes[c]`` crosses cut ``c`` (0..B)."""
    stages = plan.stages
    moves = [(testbed.source, stages[0].device, cut_bytes[0])]
    moves += [(a.device, b.device, cut_bytes[b.start]) for a, b in itertools.pairwise(stages)]
    moves.append((stages[-1].device, testbed.sink, cut_bytes[-1]))
    return [m for m in moves if m[0] != m[1]]


def load_cost_model(
    model: str,
    testbed: Testbed,
    *,
    batch_size: int = 1,
    profiles_root: str = "profiles",
    granularity: str = "coarse",
    overheads: Overheads | None = None,
    depth: int | None = None,
    backend: str | None = None,
) -> CostModel:
    """Build a cost model from the profile files of every testbed device.

    Each device reads ``profile_path(profiles_root, device.profile, model, batch_size,
    granularity)`` and scales it by ``device.scale``. Without ``overheads``, a ``backend``
    (socket, rpc) selects that runtime's calibration of this testbed
    (``<profiles_root>/overheads/<testbed>-<backend>.json``, :mod:`optisplit.calibrate`) where
    one is stored; otherwise the defaults of :class:`Overheads` apply.

    Raises:
        ProfileError: a missing profile names the device and the file it looked for; a
            calibration file that cannot be read.
    """
    if overheads is None and backend is not None:
        from optisplit.calibrate import calibrated_overheads

        overheads = calibrated_overheads(testbed.name, backend, root=profiles_root)
    loaded: dict[str, BlockProfile] = {}
    profiles: dict[str, BlockProfile] = {}
    for name, device in testbed.devices.items():
        if device.profile not in loaded:
            path = profile_path(profiles_root, device.profile, model, batch_size, granularity)
            if not path.is_file():
                raise ProfileError(
                    f"no profile of {model} (batch {batch_size}, {granularity}) for device "
                    f"{name}: looked for {path} (measure it with 'optisplit profile {model} "
                    f"--device {device.profile} --batch-size {batch_size}')"
                )
            loaded[device.profile] = load_profile(path)
        profiles[name] = loaded[device.profile]
    return CostModel(testbed, profiles, overheads=overheads, depth=depth)
