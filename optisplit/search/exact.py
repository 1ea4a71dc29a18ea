"""The exact latency-throughput Pareto front over every feasible plan (pure: numpy, no torch).

Algorithm: a bi-objective label-setting dynamic program over states ``(S, d, c)`` — the set
``S`` of devices used so far, the device ``d`` of the last stage, and the cut ``c`` where that
stage ends (multi-objective DP over resource-constrained paths, Martins 1984; for chain
partitions it is the (cut, devices used, last device) DP of PipeEdge, Hu et al. 2022, with every
non-dominated label kept instead of only the best, which is what Alpa's inter-operator pass
obtains with its sweep over a bound on the slowest stage, Zheng et al. 2022). A label of a state
is a partial plan summarised by

* ``L``: its latency so far (the input transfer, stage computes and cut transfers),
* ``C``: the largest busy time of every resource it has already settled, and
* ``V``: the busy time accumulated so far on the *open* link directions (below).

Every continuation of two labels of one state adds the same latency and the same busy times, and
the throughput of a complete plan, ``1000 / max(bottleneck, latency / depth(k))``, falls as
latency or any busy time grows (``k = |S|`` is fixed by the state). So a label whose
``(L, C, V)`` is no better in every component than another label of its state is dropped without
losing any front point: the DP is exact, not a heuristic. Stages that do not fit their device's
memory are never built, so only feasible plans are compared.

Settled and open resources. A device's busy time per request is fixed once its stage is placed
(the stage's compute and copies; the source's sending of the input and the sink's receiving of
the output are added to their stage, or at the end when they run none). A link direction that at
most one transfer of any plan can cross is settled with that transfer. The source's uplink in a
star (every transfer the source sends crosses it) carries the input and the source's own cut;
since both byte counts are known when the source's stage is placed, it is settled there, and
likewise the sink's downlink. Any other link direction that two transfers of one plan may share
(a trunk between switches, a device forwarding traffic) is *open*: its running sum is part of
the label and compared component-wise, so the bottleneck stays the exact sum over the transfers.
On a single-host testbed every core of the host is open too (``CostModel.core_loads``): each
stage adds its device's CPU time to the device's cores, each transfer its forwarding cost to the
helper cores, and the label carries the running sums.

Bounding (branch and bound on top of the DP). Device sets are visited by size, so short plans
complete first. A label is dropped when a complete plan already found has a latency no higher
than the label's latency lower bound (the remaining blocks each on its fastest device, plus the
cheapest transfer away) and a throughput no lower than the label's throughput upper bound (its
busy times can only grow). Such a label can only produce dominated or equal points.

Complexity: ``O(2^n · n² · B² · F)`` for ``n`` devices, ``B`` blocks and ``F`` labels per state;
the inner ``B²`` work runs as numpy array operations, and rows of one end cut are ordered once
(the latency at end ``b`` of a stage starting at ``c`` is ``L - P[c] + P[b]``). Objectives are
exact up to floating-point rounding (front points are compared at 12 significant digits). Tied
plans keep one representative (``optisplit.pareto``). ``budget`` is ignored. ``evaluations``
counts the complete plans whose objectives the DP computed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from optisplit.errors import SearchError
from optisplit.pareto import objective_key, pareto_front
from optisplit.plan import Plan
from optisplit.search.base import Engine, SearchResult

if TYPE_CHECKING:
    from optisplit.cost import CostModel, Evaluation

__all__ = ["ExactEngine", "exact_front"]

_F = np.float64
_MAX_DEVICES = 16
_BANDS = 8


class ExactEngine(Engine):
    """The exact Pareto front by dynamic programming (see the module docstring)."""

    name: ClassVar[str] = "exact"

    def run(
        self,
        model: CostModel,
        *,
        budget: int | None = None,
        seed: int = 0,
        on_evaluate: Callable[[Evaluation], None] | None = None,
    ) -> SearchResult:
        start = time.perf_counter()
        plans, scored = _Solver(model).solve()
        evaluations = []
        for plan, latency, throughput in plans:
            evaluation = model.evaluate(plan)
            _check(evaluation, latency, throughput)
            evaluations.append(evaluation)
            if on_evaluate is not None:
                on_evaluate(evaluation)
        front = pareto_front(evaluations)
        return SearchResult(self.name, front, scored, time.perf_counter() - start)


def exact_front(model: CostModel) -> list[Evaluation]:
    """The exact front of ``model`` (``ExactEngine().run(model).front``)."""
    return ExactEngine().run(model).front


@dataclass(frozen=True)
class _Hop:
    """How a link direction's busy time is accounted: settled, attributed, or open."""

    kind: str  # "direct" | "send" | "recv" | "open"
    mbps: float
    owner: int = -1  # device index for send/recv
    slot: int = -1  # component of V for open


class _Solver:
    """Tables and the DP for one cost model."""

    def __init__(self, model: CostModel) -> None:
        self.model = model
        self.devices = model.devices
        self.n = len(self.devices)
        if self.n > _MAX_DEVICES:
            raise SearchError(
                f"the exact search visits every subset of the {self.n} devices of "
                f"{model.testbed.name} (2^{self.n}); use it up to {_MAX_DEVICES} devices, "
                "or the nsga2 or optuna engine"
            )
        self.B = model.n_blocks
        self.s = self.devices.index(model.testbed.source)
        self.t = self.devices.index(model.testbed.sink)
        self.queue = model.overheads.queue_ms
        self.handoffs = model.overheads.handoffs_ms(model.cut_bytes[0], model.cut_bytes[-1])
        self.cb = np.array(model.cut_bytes, dtype=_F)
        self.hops = self._classify()
        self.m_links = sum(1 for h in self.hops.values() if h.kind == "open")
        self.cores = model.host_cores
        self.m = self.m_links + len(self.cores)
        self._core_tables()
        self.prefix = [np.array(model.compute_prefix(d), dtype=_F) for d in self.devices]
        # a stage from cut c to b computes P[b] - S[c], with S[c] = P[c] - E[c] (its start)
        self.begin = [
            p - np.append(np.array(model.entry_costs(d), dtype=_F), 0.0)
            for p, d in zip(self.prefix, self.devices)
        ]
        self.memory = self._memory_matrix()
        self.stage = [self._stage_matrix(i) for i in range(self.n)]
        self._transfer_tables()
        self.rest_ms = self._rest_tables()

    # ----- link classification --------------------------------------------------------------

    def _route_hops(self, u: int, v: int) -> list[tuple[tuple[str, str], float]]:
        route = self.model.route(self.devices[u], self.devices[v])
        return [((a, b), mbps) for a, b, mbps in route.hops]

    def _classify(self) -> dict[tuple[str, str], _Hop]:
        uses: dict[tuple[str, str], list[tuple[int, int]]] = {}
        mbps: dict[tuple[str, str], float] = {}
        for u, v in itertools.permutations(range(self.n), 2):
            for hop, rate in self._route_hops(u, v):
                uses.setdefault(hop, []).append((u, v))
                mbps[hop] = rate
        result: dict[tuple[str, str], _Hop] = {}
        self.open_pairs: list[list[tuple[int, int]]] = []
        slots = 0
        for hop, pairs in sorted(uses.items()):
            if not self._shared(pairs):
                result[hop] = _Hop("direct", mbps[hop])
            elif self._covers(pairs, sender=True):
                result[hop] = _Hop("send", mbps[hop], owner=pairs[0][0])
            elif self._covers(pairs, sender=False):
                result[hop] = _Hop("recv", mbps[hop], owner=pairs[0][1])
            else:
                result[hop] = _Hop("open", mbps[hop], slot=slots)
                self.open_pairs.append(pairs)
                slots += 1
        return result

    def _shared(self, pairs: list[tuple[int, int]]) -> bool:
        """Whether two transfers of one plan may both use a link used by ``pairs``.

        A device sends at most once except the source (input and its own stage), and receives at
        most once except the sink; the pair (source, sink) may carry both input and output.
        """
        s, t = self.s, self.t
        if s != t and (s, t) in pairs:
            return True
        for (u1, v1), (u2, v2) in itertools.combinations(pairs, 2):
            if not ((u1 == u2 and u1 != s) or (v1 == v2 and v1 != t)):
                return True
        return False

    def _covers(self, pairs: list[tuple[int, int]], *, sender: bool) -> bool:
        """All pairs share one sender (receiver) and every route from (to) it uses the link."""
        ends = {p[0] if sender else p[1] for p in pairs}
        if len(ends) != 1:
            return False
        end = ends.pop()
        want = {(end, v) if sender else (v, end) for v in range(self.n) if v != end}
        return want <= set(pairs)

    # ----- tables ---------------------------------------------------------------------------

    def _attributed(self, d: int) -> list[tuple[str, float]]:
        """``(kind, mbps)`` of the link directions settled with device ``d``'s stage."""
        return [
            (hop.kind, hop.mbps)
            for hop in self.hops.values()
            if hop.kind in ("send", "recv") and hop.owner == d
        ]

    def _stage_matrix(self, d: int) -> np.ndarray:
        """``Q[a, b]``: settled busy time of a stage on ``d`` over blocks ``a..b-1``; inf if invalid.

        Device busy times and memory come from the cost model itself (``stage_busy``,
        ``memory``), so the DP cannot drift from ``CostModel.evaluate``.
        """
        B, model = self.B, self.model
        name = self.devices[d]
        limit = model.testbed.devices[name].memory_bytes
        attributed = self._attributed(d)
        q = np.full((B + 1, B + 1), np.inf)
        ends = np.arange(B + 1)
        for a in range(B):
            b = ends[a + 1 :]
            busy = np.array(
                [
                    model.stage_busy(name, a, e, first=a == 0, last=e == B)
                    for e in range(a + 1, B + 1)
                ]
            )
            for kind, mbps in attributed:
                busy = np.maximum(busy, self._attributed_load(kind, mbps, a, b))
            if limit is not None:
                busy = np.where(self.memory[a, a + 1 :] <= limit, busy, np.inf)
            q[a, a + 1 :] = busy
        return q

    def _attributed_load(self, kind: str, mbps: float, a: int, b: np.ndarray) -> np.ndarray:
        cb, B = self.cb, self.B
        wire = cb * 8 / (mbps * 1e3)
        if kind == "send":  # the source's uplink: the input (when not first), then its own send
            first = wire[0] if a > 0 else 0.0
            return first + np.where((b == B) & (self.s == self.t), 0.0, wire[b])
        received = wire[a] if (a > 0 or self.t != self.s) else 0.0
        return received + np.where(b < B, wire[B], 0.0)

    def _memory_matrix(self) -> np.ndarray:
        """``M[a, b]``: memory of a stage over blocks ``a..b-1`` (``CostModel.memory``)."""
        B = self.B
        memory = np.zeros((B + 1, B + 1), dtype=np.int64)
        for a in range(B):
            memory[a, a + 1 :] = [self.model.memory(a, b) for b in range(a + 1, B + 1)]
        return memory

    def _core_tables(self) -> None:
        """Per device, its share of each host core (``share``), its stages' CPU time
        (``cpu[d][a, b]``), and the load every plan puts on the cores (``base``: the client and
        the forwarding of the input and the output)."""
        model, B, k = self.model, self.B, len(self.cores)
        self.share = np.zeros((self.n, k))
        self.helper = np.zeros(k)
        self.cpu: list[np.ndarray] = []
        self.base = np.zeros(k)
        if not k:
            return
        index = {c: i for i, c in enumerate(self.cores)}
        for d, name in enumerate(self.devices):
            for core, ms in model.core_load(name, 1.0).items():
                self.share[d, index[core]] = ms
            cpu = np.zeros((B + 1, B + 1))
            for a in range(B):
                cpu[a, a + 1 :] = [
                    model.stage_cpu(name, a, e, first=a == 0, last=e == B)
                    for e in range(a + 1, B + 1)
                ]
            self.cpu.append(cpu)
        for core, ms in model.helper_load(1.0).items():
            self.helper[index[core]] = ms
        self.base = model.client_cpu_ms() * self.helper

    def _transfer_tables(self) -> None:
        """Per (sender, receiver, cut): time, settled link load, open link loads."""
        n, B, m = self.n, self.B, self.m
        self.t_ms = np.zeros((n, n, B + 1))
        self.t_settled = np.zeros((n, n, B + 1))
        self.t_open = np.zeros((n, n, B + 1, m))
        for u, v in itertools.permutations(range(n), 2):
            for c in range(B + 1):
                self._fill(u, v, c)

    def _fill(self, u: int, v: int, c: int) -> None:
        nbytes = int(self.model.cut_bytes[c])
        src, dst = self.devices[u], self.devices[v]
        self.t_ms[u, v, c] = self.model.transfer_ms(nbytes, src, dst)
        for hop, ms in self.model.link_loads(nbytes, src, dst):
            kind = self.hops[hop]
            if kind.kind == "direct":
                self.t_settled[u, v, c] = max(self.t_settled[u, v, c], ms)
            elif kind.kind == "open":
                self.t_open[u, v, c, kind.slot] += ms
        if self.cores:
            self.t_open[u, v, c, self.m_links :] += (
                self.model.forward_transfer_ms(nbytes, src, dst) * self.helper
            )

    def _rest_tables(self) -> list[np.ndarray]:
        """``R[d][c]``: a lower bound of the latency still to come after a stage on ``d`` ends
        at cut ``c``: the remaining blocks each at its fastest device, plus the cheapest
        transfer of cut ``c`` away from ``d``."""
        times = np.array([np.diff(p) for p in self.prefix])
        fastest = times.min(axis=0)
        remaining = np.concatenate([np.cumsum(fastest[::-1])[::-1], [0.0]])
        self.remaining = remaining
        self.cheapest = [q.min(axis=1) for q in self.stage]
        tables = []
        for d in range(self.n):
            away = np.full(self.B + 1, np.inf)
            for v in range(self.n):
                if v != d:
                    away = np.minimum(away, self.t_ms[d, v])
            away[self.B] = 0.0
            tables.append(remaining + np.where(np.isfinite(away), away, 0.0))
        return tables

    def _idle(self, mask: int) -> float:
        """Settled busy of the source/sink when they run no stage, and their attributed links."""
        busy = 0.0
        for d in {self.s, self.t}:
            if mask >> d & 1:
                continue
            busy = max(busy, self.model.idle_busy(self.devices[d]))
            for kind, mbps in self._attributed(d):
                nbytes = self.cb[0] if kind == "send" else self.cb[self.B]
                busy = max(busy, float(nbytes * 8 / (mbps * 1e3)))
        return busy

    # ----- the dynamic program --------------------------------------------------------------

    def solve(self) -> tuple[list[tuple[Plan, float, float]], int]:
        """Candidate front plans with their latency and throughput, and the plans scored.

        Device sets are visited by size, so single-device and short plans complete first; a
        label whose best possible completion (latency lower bound, throughput upper bound) is
        already matched by a complete plan is dropped.
        """
        store = _Store()
        finals: list[np.ndarray] = []
        labels: dict[tuple[int, int], np.ndarray] = {}
        incumbents = _Incumbents()
        for mask in sorted(range(1, 1 << self.n), key=lambda m: (bin(m).count("1"), m)):
            for d in range(self.n):
                if not mask >> d & 1:
                    continue
                rows = self._sources(mask ^ (1 << d), d, labels)
                if rows is None:
                    continue
                rows = rows[~incumbents.beaten(*self._start_bounds(rows, d))]
                if rows.shape[0] == 0:
                    continue
                rows = self._close(rows, mask, d)
                new = self._extend(rows, d, store)
                done = new[:, 0] == self.B
                if done.any():
                    finals.append(self._finish(new[done], mask, d))
                    incumbents.add(finals[-1])
                rest = new[~done]
                labels[(mask, d)] = rest[~incumbents.beaten(*self._bounds(rest, d))]
        if not finals:
            return [], 0
        table = np.concatenate(finals)
        picked = [
            (self._plan(store, int(table[i, 2])), float(table[i, 0]), float(table[i, 1]))
            for i in _candidates(table)
        ]
        return picked, int(table.shape[0])

    def _bounds(self, rows: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Lower bound of the final latency and upper bound of the throughput of each label."""
        cut = rows[:, 0].astype(np.intp)
        return self._limits(rows, rows[:, 1] + self.rest_ms[d][cut], rows[:, 2])

    def _start_bounds(self, rows: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
        """The same bounds for rows about to start a stage on ``d``: at least its cheapest stage."""
        cut = rows[:, 0].astype(np.intp)
        latency = rows[:, 1] + self.remaining[cut]
        return self._limits(rows, latency, np.maximum(rows[:, 2], self.cheapest[d][cut]))

    def _limits(
        self, rows: np.ndarray, latency: np.ndarray, bottleneck: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.m:
            bottleneck = np.maximum(bottleneck, rows[:, 4:].max(axis=1, initial=0.0))
        depth = 2 * self.n if self.model.depth is None else self.model.depth
        if depth > 0:
            bottleneck = np.maximum(bottleneck, latency / depth)
        with np.errstate(divide="ignore"):
            return latency, 1000.0 / bottleneck

    def _sources(
        self, prev: int, d: int, labels: dict[tuple[int, int], np.ndarray]
    ) -> np.ndarray | None:
        """Rows ``[c, L, C, gid, V...]`` ready to start a stage on ``d`` at cut ``c``."""
        if prev == 0:
            root = np.zeros((1, 4 + self.m))
            root[0, 3] = -1
            root[0, 4 + self.m_links :] = self.base
            start = self._hand_over(root, self.s, d, first=True)
            # as CostModel.evaluate adds them: the hand-offs, and a relay at the source
            start[:, 1] += self.handoffs + self.queue * (d != self.s)
            return start
        parts = []
        for p in range(self.n):
            arr = labels.get((prev, p)) if prev >> p & 1 else None
            if arr is not None and arr.shape[0]:
                parts.append(self._hand_over(arr, p, d, first=False))
        return np.concatenate(parts) if parts else None

    def _hand_over(self, arr: np.ndarray, p: int, d: int, *, first: bool) -> np.ndarray:
        out = arr.copy()
        c = arr[:, 0].astype(np.intp)
        if first and p == d:
            return out
        out[:, 1] = arr[:, 1] + self.t_ms[p, d, c]
        out[:, 2] = np.maximum(arr[:, 2], self.t_settled[p, d, c])
        if self.m:
            out[:, 4:] = arr[:, 4:] + self.t_open[p, d, c]
        return out

    def _close(self, rows: np.ndarray, mask: int, d: int) -> np.ndarray:
        """Fold open link loads that no continuation of ``(mask, d)`` can add to into ``C``.

        After a stage on ``d``, transfers go from ``d`` or an unused device to an unused device
        or the sink; an open link no such pair is routed through is settled from then on.
        """
        if self.m_links == 0:
            return rows
        rest = [v for v in range(self.n) if not mask >> v & 1]
        senders, receivers = {d, *rest}, {*rest, self.t}
        closed = [
            slot
            for slot, pairs in enumerate(self.open_pairs)
            if not any(u in senders and v in receivers for u, v in pairs)
        ]
        if not closed:
            return rows
        cols = [4 + slot for slot in closed]
        rows = rows.copy()
        rows[:, 2] = np.maximum(rows[:, 2], rows[:, cols].max(axis=1))
        rows[:, cols] = 0.0
        return rows

    def _extend(self, rows: np.ndarray, d: int, store: _Store) -> np.ndarray:
        """Every stage on ``d`` from each row's cut to every later cut; non-dominated labels.

        The latency at end cut ``b`` of a row starting at ``c`` is ``(L - S[c]) + P[b]``, so
        one ordering of the rows by ``L - S[c]`` is the latency order of every column.
        """
        prefix, begin = self.prefix[d], self.begin[d]
        still_open = bool(self.cores) or (self.m > 0 and bool(np.any(rows[:, 4:] > 0)))
        if not still_open:
            rows = rows[_same_cut_front(rows)]
        start = rows[:, 0].astype(np.intp)
        rows = rows[np.lexsort((rows[:, 2], rows[:, 1] - begin[start]))]
        c = rows[:, 0].astype(np.intp)
        parts = [self._columns(rows, c, d, lo, hi, still_open) for lo, hi in self._bands(c)]
        src = np.concatenate([p[0] for p in parts])
        end = np.concatenate([p[1] for p in parts])
        settled = np.concatenate([p[2] for p in parts])
        new = np.empty((src.shape[0], 4 + self.m))
        new[:, 0] = end
        new[:, 1] = rows[src, 1] + (prefix[end] - begin[c[src]]) + self.queue
        new[:, 2] = settled
        new[:, 3] = store.add(rows[src, 3], d, c[src], end)
        new[:, 4:] = rows[src, 4:]
        if self.cores:
            new[:, 4 + self.m_links :] += self.cpu[d][c[src], end][:, None] * self.share[d]
        return new

    def _bands(self, c: np.ndarray) -> list[tuple[int, int]]:
        """Bands of end cuts; a band needs only the rows that start before its last cut."""
        lo = int(c.min()) + 1
        edges = np.unique(np.linspace(lo, self.B + 1, _BANDS + 1).astype(int))
        return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]

    def _columns(
        self, rows: np.ndarray, c: np.ndarray, d: int, lo: int, hi: int, still_open: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kept ``(row, end cut, settled busy)`` for end cuts ``lo .. hi-1``."""
        use = np.nonzero(c < hi - 1)[0]
        settled = np.maximum(rows[use, 2:3], self.stage[d][c[use], lo:hi])
        if still_open:
            loads = np.repeat(rows[use, None, 4:], hi - lo, axis=1)
            if self.cores:  # the stage's CPU time on its device's cores, per end cut
                cpu = self.cpu[d][c[use], lo:hi]
                loads[:, :, self.m_links :] += cpu[:, :, None] * self.share[d]
            src, col = _filter_nd(settled, loads)
        else:
            src, col = _filter_2d(settled)
        return use[src], col + lo, settled[src, col]

    def _finish(self, rows: np.ndarray, mask: int, d: int) -> np.ndarray:
        """Complete plans: ``[latency, throughput, gid]`` after the output transfer."""
        B = self.B
        latency = rows[:, 1] + self.t_ms[d, self.t, B] + self.queue * (d != self.t)
        settled = np.maximum(rows[:, 2], max(self.t_settled[d, self.t, B], self._idle(mask)))
        bottleneck = settled
        if self.m:
            opened = rows[:, 4:] + self.t_open[d, self.t, B]
            if self.cores:  # the source and sink relay even when they run no stage
                for idle in {self.s, self.t}:
                    if not mask >> idle & 1:
                        relay = self.model.idle_cpu(self.devices[idle])
                        opened[:, self.m_links :] += relay * self.share[idle]
            bottleneck = np.maximum(settled, opened.max(axis=1))
        k = bin(mask).count("1")
        rate = self.model.throughput_rps
        throughput = [rate(float(x), float(y), k) for x, y in zip(latency, bottleneck)]
        return np.column_stack([latency, np.array(throughput, dtype=_F), rows[:, 3]])

    def _plan(self, store: _Store, gid: int) -> Plan:
        stages = []
        while gid >= 0:
            parent, d, start, end = store.get(gid)
            stages.append((self.devices[d], start, end))
            gid = parent
        stages.reverse()
        return Plan.from_cuts([s[0] for s in stages], [s[1] for s in stages[1:]], self.B)


class _Incumbents:
    """The front of the complete plans found so far, for bounding."""

    def __init__(self) -> None:
        self.latency = np.empty(0)
        self.throughput = np.empty(0)

    def add(self, table: np.ndarray) -> None:
        latency = np.concatenate([self.latency, table[:, 0]])
        throughput = np.concatenate([self.throughput, table[:, 1]])
        order = np.lexsort((-throughput, latency))
        latency, throughput = latency[order], throughput[order]
        best = np.maximum.accumulate(throughput)
        keep = np.ones(latency.shape[0], dtype=bool)
        keep[1:] = throughput[1:] > best[:-1]
        self.latency, self.throughput = latency[keep], throughput[keep]

    def beaten(self, latency: np.ndarray, throughput: np.ndarray) -> np.ndarray:
        """Which (latency lower bound, throughput upper bound) a known plan already matches."""
        if self.latency.shape[0] == 0:
            return np.zeros(latency.shape[0], dtype=bool)
        i = np.searchsorted(self.latency, latency, side="right") - 1
        found = self.throughput[np.maximum(i, 0)]
        return (i >= 0) & (found >= throughput)


class _Store:
    """Back-pointers of every kept label: parent label, device, stage start and end."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._size = 0
        self._flat: np.ndarray | None = None

    def add(self, parents: np.ndarray, d: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        count = parents.shape[0]
        chunk = np.column_stack([parents, np.full(count, d), starts, ends]).astype(np.int64)
        self._chunks.append(chunk)
        gids = np.arange(self._size, self._size + count, dtype=_F)
        self._size += count
        self._flat = None
        return gids

    def get(self, gid: int) -> tuple[int, int, int, int]:
        if self._flat is None:
            self._flat = np.concatenate(self._chunks)
        row = self._flat[gid]
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def _same_cut_front(rows: np.ndarray) -> np.ndarray:
    """Indices of the rows not dominated in (latency, settled busy) by a row at the same cut.

    A segmented running minimum done exactly on integers: settled busy times become their
    ranks, and each cut's group is offset above every later group.
    """
    order = np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))
    cut = rows[order, 0]
    _, rank = np.unique(rows[order, 2], return_inverse=True)
    group = np.concatenate([[0], np.cumsum(cut[1:] != cut[:-1])])
    size = rank.shape[0] + 1
    key = rank.astype(np.int64) + (int(group[-1]) - group).astype(np.int64) * size
    best = np.minimum.accumulate(key)
    keep = np.ones(key.shape[0], dtype=bool)
    keep[1:] = key[1:] < best[:-1]
    return np.asarray(order[keep])


def _filter_2d(settled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column (end cut), the rows (in latency order) with a new lowest settled busy time.

    Invalid entries are ``inf`` and never kept.
    """
    best = np.minimum.accumulate(settled, axis=0)
    keep = np.empty(settled.shape, dtype=bool)
    keep[0] = np.isfinite(settled[0])
    np.less(settled[1:], best[:-1], out=keep[1:])
    rows, ends = np.nonzero(keep)
    return rows, ends


def _filter_nd(settled: np.ndarray, opened: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column, rows (in latency order) not dominated in settled busy and open loads
    (``opened[row, column]``: the row's open loads at that end cut).

    The first surviving row of a column is never dominated (dominance is transitive), so it
    is kept and every row it dominates is dropped; one round per kept label, all columns at
    once.
    """
    alive = np.isfinite(settled)
    cols = np.nonzero(alive.any(axis=0))[0]
    rows = np.nonzero(alive.any(axis=1))[0]
    alive = alive[np.ix_(rows, cols)]
    busy, loads = settled[np.ix_(rows, cols)], opened[np.ix_(rows, cols)]
    srcs, ends = [], []
    while cols.shape[0]:
        first = np.argmax(alive, axis=0)
        srcs.append(rows[first])
        ends.append(cols)
        span = np.arange(cols.shape[0])
        worse = busy >= busy[first, span][None, :]
        worse &= np.all(loads >= loads[first, span][None, :, :], axis=2)
        alive &= ~worse
        live = alive.any(axis=0)
        cols, alive, busy, loads = cols[live], alive[:, live], busy[:, live], loads[:, live]
    if not srcs:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.intp)
    return np.concatenate(srcs).astype(np.intp), np.concatenate(ends).astype(np.intp)


def _candidates(table: np.ndarray) -> list[int]:
    """Rows of ``table`` on its front (ties included), at ``objective_key`` precision."""
    keys = [(objective_key(float(lat)), -objective_key(float(thr))) for lat, thr, _ in table]
    chosen: list[int] = []
    best: tuple[float, float] | None = None
    for i in sorted(range(len(keys)), key=keys.__getitem__):
        key = keys[i]
        if best is None or -key[1] > -best[1] or key == best:
            chosen.append(i)
            best = key
    return chosen


def _check(evaluation: Evaluation, latency_ms: float, throughput_rps: float) -> None:
    """The DP's objectives of a plan must be the cost model's, or the front is not exact."""
    if not (
        math.isclose(evaluation.latency_ms, latency_ms, rel_tol=1e-9, abs_tol=1e-9)
        and math.isclose(evaluation.throughput_rps, throughput_rps, rel_tol=1e-9)
    ):
        raise SearchError(
            f"the exact search and the cost model disagree on {evaluation.plan}: latency "
            f"{latency_ms} vs {evaluation.latency_ms} ms, throughput {throughput_rps} vs "
            f"{evaluation.throughput_rps}/s (optisplit/search/exact.py must mirror "
            "CostModel.evaluate)"
        )
