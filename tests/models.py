"""Shared test fixtures: tiny models (as ``--module tests.models:FACTORY`` factories) and profiles.

Factories return ``(model, example_input)`` at batch 2 so that other tests and the CLI can
trace, profile and deploy them in milliseconds. ``synthetic_profile`` builds a ``BlockProfile``
without torch-free code paths having to measure anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from optisplit.profile import BlockProfile, BlockTiming

__all__ = [
    "Residual",
    "TinyCNN",
    "TinyResidual",
    "Untraceable",
    "synthetic_profile",
    "tiny_cnn",
    "tiny_residual",
    "untraceable",
]


class TinyCNN(nn.Module):
    """features (5 children) -> flatten -> classifier (2 children): 9 coarse blocks."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class Residual(nn.Module):
    """conv-bn-relu-conv-bn plus the identity: two tensors cross every cut inside it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + x)


class TinyResidual(nn.Module):
    """stem, layers.0, layers.1, pool, flatten, fc: 6 coarse blocks, residual inside."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.Sequential(Residual(8), Residual(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class Untraceable(nn.Module):
    """Branches on a tensor value at the top level: symbolic tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def tiny_cnn() -> tuple[nn.Module, torch.Tensor]:
    return TinyCNN(), _randn(2, 3, 16, 16)


def tiny_residual() -> tuple[nn.Module, torch.Tensor]:
    return TinyResidual(), _randn(2, 3, 16, 16)


def untraceable() -> tuple[nn.Module, torch.Tensor]:
    return Untraceable(), _randn(2, 4)


def synthetic_profile(
    times_ms: Sequence[float],
    *,
    device: str = "host",
    model: str = "toy",
    batch_size: int = 1,
    cut_bytes: Sequence[int] | None = None,
    input_bytes: int = 1000,
    output_bytes: int = 40,
    param_bytes: int = 100,
    mem_bytes: int = 200,
) -> BlockProfile:
    """A profile with the given block times; interior cut bytes default to 500 each."""
    n = len(times_ms)
    cuts = list(cut_bytes) if cut_bytes is not None else [500] * (n - 1)
    outs = [*cuts, output_bytes]
    blocks = tuple(
        BlockTiming(i, f"block{i}", t, 0.9 * t, 1.1 * t, outs[i], param_bytes, mem_bytes)
        for i, t in enumerate(times_ms)
    )
    return BlockProfile(
        device=device,
        model=model,
        batch_size=batch_size,
        threads=1,
        granularity="coarse",
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        blocks=blocks,
        cut_names=tuple(f"block{i}" for i in range(1, n)),
        interior_cut_bytes=tuple(cuts),
        whole_ms=float(sum(times_ms)),
        provenance={"synthetic": True},
    )
