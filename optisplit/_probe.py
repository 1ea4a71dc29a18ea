"""The calibration probes' modules (:func:`optisplit.calibrate.probe_model`).

Kept apart from :mod:`optisplit.calibrate`, which the command line imports without torch; the
workers that build a probe import this module, and torch with it.
"""

from __future__ import annotations

from torch import Tensor, nn, randn


class ExciteBlock(nn.Module):  # type: ignore[misc]
    """A 3x3 convolution with ReLU, then a squeeze-and-excitation gate (mean over the map, a
    ``hidden``-wide layer and back, sigmoid) that scales its channels.

    The gate adds little compute but ``2 * channels * hidden`` weights to read per call (1 MiB
    at 64 channels and 2048 hidden): a stack of them reads as many megabytes per request as a
    zoo model, whose weights and activations push the runtime's own code and data out of the
    core's caches between requests. A probe of convolutions alone (2.2 MB of weights, about
    this host's 2 MiB of L2 cache) left them there, and the runtime cost less per request with
    it than with zoo models: the calibrated RPC terms on ``local`` rose by 0.15-0.6 ms with the
    gates, towards what the zoo models' own hand-offs took (README, "Calibration"). Over RPC,
    split at half its blocks between ``slow`` and ``fast`` (``bench/probe_gap.py --split 0.5``,
    3 rounds), the plain probe's hops back to the client took 0.93 ms (median; 0.85-1.09), the
    gated probe's 1.09 (1.03-1.13) and mobilenet_v2's 1.06 (1.04-1.21).
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x).relu()
        gate = self.excite(self.squeeze(y.mean((2, 3))).relu()).sigmoid()
        return y * gate[:, :, None, None]


def build(channels: int, layers: int, hidden: int, size: int = 32) -> tuple[nn.Module, Tensor]:
    """A 3x3 convolution with ReLU over a 3 x 32 x 32 map, ``layers - 1`` :class:`ExciteBlock`
    (plain 3x3 convolutions with ReLU when ``hidden`` is 0) and a pooled linear head of 10
    classes; returns ``(module, example input)``. The input is 3 x ``size`` x ``size``; a wider
    one than 32 is first pooled down to 32 x 32 in a block of its own."""
    blocks: list[nn.Module] = [nn.AdaptiveAvgPool2d(32)] if size > 32 else []
    blocks.append(nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU()))
    blocks += [
        ExciteBlock(channels, hidden)
        if hidden
        else nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        for _ in range(layers - 1)
    ]
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)))
    return nn.Sequential(*blocks), randn(1, 3, size, size)
