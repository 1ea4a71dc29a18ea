"""Reports: the overlay plot and the markdown report are written, readable and complete."""

from __future__ import annotations

from pathlib import Path

from test_compare import ROWS, _plans

from optisplit.compare import compare_plans
from optisplit.report import (
    comparison_markdown,
    plot_comparison,
    plot_fronts,
    write_comparison_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_overlay_plot_is_a_png(tmp_path: Path) -> None:
    comparison = compare_plans(_plans(ROWS), study="s1")
    path = plot_comparison(comparison, tmp_path / "sub" / "overlay.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["overlay.png"]  # no temp file left


def test_overlay_plot_svg_draws_both_fronts(tmp_path: Path) -> None:
    comparison = compare_plans(_plans(ROWS), study="s1")
    svg = plot_comparison(comparison, tmp_path / "overlay.svg").read_text()
    assert "predicted front" in svg and "measured front" in svg
    assert "b[0:1] -&gt; a[1:4]" in svg  # measured-front plans are labelled


def test_markdown_report_has_every_figure_and_plan(tmp_path: Path) -> None:
    comparison = compare_plans(_plans(ROWS), study="s1", info={"model": "toy"})
    text = comparison_markdown(comparison, plot="overlay.png")
    for needle in (
        "latency MAPE",
        "throughput MAPE",
        "latency Spearman",
        "hypervolume predicted",
        "front recall",
        "![predicted vs measured](overlay.png)",
        "`a[0:2] -> b[2:4]`",
        "model: `toy`",
    ):
        assert needle in text, needle
    assert f"{comparison.latency_mape:.2f} %" in text
    report = write_comparison_report(
        comparison, tmp_path / "r" / "report.md", plot_path=tmp_path / "p" / "overlay.png"
    )
    assert "](../p/overlay.png)" in report.read_text()


def test_fronts_figure_one_curve_per_condition(tmp_path: Path) -> None:
    fronts = {
        "lan": [(5.0, 200.0, "a[0:2] -> b[2:4]"), (3.0, 100.0, "a[0:4]")],
        "constrained": [(400.0, 20.0, "a[0:4]")],
    }
    svg = plot_fronts(
        fronts, tmp_path / "sweep.svg", title="toy", measured={"lan": [(5.5, 180.0, "x")]}
    ).read_text()
    assert "lan (predicted)" in svg and "constrained (predicted)" in svg
