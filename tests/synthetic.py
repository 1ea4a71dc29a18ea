"""Synthetic block profiles, testbeds and cost models for tests (no torch, no measured files).

``synthetic_profile`` makes a chain with chosen or random per-block times and cut sizes;
``random_testbed`` makes a testbed of random devices and links (optionally behind switches, with
memory limits); ``write_profiles`` writes profile files so that ``load_cost_model`` and the CLI
find them under a temporary root.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from optisplit.cost import CostModel, Overheads
from optisplit.plan import Plan
from optisplit.profile import BlockProfile, BlockTiming, profile_path, save_profile
from optisplit.testbed import Device, Link, Testbed

__all__ = [
    "all_plans",
    "random_cost_model",
    "random_testbed",
    "synthetic_profile",
    "two_device_testbed",
    "write_profiles",
]


def synthetic_profile(
    n_blocks: int = 6,
    *,
    model: str = "synth",
    device: str = "host",
    batch_size: int = 1,
    granularity: str = "coarse",
    times_ms: Sequence[float] | None = None,
    cut_bytes: Sequence[int] | None = None,
    param_bytes: Sequence[int] | None = None,
    mem_bytes: Sequence[int] | None = None,
    entry_ms: Sequence[float | None] | None = None,
    seed: int = 0,
) -> BlockProfile:
    """A profile of ``n_blocks`` blocks; ``cut_bytes`` has ``n_blocks + 1`` entries (0..B).

    Unspecified values are drawn from ``random.Random(seed)``.
    """
    rng = random.Random(seed)
    cuts = (
        list(cut_bytes)
        if cut_bytes is not None
        else [rng.choice([1, 2, 4, 8, 16]) * 50_000 for _ in range(n_blocks + 1)]
    )
    params = (
        list(param_bytes)
        if param_bytes is not None
        else [rng.randint(0, 4) * 2**20 for _ in range(n_blocks)]
    )
    mems = (
        list(mem_bytes)
        if mem_bytes is not None
        else [rng.randint(1, 4) * 2**20 for _ in range(n_blocks)]
    )
    times = (
        list(times_ms) if times_ms is not None else [rng.uniform(1, 20) for _ in range(n_blocks)]
    )
    blocks = tuple(
        BlockTiming(
            index=i,
            name=f"block{i}",
            time_ms=times[i],
            time_p10_ms=times[i] * 0.95,
            time_p90_ms=times[i] * 1.05,
            out_bytes=cuts[i + 1],
            param_bytes=params[i],
            mem_bytes=mems[i],
            entry_ms=None if entry_ms is None else entry_ms[i],
        )
        for i in range(n_blocks)
    )
    return BlockProfile(
        device=device,
        model=model,
        batch_size=batch_size,
        threads=1,
        granularity=granularity,
        input_bytes=cuts[0],
        output_bytes=cuts[-1],
        blocks=blocks,
        cut_names=tuple(f"block{i}" for i in range(1, n_blocks)),
        interior_cut_bytes=tuple(cuts[1:-1]),
        whole_ms=sum(times),
        provenance={"synthetic": True, "seed": seed},
    )


def two_device_testbed(
    *, rtt_ms: float = 2.0, mbps: float = 100.0, scale_b: float = 0.5, name: str = "pair"
) -> Testbed:
    """Devices ``a`` (source, scale 1) and ``b`` (scale ``scale_b``) on one link."""
    devices = {
        "a": Device("a", profile="host", scale=1.0),
        "b": Device("b", profile="host", scale=scale_b),
    }
    return Testbed(name, devices, (Link("a", "b", rtt_ms, mbps),), "a", "a", ())


def random_testbed(
    rng: random.Random,
    n_devices: int,
    *,
    switches: int = 0,
    memory_limits: bool = True,
    sink_elsewhere: bool = False,
    name: str = "random",
) -> Testbed:
    """Random devices and links.

    With ``switches == 0`` devices are linked directly (a random connected graph, so routes may
    pass through other devices); otherwise every device hangs off one of the switches, and
    the switches form a chain (trunks shared by several transfers).
    """
    names = [f"d{i}" for i in range(n_devices)]
    devices = {}
    for n in names:
        memory = rng.choice([None, 6, 12, 24, 48]) if memory_limits else None
        devices[n] = Device(
            n,
            profile="host",
            scale=rng.choice([0.1, 0.5, 1.0, 2.0, 4.0]),
            memory_bytes=None if memory is None else memory * 2**20,
        )
    links: list[Link] = []

    def link(a: str, b: str) -> None:
        links.append(Link(a, b, rng.choice([0.2, 1.0, 5.0]), rng.choice([10.0, 100.0, 1000.0])))

    sw = [f"sw{i}" for i in range(switches)]
    if sw:
        for a, b in itertools.pairwise(sw):
            link(a, b)
        for n in names:
            link(n, rng.choice(sw))
    else:
        for i in range(1, n_devices):
            link(names[i], names[rng.randrange(i)])
        for a, b in itertools.combinations(names, 2):
            if rng.random() < 0.3 and not any({a, b} == {x.a, x.b} for x in links):
                link(a, b)
    source = names[0]
    sink = rng.choice(names) if sink_elsewhere else source
    return Testbed(name, devices, tuple(links), source, sink, tuple(sw))


def random_cost_model(
    rng: random.Random,
    testbed: Testbed,
    n_blocks: int,
    *,
    overheads: Overheads | None = None,
    depth: int | None = None,
) -> CostModel:
    """A cost model of a random chain on ``testbed``; devices of one profile share the times."""
    seed = rng.randrange(2**31)
    base = synthetic_profile(n_blocks, seed=seed)
    profiles = {}
    for i, name in enumerate(testbed.devices):
        # a few devices get their own (non-proportional) times, the others share the base chain
        # (and a start cost per block: what a stage starting there adds)
        times = [rng.uniform(1, 20) for _ in range(n_blocks)]
        own = synthetic_profile(
            n_blocks,
            seed=seed,
            times_ms=times,
            entry_ms=[t + rng.choice([0.0, rng.uniform(0, 6)]) for t in times],
        )
        profiles[name] = own if i % 2 else base
    return CostModel(testbed, profiles, overheads=overheads, depth=depth)


def all_plans(devices: Sequence[str], n_blocks: int) -> Iterator[Plan]:
    """Every plan: any number of stages, any ordered subset of devices, every set of cuts."""
    for k in range(1, min(len(devices), n_blocks) + 1):
        for cuts in itertools.combinations(range(1, n_blocks), k - 1):
            for order in itertools.permutations(devices, k):
                yield Plan.from_cuts(order, cuts, n_blocks)


def write_profiles(
    root: str | os.PathLike[str], profile: BlockProfile, devices: Sequence[str]
) -> list[Path]:
    """Write ``profile`` as the measured profile of each of ``devices`` under ``root``."""
    paths = []
    for device in devices:
        path = profile_path(root, device, profile.model, profile.batch_size, profile.granularity)
        paths.append(save_profile(profile, path))
    return paths
