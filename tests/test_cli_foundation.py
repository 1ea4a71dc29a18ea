"""The models, blocks and profile commands: output, JSON keys, exit codes, no partial files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from optisplit.cli import main

TINY = ["tiny", "--module", "tests.models:tiny_residual"]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> object:
    assert main(argv) == code
    return json.loads(capsys.readouterr().out)


def test_models(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _json(capsys, ["models", "--json"])
    assert isinstance(rows, list)
    sizes = {r["model"]: r["input_size"] for r in rows}
    assert sizes["inception_v3"] == 299 and sizes["resnet18"] == 224 and len(sizes) >= 70
    assert main(["models"]) == 0
    assert "mobilenet_v2" in capsys.readouterr().out


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """'optisplit models --json | head -c 1': no traceback when the pipe closes under it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "optisplit", "models", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before anything is written
    errors = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in errors and "BrokenPipeError" not in errors


def test_blocks_json_and_verify(capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(capsys, ["blocks", *TINY, "--batch-size", "3", "--verify", "--json"])
    assert isinstance(doc, dict)
    assert set(doc) >= {
        "model",
        "batch_size",
        "granularity",
        "input_shape",
        "input_bytes",
        "output_bytes",
        "blocks",
        "cuts",
        "verified",
        "max_abs_diff",
    }
    assert doc["batch_size"] == 3 and doc["input_shape"] == [3, 3, 16, 16]
    assert doc["verified"] is True and doc["max_abs_diff"] == 0.0
    assert set(doc["blocks"][0]) == {"index", "name", "param_bytes"}
    assert set(doc["cuts"][0]) == {"index", "name", "bytes", "tensors"}
    assert doc["cuts"][0]["tensors"][0]["shape"] == [3, 8, 16, 16]


def test_blocks_table_and_several_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks", *TINY, "--granularity", "fine"]) == 0
    out = capsys.readouterr().out
    assert "layers.0.relu@1" in out and "18 blocks" in out
    docs = _json(capsys, ["blocks", "squeezenet1_1", "alexnet", "--json"])
    assert isinstance(docs, list) and [d["model"] for d in docs] == ["squeezenet1_1", "alexnet"]


def test_blocks_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks", "resnet18", "resnt50"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'resnt50'; did you mean resnet50" in err
    assert main(["blocks", "x", "--module", "tests.models:untraceable"]) == 1
    err = capsys.readouterr().err
    assert "cannot trace x" in err and "control flow" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["blocks", "resnet18", "--batch-size", "0"])
    assert exc.value.code == 2


def test_profile_writes_json_and_csv(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["profile", *TINY, "--device", "box", "--warmup", "0", "--repeats", "2"]
    doc = _json(capsys, [*argv, "--out", str(tmp_path), "--json", "--batch-size", "2"])
    assert isinstance(doc, dict)
    assert set(doc) >= {"device", "model", "batch_size", "threads", "blocks", "sum_ms", "whole_ms"}
    assert set(doc["blocks"][0]) == {
        "index",
        "name",
        "time_ms",
        "time_p10_ms",
        "time_p90_ms",
        "out_bytes",
        "param_bytes",
        "mem_bytes",
        "entry_ms",
    }
    assert all(b["entry_ms"] > 0 for b in doc["blocks"])
    path = tmp_path / "devices" / "box" / "tiny-b2.json"
    assert doc["path"] == str(path) and path.with_suffix(".csv").exists()
    assert main([*argv, "--out", str(tmp_path), "--granularity", "fine"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "start ms" in out
    assert (tmp_path / "devices" / "box" / "tiny-b1-fine.json").exists()


def test_profile_unwritable_output_leaves_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["profile", *TINY, "--device", "box", "--repeats", "1", "--out", str(blocker)]
    assert main(argv) == 1
    assert "cannot write" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [blocker]


def test_profile_testbed_not_up_warns(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    testbed = tmp_path / "two.yaml"
    testbed.write_text(
        "schema_version: 1\nname: two-test-not-up\nsource: a\n"
        "devices:\n  a: {profile: host}\n  b: {profile: host}\n"
        "links:\n  - {between: [a, b], rtt_ms: 1, mbps: 100}\n"
    )
    argv = ["profile", *TINY, "--device", "b", "--repeats", "1", "--out", str(tmp_path)]
    assert main([*argv, "--testbed", str(testbed)]) == 0
    captured = capsys.readouterr()
    assert "warning: testbed two-test-not-up is not up" in captured.err
    assert (tmp_path / "devices" / "b" / "tiny-b1.json").exists()
    assert main(["profile", *TINY, "--device", "c", "--testbed", str(testbed)]) == 2
    assert "device 'c' is not in testbed two-test-not-up" in capsys.readouterr().err
