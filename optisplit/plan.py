"""Split plans: ordered stages, each a distinct device running a contiguous block range.

Text form: ``DEVICE[START:END] -> DEVICE[START:END]`` with half-open block indices, e.g.
``pi1[0:7] -> gpu[7:19]``. ``Plan.parse(str(plan)) == plan`` for every plan.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from optisplit.errors import InvalidPlanError

__all__ = ["Plan", "Stage"]

_STAGE = re.compile(
    r"^\s*(?P<device>[A-Za-z0-9_.\-]+)\s*\[\s*(?P<start>-?\d+)\s*:\s*(?P<end>-?\d+)\s*\]\s*$"
)


@dataclass(frozen=True, order=True)
class Stage:
    """One pipeline stage: ``device`` runs blocks ``start .. end-1``."""

    device: str
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.device}[{self.start}:{self.end}]"

    @property
    def n_blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """k >= 1 stages covering blocks ``0 .. B-1`` in order, each on a distinct device."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise InvalidPlanError("a plan needs at least one stage")
        seen: set[str] = set()
        for stage in self.stages:
            if stage.device in seen:
                raise InvalidPlanError(f"device {stage.device!r} appears twice in plan {self}")
            seen.add(stage.device)
            if stage.start < 0 or stage.end <= stage.start:
                raise InvalidPlanError(
                    f"stage {stage} must have 0 <= start < end (it runs no blocks)"
                )
        if self.stages[0].start != 0:
            raise InvalidPlanError(
                f"plan {self} must start at block 0 (first stage starts at {self.stages[0].start})"
            )
        for prev, nxt in zip(self.stages, self.stages[1:]):
            if nxt.start > prev.end:
                raise InvalidPlanError(
                    f"gap in plan {self}: blocks {prev.end}..{nxt.start - 1} run nowhere"
                )
            if nxt.start < prev.end:
                raise InvalidPlanError(
                    f"overlap in plan {self}: blocks {nxt.start}..{prev.end - 1} run twice"
                )

    def __str__(self) -> str:
        return " -> ".join(str(s) for s in self.stages)

    @classmethod
    def parse(cls, text: str) -> Plan:
        """Parse the text form; raises InvalidPlanError with the offending part."""
        parts = [p for p in text.split("->")]
        stages = []
        for part in parts:
            match = _STAGE.match(part)
            if match is None:
                raise InvalidPlanError(
                    f"cannot parse stage {part.strip()!r} in plan {text.strip()!r}; "
                    "expected DEVICE[START:END], e.g. 'pi1[0:7] -> gpu[7:19]'"
                )
            stages.append(Stage(match["device"], int(match["start"]), int(match["end"])))
        return cls(tuple(stages))

    @classmethod
    def from_cuts(cls, devices: Sequence[str], cuts: Sequence[int], n_blocks: int) -> Plan:
        """Build a plan from its devices in order and the k-1 interior cuts."""
        bounds = [0, *cuts, n_blocks]
        if len(devices) != len(bounds) - 1:
            raise InvalidPlanError(
                f"{len(devices)} devices need {len(devices) - 1} cuts, got {len(cuts)}"
            )
        return cls(tuple(Stage(d, a, b) for d, a, b in zip(devices, bounds, bounds[1:])))

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self.stages)

    @property
    def cuts(self) -> tuple[int, ...]:
        """The interior cut indices (block index where each stage after the first begins)."""
        return tuple(s.start for s in self.stages[1:])

    @property
    def n_blocks(self) -> int:
        return self.stages[-1].end

    def check(self, n_blocks: int, devices: Iterable[str], *, model: str = "the model") -> None:
        """Check the plan against a chain of ``n_blocks`` blocks and the known device names.

        Raises:
            InvalidPlanError: an unknown device or an index out of range, with the numbers.
        """
        known = set(devices)
        for stage in self.stages:
            if stage.device not in known:
                raise InvalidPlanError(
                    f"unknown device {stage.device!r} in plan {self}; "
                    f"the testbed has {', '.join(sorted(known))}"
                )
        if self.n_blocks != n_blocks:
            raise InvalidPlanError(
                f"plan {self} ends at block {self.n_blocks}, but {model} has {n_blocks} blocks "
                f"(the last stage must end at {n_blocks}; cuts 1..{n_blocks - 1})"
            )
