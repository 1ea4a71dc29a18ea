"""Plots and markdown reports of comparisons and sweeps (matplotlib, Agg backend, loaded lazily)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit._io import atomic_write_text
from optisplit.errors import OptisplitError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from optisplit.compare import Comparison

__all__ = [
    "comparison_markdown",
    "plot_comparison",
    "plot_fronts",
    "write_comparison_report",
]


def plot_comparison(comparison: Comparison, path: str | os.PathLike[str]) -> Path:
    """Overlay predicted (hollow) and measured (filled) points, one line per plan, both fronts.

    Returns the written image path (format from the suffix, e.g. ``.png`` or ``.svg``).
    """
    figure, axes = _figure()
    for plan in comparison.measured:
        pred = (plan.predicted_latency_ms, plan.predicted_throughput_rps)
        meas = (plan.measured_latency_ms or 0.0, plan.measured_throughput_rps or 0.0)
        axes.plot([pred[0], meas[0]], [pred[1], meas[1]], color="0.7", lw=0.8, zorder=1)
        axes.scatter(*pred, facecolors="none", edgecolors="tab:blue", s=36, zorder=3)
        axes.scatter(*meas, color="tab:orange", s=30, zorder=3)
    _draw_front(
        axes,
        [
            (p.predicted_latency_ms, p.predicted_throughput_rps, p.plan)
            for p in comparison.measured
            if p.on_predicted_front
        ],
        color="tab:blue",
        style="--",
        label="predicted front (hollow)",
    )
    _draw_front(
        axes,
        [
            (p.measured_latency_ms or 0.0, p.measured_throughput_rps or 0.0, p.plan)
            for p in comparison.measured
            if p.on_measured_front
        ],
        color="tab:orange",
        style="-",
        label="measured front (filled)",
        annotate=True,
    )
    title = f"predicted vs measured ({comparison.backend})"
    if comparison.study:
        title = f"{comparison.study}: {title}"
    axes.set_title(title, fontsize=10)
    return _save(figure, axes, path)


def plot_fronts(
    fronts: Mapping[str, Sequence[tuple[float, float, str]]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    measured: Mapping[str, Sequence[tuple[float, float, str]]] | None = None,
) -> Path:
    """One figure with a front per label (e.g. per network condition); log-scaled latency.

    Args:
        fronts: label -> points ``(latency_ms, throughput_rps, plan text)`` (predicted).
        path: the image file to write.
        title: figure title.
        measured: optional label -> measured points, drawn filled in the same colour.
    """
    figure, axes = _figure()
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, (label, points) in enumerate(fronts.items()):
        colour = colours[i % len(colours)]
        _draw_front(axes, points, color=colour, style="--", label=f"{label} (predicted)")
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        axes.scatter(xs, ys, facecolors="none", edgecolors=colour, s=36, zorder=3)
        for lat, thr, _plan in (measured or {}).get(label, ()):
            axes.scatter(lat, thr, color=colour, s=30, zorder=3)
    if any(p[0] > 0 for pts in fronts.values() for p in pts):
        axes.set_xscale("log")
    axes.set_title(title, fontsize=10)
    return _save(figure, axes, path)


def comparison_markdown(comparison: Comparison, *, plot: str | None = None) -> str:
    """The markdown report of a comparison: summary figures, then one row per plan."""
    lines = [f"# Predicted vs measured: {comparison.study or 'plans'} ({comparison.backend})", ""]
    for key, value in comparison.info.items():
        lines.append(f"- {key}: `{value}`")
    if comparison.info:
        lines.append("")
    lines += [
        "| figure | value |",
        "|---|---|",
        f"| latency MAPE | {_pct(comparison.latency_mape)} |",
        f"| throughput MAPE | {_pct(comparison.throughput_mape)} |",
        f"| latency Spearman | {_fmt(comparison.latency_spearman)} |",
        f"| throughput Spearman | {_fmt(comparison.throughput_spearman)} |",
        f"| hypervolume predicted | {_fmt(comparison.hv_predicted)} |",
        f"| hypervolume measured | {_fmt(comparison.hv_measured)} |",
        f"| reference point (ms, req/s) | {_ref(comparison.reference_point)} |",
        f"| front precision | {_fmt(comparison.front_precision)} |",
        f"| front recall | {_fmt(comparison.front_recall)} |",
        f"| plans measured / failed | {len(comparison.measured)} / {len(comparison.failed)} |",
        f"| stages slower while streaming (median) | {_pct(comparison.stream_slowdown_pct)} |",
    ]
    repeat = comparison.repeatability
    if repeat:
        lines += [
            f"| round-to-round latency MAPE ({repeat['rounds']} rounds) "
            f"| {_pct(repeat['latency_mape'])} |",
            f"| round-to-round throughput MAPE | {_pct(repeat['throughput_mape'])} |",
            f"| round-to-round latency Spearman | {_fmt(repeat['latency_spearman'])} |",
            f"| round-to-round throughput Spearman | {_fmt(repeat['throughput_spearman'])} |",
        ]
    lines += [""]
    if plot:
        lines += [f"![predicted vs measured]({plot})", ""]
    lines += _plan_table(comparison)
    lines += [
        "",
        "Errors are (predicted − measured) / measured. Fronts: latency minimised, throughput "
        "maximised; P = on the predicted front, M = on the measured front. Hypervolumes use the "
        "same reference point for both fronts. Round-to-round figures compare each measuring "
        "round with the next over the same plans: how well the measurement repeats. Stream "
        "slowdown: how much slower a plan's stage computed while requests streamed than one at "
        "a time (its largest over the stages); the profiles time one at a time, so a throughput "
        "over-estimate of that size is the stages' compute.",
        "",
    ]
    return "\n".join(lines)


def write_comparison_report(
    comparison: Comparison,
    report_path: str | os.PathLike[str],
    *,
    plot_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the markdown report (atomically); the plot is linked relative to the report."""
    report = Path(report_path)
    link = None
    if plot_path is not None:
        link = os.path.relpath(Path(plot_path).resolve(), report.resolve().parent)
    return atomic_write_text(report, comparison_markdown(comparison, plot=link))


def _plan_table(comparison: Comparison) -> list[str]:
    rows = [
        "| plan | pred latency ms | meas latency ms | err % | pred req/s | meas req/s | err % "
        "| bound | host core % | stream slowdown % | fronts | outputs |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for p in comparison.plans:
        fronts = ("P" if p.on_predicted_front else "") + ("M" if p.on_measured_front else "")
        outputs = p.error or (
            "match" if p.outputs_match else "?" if p.outputs_match is None else "DIFFER"
        )
        rows.append(
            f"| `{p.plan}` | {_fmt(p.predicted_latency_ms)} | {_fmt(p.measured_latency_ms)} "
            f"| {_fmt(p.latency_error_pct, '+.1f')} | {_fmt(p.predicted_throughput_rps)} "
            f"| {_fmt(p.measured_throughput_rps)} | {_fmt(p.throughput_error_pct, '+.1f')} "
            f"| {p.predicted_bound or 'n/a'} "
            f"| {_fmt(None if p.host_busiest is None else 100 * p.host_busiest, '.0f')} "
            f"| {_fmt(p.stream_slowdown_pct, '+.1f')} | {fronts} | {outputs} |"
        )
    return rows


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %"


def _ref(point: tuple[float, float] | None) -> str:
    return "n/a" if point is None else f"({point[0]:.4g}, {point[1]:.4g})"


def _figure() -> tuple[Figure, Axes]:
    os.environ.setdefault("MPLCONFIGDIR", tempfile.gettempdir())
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5.0), dpi=110)
    axes = figure.add_subplot()
    axes.set_xlabel("latency (ms, lower is better)")
    axes.set_ylabel("throughput (requests/s, higher is better)")
    axes.grid(True, alpha=0.3)
    return figure, axes


def _draw_front(
    axes: Any,
    points: Sequence[tuple[float, float, str]],
    *,
    color: str,
    style: str,
    label: str,
    annotate: bool = False,
) -> None:
    if not points:
        return
    ordered = sorted(points)
    axes.step(
        [p[0] for p in ordered],
        [p[1] for p in ordered],
        where="post",
        linestyle=style,
        color=color,
        lw=1.2,
        label=label,
        zorder=2,
    )
    if annotate:
        for lat, thr, plan in ordered:
            axes.annotate(plan, (lat, thr), fontsize=6, xytext=(3, 3), textcoords="offset points")


def _save(figure: Figure, axes: Any, path: str | os.PathLike[str]) -> Path:
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix
        )
    except OSError as exc:
        raise OptisplitError(f"cannot write plot {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        figure.savefig(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
