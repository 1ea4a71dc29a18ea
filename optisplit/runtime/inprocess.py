"""The in-process backend: every stage a thread of this process, joined by bounded queues.

No network and no worker processes: the quickest way to check a plan end to end, and the
reference the contract suite holds the socket and RPC backends to. CPU utilisation is per stage
thread (``time.thread_time``); memory is this process's peak resident set.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from optisplit.errors import RuntimeFailure
from optisplit.runtime.base import (
    Backend,
    Deployment,
    ModelSpec,
    Reply,
    StagePlacement,
    StageStats,
)
from optisplit.runtime.stage import ResourceSampler, build_stages, run_stage

if TYPE_CHECKING:
    import torch

__all__ = ["InProcessBackend", "InProcessDeployment"]

Builder = Callable[[ModelSpec, int, int], Any]
_POLL_S = 0.2


class InProcessBackend(Backend):
    """Runs each stage in its own thread of this process.

    Args:
        builder: builds a stage module from (spec, start, end); default: the traced chain.
        queue_depth: capacity of the queue in front of each stage (back-pressure).
    """

    name: ClassVar[str] = "inprocess"

    def __init__(self, *, builder: Builder | None = None, queue_depth: int = 2) -> None:
        self._builder = builder
        self._queue_depth = queue_depth

    def deploy(self, spec: ModelSpec, stages: Sequence[StagePlacement]) -> InProcessDeployment:
        if self._builder is None:
            modules = build_stages(spec, [(s.start, s.end) for s in stages])
        else:
            modules = [self._build(spec, s) for s in stages]
        return InProcessDeployment(tuple(stages), modules, self._queue_depth)

    def _build(self, spec: ModelSpec, stage: StagePlacement) -> Any:
        assert self._builder is not None
        try:
            return self._builder(spec, stage.start, stage.end)
        except RuntimeFailure:
            raise
        except Exception as exc:
            raise RuntimeFailure(f"stage {stage.device} failed to build: {exc}") from exc


class _StageThread(threading.Thread):
    def __init__(
        self,
        placement: StagePlacement,
        module: Any,
        inbox: queue.Queue[Any],
        outbox: queue.Queue[Any],
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"stage-{placement.device}", daemon=True)
        self.placement = placement
        self.module = module
        self.inbox, self.outbox, self.stop = inbox, outbox, stop
        self.cpu_s = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                item = self.inbox.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                self.outbox.put(item)
                continue
            cpu0 = time.thread_time()
            received = time.perf_counter()
            request_id, tensors, stamps = item
            try:
                outputs, begin, end = run_stage(self.module, tensors)
            except Exception as exc:
                self.outbox.put(RuntimeFailure(f"stage {self.placement.device} failed: {exc}"))
                continue
            stamps = (*stamps, received, begin, end, time.perf_counter())
            self.cpu_s += time.thread_time() - cpu0
            self.outbox.put((request_id, outputs, stamps))


class InProcessDeployment(Deployment):
    def __init__(
        self, stages: tuple[StagePlacement, ...], modules: Sequence[Any], queue_depth: int
    ) -> None:
        self.stages = stages
        self._stop = threading.Event()
        queues: list[queue.Queue[Any]] = [queue.Queue(queue_depth) for _ in stages]
        self._sink: queue.Queue[Any] = queue.Queue()
        outs = [*queues[1:], self._sink]
        self._threads = [
            _StageThread(p, m, q, o, self._stop)
            for p, m, q, o in zip(stages, modules, queues, outs)
        ]
        self._source = queues[0]
        self._sampler = ResourceSampler()
        self._wall0 = time.perf_counter()
        for thread in self._threads:
            thread.start()

    def submit(self, request_id: int, inputs: Sequence[torch.Tensor]) -> float:
        sent = time.perf_counter()
        try:
            self._source.put((request_id, tuple(inputs), ()), timeout=60.0)
        except queue.Full:
            raise RuntimeFailure("stage 1 did not accept a request within 60 s") from None
        return sent

    def receive(self, timeout: float) -> Reply:
        try:
            item = self._sink.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeFailure(f"no reply within {timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        request_id, outputs, stamps = item
        return Reply(request_id, outputs, stamps, time.perf_counter())

    def reset_stats(self) -> None:
        self._sampler.reset()
        self._wall0 = time.perf_counter()
        for thread in self._threads:
            thread.cpu_s = 0.0

    def stats(self) -> list[StageStats]:
        _, memory = self._sampler.read()
        wall = max(time.perf_counter() - self._wall0, 1e-9)
        return [
            StageStats(t.placement.device, 100.0 * t.cpu_s / wall, memory) for t in self._threads
        ]

    def close(self) -> None:
        self._stop.set()
        self._sampler.close()
        for thread in self._threads:
            thread.join(timeout=5.0)
