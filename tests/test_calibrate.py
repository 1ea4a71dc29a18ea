"""Calibration: the probe model, the stored file, predictions that use it, and a real run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from synthetic import synthetic_profile, two_device_testbed, write_profiles

from optisplit.calibrate import (
    PROBE_FACTORY,
    PROBE_MODEL,
    Calibration,
    calibrate_overheads,
    calibrated_overheads,
    calibration_path,
    load_calibration,
    save_calibration,
)
from optisplit.cli import main
from optisplit.cost import Overheads, load_cost_model
from optisplit.errors import ProfileError, UsageError
from optisplit.plan import Plan

ROOT = Path(__file__).resolve().parents[1]


def _root(tmp_path: Path, *, mbps: float = 1000.0) -> Path:
    """Synthetic profiles of ``synth`` and testbed ``pair`` (devices a, b) under a profiles root."""
    root = tmp_path / "profiles"
    write_profiles(root, synthetic_profile(6, model="synth", seed=3), ["host"])
    (root / "testbeds").mkdir()
    bed = two_device_testbed(rtt_ms=0.2, mbps=mbps)
    (root / "testbeds" / "pair.yaml").write_text(yaml.safe_dump(bed.to_dict()))
    return root


def test_probe_model_is_small_on_the_wire_and_traces_into_blocks() -> None:
    from optisplit.chain import load_chain

    chain = load_chain(PROBE_MODEL, module=PROBE_FACTORY)
    # a convolution and a ReLU, 15 gated convolution blocks, 3 blocks of head
    assert chain.n_blocks == 20
    assert chain.input_bytes == 3 * 32 * 32 * 4  # 12 KB: 0.1 ms on a 1 Gbit/s link
    assert chain.cuts[chain.n_blocks // 2 - 1].bytes == 64 * 32 * 32 * 4


def test_the_probe_reads_as_many_megabytes_per_request_as_a_zoo_model() -> None:
    from optisplit._probe import ExciteBlock
    from optisplit.calibrate import probe_model

    gated, _ = probe_model()
    gates = [block for block in gated if isinstance(block, ExciteBlock)]
    assert len(gates) == 15
    weights = sum(p.numel() * p.element_size() for g in gates for p in g.parameters())
    assert weights >= 15 * (1 << 20)  # 1 MiB each: mobilenet_v2 has 14 MB of weights
    plain, _ = probe_model(hidden=0)
    assert not any(isinstance(m, ExciteBlock) for m in plain.modules())


def test_stored_calibration_round_trips_and_bad_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "profiles"
    calibration = Calibration("pair", "socket", 0.1, 0.2, 1.5, created="2026-01-01T00:00:00")
    path = save_calibration(calibration, root=root)
    # the shared host's terms round-trip too
    host = dataclasses.replace(
        calibration,
        queue_ms=0.12,
        handoff_ms_per_mb=0.8,
        client_ms=0.3,
        forward_ms=0.05,
        forward_ms_per_mb=1.2,
        request_cpu_ms=0.4,
        client_wait_share=0.05,
        worker_wait_share=0.03,
    )
    save_calibration(host, root=root)
    loaded = load_calibration("pair", "socket", root=root)
    assert loaded == host and loaded is not None
    assert loaded.overheads().cpu_per_request_ms == 0.4
    assert loaded.overheads().client_wait_share == 0.05
    assert loaded.overheads().worker_wait_share == 0.03
    assert loaded.overheads().queue_ms == 0.12
    assert loaded.overheads().handoff_ms_per_mb == 0.8
    # a calibration written before queue_ms or handoff_ms_per_mb was measured reads them as 0
    later = ("queue_ms", "handoff_ms_per_mb")
    older = {k: v for k, v in json.loads(path.read_text()).items() if k not in later}
    path.write_text(json.dumps(older))
    assert calibrated_overheads("pair", "socket", root=root).queue_ms == 0.0
    assert calibrated_overheads("pair", "socket", root=root).handoff_ms_per_mb == 0.0
    path = save_calibration(calibration, root=root)
    assert path == calibration_path("pair", "socket", root=root)
    assert path == root / "overheads" / "pair-socket.json"
    assert load_calibration("pair", "socket", root=root) == calibration
    assert load_calibration("pair", "rpc", root=root) is None
    assert calibrated_overheads("pair", "rpc", root=root) == Overheads()
    overheads = calibrated_overheads("pair", "socket", root=root)
    assert (overheads.message_ms, overheads.handoff_ms, overheads.request_ms) == (0.1, 0.2, 1.5)
    assert overheads.copy_gbps == Overheads().copy_gbps  # not a calibrated term

    doc = json.loads(path.read_text())
    for broken, reason in (
        ({**doc, "request_ms": -1.0}, "must be numbers >= 0"),
        ({**doc, "forward_ms": -0.5}, "must be numbers >= 0"),
        ({**doc, "queue_ms": -0.1}, "must be numbers >= 0"),
        ({**doc, "handoff_ms_per_mb": -0.3}, "must be numbers >= 0"),
        ({k: v for k, v in doc.items() if k != "handoff_ms"}, "lacks numbers"),
        ({**doc, "message_ms": "fast"}, "lacks numbers"),
        ({**doc, "client_ms": "lots"}, "lacks numbers"),
        ({**doc, "worker_wait_share": 1.0}, "below 1"),
        ({**doc, "client_wait_share": -0.1}, "must be numbers >= 0"),
        ({**doc, "schema_version": 9}, "schema"),
    ):
        path.write_text(json.dumps(broken))
        with pytest.raises(ProfileError, match=reason):
            load_calibration("pair", "socket", root=root)
    path.write_text("{not json")
    with pytest.raises(ProfileError):
        calibrated_overheads("pair", "socket", root=root)


def test_the_wide_probe_hands_off_a_zoo_models_input() -> None:
    from optisplit.calibrate import WIDE_PROBE_FACTORY, wide_probe_model
    from optisplit.chain import load_chain

    chain = load_chain(PROBE_MODEL, module=WIDE_PROBE_FACTORY)
    assert chain.input_bytes == 3 * 224 * 224 * 4  # resnet18's and mobilenet_v2's input
    assert chain.output_bytes == load_chain(PROBE_MODEL, module=PROBE_FACTORY).output_bytes
    assert chain.cuts[0].bytes == 3 * 32 * 32 * 4  # pooled to the probe's map in block 0
    module, example = wide_probe_model()
    assert tuple(module(example).shape) == (1, 10)


def test_handoff_terms_split_a_fixed_part_from_a_part_per_mb() -> None:
    from optisplit.calibrate import _handoff_terms

    def hops(first: float | None, last: float | None) -> list[dict[str, object]]:
        return [
            {"src": "a", "dst": "a", "ms": first},
            {"src": "a", "dst": "b", "ms": 3.0},
            {"src": "b", "dst": "a", "ms": 3.0},
            {"src": "a", "dst": "a", "ms": last},
        ]

    # hand-offs of 0.2 ms + 1 ms per MB: 0.1 MB in, nothing out; the wide probe 1.1 MB in
    probe = [hops(0.3, 0.2), hops(0.3, 0.2), hops(0.31, 0.21)]
    wide = [
        [{"src": "a", "dst": "a", "ms": ms}, {"src": "a", "dst": "a", "ms": 0.2}]
        for ms in (1.3, 1.3, 9.0)
    ]
    fixed, per_mb = _handoff_terms(probe, wide, (100_000, 0), 1_100_000)
    assert per_mb == pytest.approx(1.0)  # medians: a slow spell in one round moves neither
    assert fixed == pytest.approx(0.2)  # the probe's hand-offs less their bytes' share
    # a wide hand-off no slower than the probe's: nothing per MB, and never below 0
    assert _handoff_terms(probe, [[{"ms": 0.1}, {"ms": 0.1}]], (100_000, 0), 1_100_000) == (
        pytest.approx(0.255),
        0.0,
    )
    # no wide probe (or stages on other clocks, no times): all of it fixed, as before
    assert _handoff_terms(probe, [], (100_000, 0), 1_100_000) == (pytest.approx(0.255), 0.0)
    clockless = [hops(None, None)]
    assert _handoff_terms(clockless, [[{"ms": None}, {"ms": None}]], (1, 0), 2) == (0.0, 0.0)


def test_predictions_use_the_calibration_of_their_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _root(tmp_path)
    bed = two_device_testbed(rtt_ms=0.2, mbps=1000.0)
    save_calibration(Calibration("pair", "socket", 0.5, 1.0, 20.0), root=root)
    plan = Plan.parse("a[0:3] -> b[3:6]")

    def predict(backend: str | None) -> tuple[float, float]:
        cost = load_cost_model("synth", bed, profiles_root=str(root), backend=backend)
        evaluation = cost.evaluate(plan)
        return evaluation.latency_ms, evaluation.throughput_rps

    default, socket, rpc = predict(None), predict("socket"), predict("rpc")
    assert rpc == default  # nothing stored for rpc
    # 2 hand-offs of 1 ms, 2 messages 0.45 ms dearer (a -> b, b -> a; the input stays on a);
    # a 20 ms cost per request and stage
    assert socket[0] == pytest.approx(default[0] + 2 * 1.0 + 2 * 0.45)
    assert socket[1] < default[1] and 1000 / socket[1] >= 20.0

    def evaluate(*extra: str) -> float:
        argv = ["evaluate", "synth", "--testbed", "pair", "--profiles", str(root)]
        assert main([*argv, "--plan", str(plan), "--json", *extra]) == 0
        return float(json.loads(capsys.readouterr().out)[0]["throughput_rps"])

    assert evaluate() == pytest.approx(socket[1])  # socket is the default backend
    assert evaluate("--backend", "rpc") == pytest.approx(default[1])
    assert evaluate("--no-calibration") == pytest.approx(default[1])


def test_search_records_the_overheads_it_predicted_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import optuna

    root = _root(tmp_path)
    save_calibration(Calibration("pair", "rpc", 0.5, 1.0, 3.0), root=root)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    argv = ["search", "synth", "--testbed", "pair", "--profiles", str(root), "--storage", url]
    assert main([*argv, "--engine", "exact", "--backend", "rpc", "--study", "s", "--json"]) == 0
    capsys.readouterr()
    attrs = optuna.load_study(study_name="s", storage=url).user_attrs
    assert attrs["backend"] == "rpc"
    assert attrs["overheads"]["request_ms"] == 3.0 and attrs["overheads"]["handoff_ms"] == 1.0


def test_too_slow_links_are_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _root(tmp_path, mbps=1.0)  # the probe's 12 KB input: 98 ms per request
    with pytest.raises(UsageError, match="too slow to calibrate"):
        calibrate_overheads(two_device_testbed(rtt_ms=0.2, mbps=1.0), "socket")
    code = main(["calibrate", "--testbed", "pair", "--profiles", str(root)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--condition lan" in err
    assert not (root / "overheads").exists()


def test_show_prints_the_stored_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _root(tmp_path)
    argv = ["calibrate", "--testbed", "pair", "--profiles", str(root), "--show"]
    assert main(argv) == 2
    assert "no calibration of socket on testbed pair" in capsys.readouterr().err
    save_calibration(Calibration("pair", "rpc", 0.5, 1.0, 3.0), root=root)
    assert main([*argv, "--backend", "all", "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert (shown["backend"], shown["request_ms"], shown["path"]) == ("rpc", 3.0, None)


@pytest.mark.slow
def test_calibrating_on_loopback_workers(tmp_path: Path) -> None:
    root = _root(tmp_path)
    out = subprocess.run(
        [
            sys.executable, "-m", "optisplit", "calibrate", "--testbed", "pair",
            "--profiles", str(root), "--rounds", "2", "--requests", "6", "--window", "0.5",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (doc,) = json.loads(out.stdout)
    assert doc["testbed"] == "pair" and doc["backend"] == "socket"
    stored = load_calibration("pair", "socket", root=root)
    assert stored is not None and doc["path"] == str(calibration_path("pair", "socket", root=root))
    assert (stored.message_ms, stored.handoff_ms, stored.request_ms) == (
        doc["message_ms"],
        doc["handoff_ms"],
        doc["request_ms"],
    )
    measured = doc["measured"]
    assert measured["plans"] == ["a[0:10] -> b[10:20]", "b[0:20]", "a[0:9]"]
    assert len(measured["period_ms"]) == len(measured["compute_ms"]) == 2
    for period, compute in zip(measured["period_ms"], measured["compute_ms"], strict=True):
        # streaming is not faster than one request alone, give or take this host's wander: with
        # other processes busy on both cores, one round read its compute at 1.37x its period
        assert 0 < compute <= 2 * period
    assert len(measured["hops"]) == 2  # the split plan's hops, once per round
    assert [(h["src"], h["dst"]) for h in measured["hops"][0]] == [
        ("a", "a"),
        ("a", "b"),
        ("b", "a"),
        ("a", "a"),
    ]
    assert doc["handoff_ms"] > 0  # a local message costs something
    # the wide probe's hand-offs, on the source alone, once per round, are what the terms were
    # read from (on loopback 602 KB may hand over as fast as 12 KB: the slope may read 0)
    from optisplit.calibrate import _handoff_terms

    assert [[(h["src"], h["dst"]) for h in w] for w in measured["wide_hops"]] == [
        [("a", "a"), ("a", "a")]
    ] * 2
    assert all(h["ms"] > 0 for w in measured["wide_hops"] for h in w)
    fixed, per_mb = _handoff_terms(measured["hops"], measured["wide_hops"], (12288, 40), 602112)
    assert (doc["handoff_ms"], doc["handoff_ms_per_mb"]) == (round(fixed, 4), round(per_mb, 4))
    assert stored.handoff_ms_per_mb == doc["handoff_ms_per_mb"]
    assert 0 <= doc["handoff_ms_per_mb"] * 0.6 < min(measured["period_ms"])
    # both plans' queue time per stage or relay, once per round; a hand-off between threads
    # costs something, and far less than a request
    assert len(measured["queue_ms"]) == 4 and stored.queue_ms == doc["queue_ms"]
    assert 0 < doc["queue_ms"] < min(measured["period_ms"])
    assert 0 <= doc["request_ms"] < max(measured["period_ms"])


def test_client_and_forwarder_costs_from_the_host_figures() -> None:
    from optisplit.calibrate import PROBE_FACTORY, PROBE_MODEL, _HostCosts
    from optisplit.chain import load_chain
    from optisplit.testbed import load_testbed

    bed = load_testbed("local3", root=ROOT / "profiles")
    chain = load_chain(PROBE_MODEL, module=PROBE_FACTORY)
    helpers = _HostCosts(bed, chain)
    assert helpers.cores  # local3's devices share this host: the helpers have cores
    copies = Overheads().copy_ms(chain.input_bytes) + Overheads().copy_ms(chain.output_bytes)

    def figures(devices: dict[str, float], forwarder: float, client: float) -> dict[str, object]:
        # the helper cores carry the client, the forwarder, the client's copies and the share
        # of each device pinned there
        busy = client + forwarder + copies
        for name, ms in devices.items():
            pinned = bed.devices[name].cores or ()
            busy += ms * sum(c in helpers.cores for c in pinned) / len(pinned)
        cores = {str(c): busy / len(helpers.cores) for c in helpers.cores}
        return {
            "host": {
                "devices_ms": devices,
                "watched_ms": {"forwarder": forwarder},
                "cores_ms": {**cores, "99": 5.0},  # cores outside the helpers do not count
            }
        }

    # a forwarder that costs 0.05 ms per message and 2 ms per MB; four messages per request:
    # input in, the source's transfer, the output back, the output out
    half, blocks = chain.n_blocks // 2, chain.n_blocks
    inp, out, cut = chain.input_bytes, chain.output_bytes, chain.cuts[half - 1].bytes
    split_mb, alone_mb = (inp + cut + 2 * out) / 1e6, (2 * inp + 2 * out) / 1e6
    split, alone = f"slow1[0:{half}] -> fast[{half}:{blocks}]", f"fast[0:{blocks}]"
    for client in (0.5, 0.7):
        helpers.add(split, figures({"slow1": 4.0, "fast": 3.0}, 0.2 + 2 * split_mb, client))
        helpers.add(alone, figures({"slow1": 0.4, "fast": 6.5}, 0.2 + 2 * alone_mb, client))
    assert helpers.client_ms() == pytest.approx(0.6)  # median of 0.5, 0.5, 0.7, 0.7
    assert helpers.forward_terms() == pytest.approx((0.05, 2.0))
    assert helpers.request_cpu_ms() is None  # the measurements had no stage compute

    # the runtime's CPU on the source: its worker's CPU less its stage's compute (wall time at
    # pace 0.4) and copies, over the stage and the output relay
    copy = Overheads().copy_ms
    measured = figures({"slow1": 4.0, "fast": 3.0}, 0.2, 0.5)
    measured["stages"] = [
        {"device": "slow1", "start": 0, "end": half, "compute_ms": 7.5},
        {"device": "fast", "start": half, "end": blocks, "compute_ms": 3.0},
    ]
    helpers.add(split, measured)
    expected = (4.0 - 7.5 * 0.4 - copy(cut) - copy(out)) / 2
    assert helpers.request_cpu_ms() == pytest.approx(expected)
    # a measurement without per-core figures, and a testbed of separate machines, add nothing
    helpers.add(split, {"host": {}})
    assert len(helpers.clients) == 5
    pair = _HostCosts(two_device_testbed(rtt_ms=0.2, mbps=1000.0), chain)
    pair.add(f"a[0:{blocks}]", figures({}, 0.1, 0.7))
    assert pair.cores == () and pair.client_ms() == 0.0 and pair.forward_terms() == (0.0, 0.0)


def test_waiting_shares_from_the_whole_probe_plans_of_both_probes() -> None:
    """The slope of each process's CPU per request against the period is its waiting share; the
    per-request terms are read with that share times their plan's period taken off."""
    from optisplit.calibrate import LONG_PROBE_FACTORY, PROBE_FACTORY, PROBE_MODEL, _HostCosts
    from optisplit.chain import load_chain
    from optisplit.testbed import load_testbed

    bed = load_testbed("local", root=ROOT / "profiles")
    chain = load_chain(PROBE_MODEL, module=PROBE_FACTORY)
    long_chain = load_chain(PROBE_MODEL, module=LONG_PROBE_FACTORY)
    assert long_chain.n_blocks > chain.n_blocks
    assert long_chain.input_bytes == chain.input_bytes
    helpers = _HostCosts(bed, chain)
    assert bed.source == "slow" and helpers.cores == (1,)  # slow's core carries the helpers
    copy = Overheads().copy_ms
    copies = copy(chain.input_bytes) + copy(chain.output_bytes)

    def alone(period: float) -> dict[str, object]:
        # relay 0.3 ms + 4 % of the period; client 0.5 + 3 %; forwarder 0.2 + 1 %
        relay, client, forwarder = 0.3 + 0.04 * period, 0.5 + 0.03 * period, 0.2 + 0.01 * period
        return {
            "throughput_rps": 1000.0 / period,
            "host": {
                "devices_ms": {"slow": relay, "fast": period},
                "watched_ms": {"forwarder": forwarder},
                "cores_ms": {"1": relay + client + forwarder + copies, "0": period},
            },
        }

    for period in (7.0, 27.0, 7.5):
        long_plan = period > 20
        blocks = (long_chain if long_plan else chain).n_blocks
        cuts = [long_chain.input_bytes, *(c.bytes for c in long_chain.cuts)]
        helpers.add(
            f"fast[0:{blocks}]",
            alone(period),
            cut_bytes=[*cuts, long_chain.output_bytes] if long_plan else None,
            alone=True,
        )
    assert helpers.worker_wait_share() == pytest.approx(0.04)
    assert helpers.client_wait_share() == pytest.approx(0.03 + 0.01)
    assert helpers.client_ms() == pytest.approx(0.5)  # what a request costs, waiting aside
    message, _ = helpers.forward_terms()
    assert message == pytest.approx(0.2 / 4)  # four messages per request
    # plans of other shapes add per-request samples but do not move the shares
    half = chain.n_blocks // 2
    helpers.add(f"slow[0:{half}] -> fast[{half}:{chain.n_blocks}]", alone(12.0))
    assert helpers.worker_wait_share() == pytest.approx(0.04)
    # one of three rounds disturbed by other work on the core moves a third of the slopes
    # between short and long plans, not their median
    disturbed = alone(26.0)
    disturbed["host"]["cores_ms"]["1"] += 8.0  # type: ignore[index]
    helpers.add(f"fast[0:{long_chain.n_blocks}]", alone(28.0), alone=True)
    helpers.add(f"fast[0:{long_chain.n_blocks}]", disturbed, alone=True)
    assert helpers.client_wait_share() == pytest.approx(0.04)
    # periods too close together fix no share
    close = _HostCosts(bed, chain)
    for period in (7.0, 8.0):
        close.add(f"fast[0:{chain.n_blocks}]", alone(period), alone=True)
    assert close.worker_wait_share() == 0.0 and close.client_wait_share() == 0.0
