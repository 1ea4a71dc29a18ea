"""``optisplit search``, ``studies`` and ``show`` end to end on synthetic profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from synthetic import synthetic_profile, write_profiles

from optisplit.cli import main
from optisplit.testbed import Device, Link, Testbed

KEYS = {
    "engine",
    "evaluations",
    "seconds",
    "hypervolume",
    "reference_point",
    "study",
    "storage",
    "epsilon",
    "front_size",
    "front",
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    profiles = tmp_path / "profiles"
    write_profiles(profiles, synthetic_profile(7, model="synth", seed=4), ["host"])
    devices = {
        "pi": Device("pi", "host", 6.0, 64 * 2**20),
        "box": Device("box", "host", 1.0, None),
        "gpu": Device("gpu", "host", 0.2, None),
    }
    links = (Link("pi", "box", 1.0, 100.0), Link("pi", "gpu", 2.0, 500.0))
    testbed = Testbed("trio", devices, links, "pi", "pi", ())
    (profiles / "testbeds").mkdir()
    (profiles / "testbeds" / "trio.yaml").write_text(yaml.safe_dump(testbed.to_dict()))
    return tmp_path


def _search(root: Path, *extra: str) -> list[str]:
    return [
        "search",
        "synth",
        "--testbed",
        "trio",
        "--profiles",
        str(root / "profiles"),
        "--storage",
        f"sqlite:///{root / 'studies.db'}",
        *extra,
    ]


def test_all_engines_share_one_reference_point_and_land_in_one_study(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_search(root, "--engine", "all", "--budget", "60", "--study", "s", "--json"))
    out = capsys.readouterr().out
    assert code == 0
    reports = json.loads(out)
    assert [r["engine"] for r in reports] == ["exact", "nsga2", "optuna"]
    for report in reports:
        assert set(report) == KEYS
        assert report["reference_point"] == reports[0]["reference_point"]
        assert report["study"] == "s"
        assert report["storage"].endswith("studies.db")
        assert report["front"] and {"plan", "latency_ms", "throughput_rps"} <= set(
            report["front"][0]
        )
        assert 0 < report["hypervolume"] <= reports[0]["hypervolume"] + 1e-12
    assert main(["show", "s", "--storage", f"sqlite:///{root / 'studies.db'}", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"] == "synth" and shown["testbed"] == "trio"
    assert shown["trials"] >= reports[1]["evaluations"] + reports[2]["evaluations"]
    assert {f["plan"] for f in shown["front"]} == {f["plan"] for f in reports[0]["front"]}
    assert main(["studies", "--storage", f"sqlite:///{root / 'studies.db'}", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listed["studies"]] == ["s"]


def test_table_plot_and_default_study_name(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = root / "front.png"
    code = main(_search(root, "--engine", "nsga2", "--budget", "50", "--plot", str(plot)))
    out = capsys.readouterr().out
    assert code == 0
    assert "nsga2:" in out and "hypervolume" in out and "[0:" in out
    assert "stored in study synth-trio-nsga2-" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show", out.split("stored in study ")[1].split()[0], "--storage",
                 f"sqlite:///{root / 'studies.db'}"]) == 0  # fmt: skip
    assert "latency ms" in capsys.readouterr().out


def test_link_overrides_change_the_prediction(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--engine", "exact", "--no-store", "--json")
    assert main(_search(root, *args)) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(_search(root, *args, "--link-rtt-ms", "300", "--link-mbps", "5")) == 0
    slow = json.loads(capsys.readouterr().out)
    assert base["study"] is None and base["storage"] is None
    assert slow["reference_point"] != base["reference_point"]
    assert main(_search(root, *args, "--condition", "constrained")) == 0
    constrained = json.loads(capsys.readouterr().out)
    assert constrained["reference_point"] != base["reference_point"]


def test_the_front_shown_and_stored_is_thinned_within_epsilon(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{root / 'studies.db'}"
    assert (
        main(_search(root, "--engine", "exact", "--epsilon", "0", "--study", "all", "--json")) == 0
    )
    whole = json.loads(capsys.readouterr().out)
    assert len(whole["front"]) == whole["front_size"] >= 2 and whole["epsilon"] == 0
    assert (
        main(_search(root, "--engine", "exact", "--epsilon", "0.3", "--study", "thin", "--json"))
        == 0
    )
    thin = json.loads(capsys.readouterr().out)
    assert thin["front_size"] == whole["front_size"] and len(thin["front"]) < len(whole["front"])
    assert thin["hypervolume"] == whole["hypervolume"]  # engines are scored on their whole front
    for plan in whole["front"]:  # every plan of the front has one within 30 % in both objectives
        assert any(
            kept["latency_ms"] <= 1.3 * plan["latency_ms"]
            and 1.3 * kept["throughput_rps"] >= plan["throughput_rps"]
            for kept in thin["front"]
        )
    for name, report in (("all", whole), ("thin", thin)):  # the study holds what was shown
        assert main(["show", name, "--storage", url, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert [f["plan"] for f in shown["front"]] == [f["plan"] for f in report["front"]]
    assert _exit_code(_search(root, "--epsilon", "-1", "--no-store")) == 2
    assert "expected a number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (("--engine", "simplex"), 2, "choose one of exact, nsga2, optuna"),
        (("--budget", "0"), 2, "expected a positive integer, got 0"),
        (("--budget", "-3"), 2, "expected a positive integer"),
        (("--storage", "nonsense"), 1, "malformed storage URL 'nonsense'"),
        (("--storage", "nosuchdb://x/y"), 1, "cannot open storage"),
    ],
)
def test_usage_errors_are_one_line(
    root: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], code: int, message: str
) -> None:
    args = _search(root, "--budget", "20")
    if "--storage" in extra:
        i = args.index("--storage")
        del args[i : i + 2]
    assert _exit_code([*args, *extra]) == code
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_existing_study_and_missing_study(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_search(root, "--budget", "20", "--study", "dup", "--json")) == 0
    capsys.readouterr()
    assert main(_search(root, "--budget", "20", "--study", "dup")) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err
    assert main(_search(root, "--budget", "20", "--study", "dup", "--resume", "--json")) == 0
    capsys.readouterr()
    assert main(["show", "nope", "--storage", f"sqlite:///{root / 'studies.db'}"]) == 1
    err = capsys.readouterr().err
    assert "no study named 'nope'" in err and len(err.strip().splitlines()) == 1


def _exit_code(argv: list[str]) -> int:
    """``main``'s exit code, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
