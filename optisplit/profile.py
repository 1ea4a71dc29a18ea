"""Block profiles: per-device block times, activation and parameter bytes, as files (pure, no torch).

A profile file ``profiles/devices/<device>/<model>-b<batch>.json`` (``-fine`` before ``.json`` at
fine granularity; schema_version 1) holds::

    {"schema_version": 1, "device", "model", "batch_size", "threads", "granularity",
     "input_bytes", "output_bytes",
     "blocks": [{"index", "name", "time_ms", "time_p10_ms", "time_p90_ms",
                 "out_bytes", "param_bytes", "mem_bytes", "entry_ms"}, ...],
     "cuts": [{"index", "name", "bytes"}, ...],      # interior cuts 1..B-1
     "sum_ms", "whole_ms", "provenance": {...}}

``entry_ms`` (optional; ``null`` or absent in older files) is the block's median time when it
starts a stage: run alone after a rest, on a fresh copy of its input, as a pipeline stage runs
when its input arrives from another device (``profiler``). ``time_ms`` is its time in the
middle of the whole chain, right after the block that produced its input.

Cut ``c`` separates blocks ``< c`` from blocks ``>= c``; its bytes are everything that crosses it
(residual branches included), which can differ from the previous block's ``out_bytes``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optisplit._io import atomic_write_text, read_json, write_json
from optisplit.errors import ProfileError

__all__ = [
    "CPU_CLOCK_AGREE",
    "SCHEMA_VERSION",
    "BlockProfile",
    "BlockTiming",
    "cpu_clock_disagreement",
    "load_profile",
    "profile_path",
    "save_profile",
]

SCHEMA_VERSION = 1
CPU_CLOCK_AGREE = 0.10
"""How far apart (``cpu_clock_disagreement``) the CPU-clock profiles of one host's devices may
lie before they are taken again: two devices profiled at the same moment here read within a few
percent of each other."""


@dataclass(frozen=True)
class BlockTiming:
    """One block measured on one device."""

    index: int
    name: str
    time_ms: float
    time_p10_ms: float
    time_p90_ms: float
    out_bytes: int
    param_bytes: int
    mem_bytes: int
    entry_ms: float | None = None
    """Median time when the block starts a stage (after a rest, on a fresh input); None when
    not measured."""

    @property
    def entry_cost_ms(self) -> float:
        """What starting a stage adds to the block's time: ``entry_ms - time_ms``, at least 0
        (0 when not measured)."""
        if self.entry_ms is None:
            return 0.0
        return max(self.entry_ms - self.time_ms, 0.0)


@dataclass(frozen=True)
class BlockProfile:
    """Every block of one model, batch size and granularity, measured on one device."""

    device: str
    model: str
    batch_size: int
    threads: int
    granularity: str
    input_bytes: int
    output_bytes: int
    blocks: tuple[BlockTiming, ...]
    cut_names: tuple[str, ...]
    """Names of the interior cuts 1..B-1 (index 0 of this tuple is cut 1)."""
    interior_cut_bytes: tuple[int, ...]
    """Bytes crossing the interior cuts 1..B-1."""
    whole_ms: float
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.blocks)
        if n == 0:
            raise ProfileError(f"profile of {self.model} on {self.device} has no blocks")
        if len(self.interior_cut_bytes) != n - 1 or len(self.cut_names) != n - 1:
            raise ProfileError(
                f"profile of {self.model} on {self.device}: {n} blocks need {n - 1} cuts, "
                f"got {len(self.interior_cut_bytes)}"
            )

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def sum_ms(self) -> float:
        return float(sum(b.time_ms for b in self.blocks))

    @property
    def wander(self) -> float | None:
        """How far the whole model's median time lies above its 10th percentile, as a fraction
        (None when the provenance lacks it). About 0.01-0.02 for a device that kept its speed;
        a host that slowed down for much of the profile shows more: 0.29 in one profile on this
        VM, whose median then overstated the device's stages by a quarter."""
        p10 = self.provenance.get("whole_p10_ms")
        if not isinstance(p10, (int, float)) or p10 <= 0:
            return None
        return max(self.whole_ms - p10, 0.0) / p10

    def cut_bytes(self, cut: int) -> int:
        """Bytes crossing cut ``cut``: 0 is the input, B the output, 1..B-1 interior."""
        if cut == 0:
            return self.input_bytes
        if cut == self.n_blocks:
            return self.output_bytes
        if not 0 < cut < self.n_blocks:
            raise ProfileError(
                f"cut {cut} is out of range for {self.model} ({self.n_blocks} blocks, cuts 0..{self.n_blocks})"
            )
        return self.interior_cut_bytes[cut - 1]

    def scaled(self, factor: float, device: str) -> BlockProfile:
        """The same profile with every time multiplied by ``factor``, renamed to ``device``."""
        if factor <= 0:
            raise ProfileError(f"scale factor must be positive, got {factor}")
        blocks = tuple(
            dataclasses.replace(
                b,
                time_ms=b.time_ms * factor,
                time_p10_ms=b.time_p10_ms * factor,
                time_p90_ms=b.time_p90_ms * factor,
                entry_ms=None if b.entry_ms is None else b.entry_ms * factor,
            )
            for b in self.blocks
        )
        provenance = {**self.provenance, "scaled_from": self.device, "scale": factor}
        return dataclasses.replace(
            self,
            device=device,
            blocks=blocks,
            whole_ms=self.whole_ms * factor,
            provenance=provenance,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "device": self.device,
            "model": self.model,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "granularity": self.granularity,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "blocks": [dataclasses.asdict(b) for b in self.blocks],
            "cuts": [
                {"index": i + 1, "name": name, "bytes": nbytes}
                for i, (name, nbytes) in enumerate(zip(self.cut_names, self.interior_cut_bytes))
            ],
            "sum_ms": self.sum_ms,
            "whole_ms": self.whole_ms,
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str = "profile") -> BlockProfile:
        """Build from the file form; raises ProfileError naming ``source`` and the bad field."""
        try:
            blocks = tuple(
                BlockTiming(
                    index=int(b["index"]),
                    name=str(b["name"]),
                    time_ms=float(b["time_ms"]),
                    time_p10_ms=float(b["time_p10_ms"]),
                    time_p90_ms=float(b["time_p90_ms"]),
                    out_bytes=int(b["out_bytes"]),
                    param_bytes=int(b["param_bytes"]),
                    mem_bytes=int(b["mem_bytes"]),
                    entry_ms=_optional_ms(b.get("entry_ms")),
                )
                for b in doc["blocks"]
            )
            cuts = sorted(doc["cuts"], key=lambda c: int(c["index"]))
            return cls(
                device=str(doc["device"]),
                model=str(doc["model"]),
                batch_size=int(doc["batch_size"]),
                threads=int(doc["threads"]),
                granularity=str(doc.get("granularity", "coarse")),
                input_bytes=int(doc["input_bytes"]),
                output_bytes=int(doc["output_bytes"]),
                blocks=blocks,
                cut_names=tuple(str(c["name"]) for c in cuts),
                interior_cut_bytes=tuple(int(c["bytes"]) for c in cuts),
                whole_ms=float(doc["whole_ms"]),
                provenance=dict(doc.get("provenance", {})),
            )
        except KeyError as exc:
            raise ProfileError(f"{source}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"{source}: malformed field: {exc}") from None


def _optional_ms(value: Any) -> float | None:
    if value is None:
        return None
    ms = float(value)
    if not ms >= 0 or ms == float("inf"):
        raise ValueError(f"entry_ms must be a time in ms, got {value!r}")
    return ms


def profile_path(
    root: str | os.PathLike[str],
    device: str,
    model: str,
    batch_size: int,
    granularity: str = "coarse",
) -> Path:
    """Where a profile lives under ``root``: ``devices/<device>/<model>-b<batch>.json``.

    Fine-granularity profiles carry a ``-fine`` suffix so both can sit side by side.
    """
    suffix = "" if granularity == "coarse" else f"-{granularity}"
    return Path(root) / "devices" / device / f"{model}-b{batch_size}{suffix}.json"


def cpu_clock_disagreement(profiles: Sequence[BlockProfile]) -> float | None:
    """How far apart the whole model's time lies in CPU-clock profiles of one host's devices:
    slowest over fastest, less 1 (None for fewer than two profiles, or when any was timed on
    another clock).

    The CPU clock times a device's work unpaced, whatever its quota or pace, so the devices of an
    emulated testbed, which all run on this host's silicon, should read alike. A gap marks a
    profile taken while the host ran slow: on this VM one device read 34.4 ms where another, a
    moment later, read 27.0 ms (27 % apart), and the next profile of the first read 26.3 ms.
    """
    if len(profiles) < 2 or any(p.provenance.get("clock") != "cpu" for p in profiles):
        return None
    times = [p.whole_ms for p in profiles]
    return max(times) / min(times) - 1.0 if min(times) > 0 else None


def load_profile(path: str | os.PathLike[str]) -> BlockProfile:
    """Read a profile file; raises ProfileError naming the file and what is wrong."""
    doc = read_json(path, kind="profile", schema_versions=(SCHEMA_VERSION,), error=ProfileError)
    return BlockProfile.from_dict(doc, source=f"profile file {path}")


def save_profile(profile: BlockProfile, path: str | os.PathLike[str]) -> Path:
    """Atomically write the JSON profile and, beside it, the block table as CSV."""
    import pandas as pd  # lazy: keeps the pure core light to import

    target = write_json(path, profile.to_dict())
    table = pd.DataFrame([dataclasses.asdict(b) for b in profile.blocks])
    atomic_write_text(target.with_suffix(".csv"), table.to_csv(index=False))
    return target
