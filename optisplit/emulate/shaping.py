"""What each emulated device pair should see: one-way delay, rate, jitter and loss of its route.

Every ordered device pair gets the testbed route between the two devices: the sum of the hops'
one-way delays (half their RTTs) and jitter, the bottleneck rate, and the combined loss. The
delay path (``delay.py``) applies these per pair, which is exactly the cost model's
transfer formula; contention between pairs that share a hop is not modelled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optisplit.testbed import Testbed

__all__ = ["PathSpec", "has_netem", "pair_paths"]


@dataclass(frozen=True)
class PathSpec:
    """How packets from ``src`` to ``dst`` travel: delay, jitter (ms), rate (Mbit/s), loss (%)."""

    src: str
    dst: str
    one_way_ms: float
    mbps: float
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    @property
    def rtt_ms(self) -> float:
        return 2.0 * self.one_way_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_paths(testbed: Testbed) -> list[PathSpec]:
    """One ``PathSpec`` per ordered pair of distinct devices, from the testbed's routes."""
    paths = []
    names = sorted(testbed.devices)
    for src in names:
        for dst in names:
            if src == dst:
                continue
            hops = testbed.route(src, dst)
            keep = 1.0
            for hop in hops:
                keep *= 1.0 - hop.loss_pct / 100.0
            paths.append(
                PathSpec(
                    src=src,
                    dst=dst,
                    one_way_ms=sum(hop.rtt_ms for hop in hops) / 2.0,
                    mbps=min(hop.mbps for hop in hops),
                    jitter_ms=sum(hop.jitter_ms for hop in hops),
                    loss_pct=100.0 * (1.0 - keep),
                )
            )
    return paths


def has_netem() -> bool:
    """Whether this kernel offers ``sch_netem``, tried on the loopback of a throwaway namespace."""
    tc = shutil.which("tc")
    ip = shutil.which("ip")
    if tc is None or ip is None:
        return False
    probe = f"os-netem-probe-{os.getpid()}"
    made = subprocess.run([ip, "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return False
    try:
        out = subprocess.run(
            [tc, "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
            check=False,
        )
        return out.returncode == 0
    finally:
        subprocess.run([ip, "netns", "delete", probe], capture_output=True, check=False)
