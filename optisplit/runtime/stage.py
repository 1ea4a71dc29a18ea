"""Building a stage's block range from a model spec, running it, and sampling its process."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit.errors import ModelError, RuntimeFailure
from optisplit.pace import PacedBlocks, Pacer, SpeedReference
from optisplit.runtime.base import ModelSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "ResourceSampler",
    "build_stage",
    "build_stages",
    "configure_torch",
    "file_sha256",
    "run_stage",
    "tune_allocator",
]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def configure_torch(threads: int, torch_device: str) -> None:
    """Set up a stage process: ``threads`` intra-op threads; on CUDA, full fp32 (no TF32).

    TF32 would make GPU stages differ from the single-process CPU model beyond the tolerance
    outputs are checked with.
    """
    import torch

    tune_allocator()
    torch.set_num_threads(threads)
    if torch_device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeFailure("--torch-device cuda, but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def tune_allocator() -> bool:
    """Keep freed activation buffers in the heap (glibc), so the next frame's are already mapped.

    Every received frame allocates its tensors; with glibc's defaults a buffer of a few hundred
    KiB is a fresh ``mmap`` whose pages fault in while the bytes arrive, which costs more than
    moving them on loopback. A high mmap and trim threshold make those allocations reuse the
    heap. One arena for all threads: tensors arrive on one thread (an RPC handler thread, the
    socket worker's receiver) and are used and freed on another, and with an arena per thread
    each thread's first frames fault in a heap of its own. Returns whether the setting took
    (False off glibc).
    """
    import ctypes

    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(m_mmap_threshold, 256 << 20)
        and mallopt(m_trim_threshold, 512 << 20)
        and mallopt(m_arena_max, 1)
    )


def build_stage(
    spec: ModelSpec, start: int, end: int, *, torch_device: str = "cpu", pace: float | None = None
) -> torch.nn.Module:
    """The runnable module of blocks ``start .. end-1`` (identity when ``start == end``).

    With ``pace`` (a speed below 1, see :mod:`optisplit.pace`) the blocks run one by one on the
    CPU, each followed by its rest, exactly as the profiler of a paced device times them.

    Raises:
        RuntimeFailure: the weights file does not match its hash, or the range does not fit.
        ModelError: unknown model or factory.
    """
    return build_stages(spec, [(start, end)], torch_device=torch_device, pace=pace)[0]


def build_stages(
    spec: ModelSpec,
    ranges: Sequence[tuple[int, int]],
    *,
    torch_device: str = "cpu",
    pace: float | None = None,
) -> list[Any]:
    """The modules of several block ranges, tracing the model once (see ``build_stage``)."""
    import torch

    if all(start == end for start, end in ranges):
        return [_Relay() for _ in ranges]
    if spec.weights is not None:
        _check_weights(spec.weights, spec.weights_sha256)
    from optisplit.chain import load_chain

    chain = load_chain(
        spec.model,
        batch_size=spec.batch_size,
        granularity=spec.granularity,
        module=spec.module,
        weights=spec.weights,
        seed=spec.seed,
    )
    modules: list[Any] = []
    for start, end in ranges:
        if start == end:
            modules.append(_Relay())
            continue
        if not 0 <= start < end <= chain.n_blocks:
            raise RuntimeFailure(
                f"block range [{start}:{end}] does not fit {spec.model} ({chain.n_blocks} blocks)"
            )
        if pace is not None and torch_device == "cpu":
            blocks = [chain.stage_module(i, i + 1) for i in range(start, end)]
            modules.append(PacedBlocks(blocks, Pacer(pace, SpeedReference.from_env())))
            continue
        module = chain.stage_module(start, end).eval()
        modules.append(module.to(torch.device(torch_device)))
    return modules


def _check_weights(path: str, expected: str | None) -> None:
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise ModelError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    if expected is not None and actual != expected.lower():
        raise RuntimeFailure(
            f"weights file {path} has SHA-256 {actual[:16]}..., expected {expected[:16]}..."
        )


class _Relay:
    """Passes its inputs on unchanged: a source or sink device that runs no blocks."""

    def __call__(self, *tensors: Any) -> tuple[Any, ...]:
        return tuple(tensors)

    def eval(self) -> _Relay:
        return self


def run_stage(
    module: Any, inputs: Sequence[torch.Tensor], torch_device: str = "cpu"
) -> tuple[tuple[torch.Tensor, ...], float, float]:
    """Run one stage; returns its outputs (on the CPU) and the compute start and end times."""
    import torch

    with torch.inference_mode():
        begin = time.perf_counter()
        if torch_device != "cpu":
            inputs = [t.to(torch_device, non_blocking=True) for t in inputs]
        out = module(*inputs)
        outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if torch_device != "cpu":
            outputs = tuple(t.cpu() for t in outputs)
        end = time.perf_counter()
    return outputs, begin, end


class ResourceSampler:
    """CPU utilisation and peak memory of one process over a window, sampled with psutil.

    CPU is the process's user + system time over wall time (100 = one core busy), memory the
    largest resident set size seen by a background sampler (every ``interval_s``).
    """

    def __init__(self, pid: int | None = None, *, interval_s: float = 0.1) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)
        self.reset()
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self._cpu0 = self._cpu_seconds()
            self._wall0 = time.perf_counter()
            self._peak_rss = self._rss()

    def read(self) -> tuple[float, int]:
        """(cpu_percent, peak memory bytes) since the last reset."""
        with self._lock:
            cpu = self._cpu_seconds() - self._cpu0
            wall = max(time.perf_counter() - self._wall0, 1e-9)
            self._peak_rss = max(self._peak_rss, self._rss())
            return 100.0 * cpu / wall, self._peak_rss

    def close(self) -> None:
        self._stop.set()

    def _cpu_seconds(self) -> float:
        import psutil

        try:
            times = self._proc.cpu_times()
        except psutil.Error:  # the process is gone; it uses no more CPU
            return 0.0
        return float(times.user + times.system)

    def _rss(self) -> int:
        import psutil

        try:
            return int(self._proc.memory_info().rss)
        except psutil.Error:  # the process is gone; it holds no memory
            return 0

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            rss = self._rss()
            with self._lock:
                self._peak_rss = max(self._peak_rss, rss)
