"""The cost model against hand-computed values, memory and feasibility, and its errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from synthetic import synthetic_profile, two_device_testbed, write_profiles

from optisplit.cost import CostModel, Overheads, load_cost_model
from optisplit.errors import InvalidPlanError, ProfileError
from optisplit.plan import Plan
from optisplit.profile import BlockProfile
from optisplit.testbed import Device, Link, Testbed

MIB = 2**20


def _pair_model(overheads: Overheads, depth: int | None = None) -> CostModel:
    profile = synthetic_profile(
        3, times_ms=[10, 20, 30], cut_bytes=[125_000, 250_000, 12_500, 1_250]
    )
    testbed = two_device_testbed(rtt_ms=2.0, mbps=100.0, scale_b=0.5)
    return CostModel(testbed, {"a": profile, "b": profile}, overheads=overheads, depth=depth)


def test_two_devices_bare_formulas() -> None:
    model = _pair_model(Overheads.none())
    e = model.evaluate(Plan.parse("a[0:1] -> b[1:3]"))
    # a computes 10; cut 1 (250 kB at 100 Mbit/s = 20 ms + 1 ms one way); b computes 25;
    # the output returns to the sink a (1.25 kB = 0.1 ms + 1 ms)
    assert e.latency_ms == pytest.approx(10 + 21 + 25 + 1.1)
    assert [s.compute_ms for s in e.stages] == pytest.approx([10, 25])
    assert [(t.src, t.dst, t.bytes) for t in e.transfers] == [
        ("a", "b", 250_000),
        ("b", "a", 1_250),
    ]
    assert [t.ms for t in e.transfers] == pytest.approx([21, 1.1])
    # bottleneck: b's 25 ms (link a->b is busy 20 ms); 4 requests in flight hide the latency
    assert e.throughput_rps == pytest.approx(40.0) and e.bound == "device b"
    assert e.items_per_s == pytest.approx(40.0)
    single = model.evaluate(Plan.parse("a[0:3]"))
    assert single.latency_ms == pytest.approx(60) and single.transfers == ()
    assert single.throughput_rps == pytest.approx(1000 / 60)


def test_depth_bounds_throughput() -> None:
    e = _pair_model(Overheads.none(), depth=1).evaluate(Plan.parse("a[0:1] -> b[1:3]"))
    assert e.throughput_rps == pytest.approx(1000 / 57.1) and e.bound == "in flight"
    unbounded = _pair_model(Overheads.none(), depth=0).evaluate(Plan.parse("a[0:1] -> b[1:3]"))
    assert unbounded.throughput_rps == pytest.approx(40.0)


def test_message_and_copy_overheads() -> None:
    # copy at 1 Gbit/s: n bytes take n * 8e-6 ms on each side
    model = _pair_model(Overheads(message_ms=0.5, copy_gbps=1.0, buffers=0))
    e = model.evaluate(Plan.parse("a[0:1] -> b[1:3]"))
    assert [t.ms for t in e.transfers] == pytest.approx([1 + 20 + 0.5 + 2, 1 + 0.1 + 0.5 + 0.01])
    assert e.latency_ms == pytest.approx(10 + 23.5 + 25 + 1.61)
    # b: 25 compute + 2 receiving + 0.01 sending; a: 10 + 2 sending + 0.01 receiving the output
    assert e.throughput_rps == pytest.approx(1000 / 27.01)


def test_a_stage_pays_its_first_blocks_start() -> None:
    # block 1 takes 20 ms in the chain and 23 ms as a stage's first block; block 0's start is
    # in its time already (no entry measured), block 2 starts no slower than in the chain
    profile = synthetic_profile(
        3,
        times_ms=[10, 20, 30],
        cut_bytes=[125_000, 250_000, 12_500, 1_250],
        entry_ms=[None, 23.0, 29.0],
    )
    testbed = two_device_testbed(rtt_ms=2.0, mbps=100.0, scale_b=0.5)
    bare = Overheads.none()
    with_entry = dataclasses.replace(bare, stage_entry=True)
    model = CostModel(testbed, {"a": profile, "b": profile}, overheads=with_entry)
    assert model.entry_costs("a") == pytest.approx((0.0, 3.0, 0.0))
    assert model.entry_costs("b") == pytest.approx((0.0, 1.5, 0.0))  # scaled as its blocks
    e = model.evaluate(Plan.parse("a[0:1] -> b[1:3]"))
    assert [s.compute_ms for s in e.stages] == pytest.approx([10, 25 + 1.5])
    assert e.latency_ms == pytest.approx(10 + 21 + 26.5 + 1.1)
    assert e.throughput_rps == pytest.approx(1000 / 26.5)
    # a stage from block 0 and one from block 2 pay nothing extra
    assert model.evaluate(Plan.parse("a[0:3]")).latency_ms == pytest.approx(60)
    assert model.compute_ms("a", 2, 3) == pytest.approx(30)
    off = CostModel(testbed, {"a": profile, "b": profile}, overheads=bare)
    assert off.entry_costs("b") == (0.0, 0.0, 0.0)
    assert off.evaluate(Plan.parse("a[0:1] -> b[1:3]")).latency_ms == pytest.approx(57.1)


def test_request_overhead_is_busy_time_not_latency() -> None:
    bare = _pair_model(Overheads.none(), depth=0)
    loaded = _pair_model(dataclasses.replace(Overheads.none(), request_ms=3.0), depth=0)
    plan = Plan.parse("a[0:1] -> b[1:3]")
    assert loaded.evaluate(plan).latency_ms == pytest.approx(bare.evaluate(plan).latency_ms)
    # b: 25 compute + 3 per request; a: 10 + 3
    assert loaded.evaluate(plan).throughput_rps == pytest.approx(1000 / 28)
    # a runs no stage but relays the input and the output: 3 ms each, beside b's 30 + 3
    alone = Plan.parse("b[0:3]")
    assert loaded.evaluate(alone).throughput_rps == pytest.approx(1000 / 33)
    assert loaded.idle_busy("a") == pytest.approx(6.0)
    assert loaded.stage_busy("b", 0, 3, first=True, last=True) == pytest.approx(33.0)
    # a running the last stage only also relays the input to the first
    assert loaded.stage_busy("a", 2, 3, first=False, last=True) == pytest.approx(30 + 3 + 3)


@pytest.mark.parametrize(
    ("plan", "slots"),
    [
        ("a[0:3]", 1),  # a is source and sink: one stage, no relay
        ("a[0:1] -> b[1:3]", 3),  # a relays the output at the sink
        ("b[0:3]", 3),  # a relays the input and the output
        ("b[0:1] -> a[1:3]", 3),  # a relays the input to b, then runs the last stage
    ],
)
def test_queue_time_is_latency_per_stage_and_relay(plan: str, slots: int) -> None:
    bare = _pair_model(Overheads.none(), depth=0)
    queued = _pair_model(dataclasses.replace(Overheads.none(), queue_ms=0.25), depth=0)
    parsed = Plan.parse(plan)
    assert queued.queue_slots(parsed) == slots
    before, after = bare.evaluate(parsed), queued.evaluate(parsed)
    assert after.latency_ms == pytest.approx(before.latency_ms + 0.25 * slots)
    # the threads of a stage overlap while requests stream: no device is busier for it
    assert after.throughput_rps == pytest.approx(before.throughput_rps)


def _star_model(sink: str = "cam") -> CostModel:
    """A camera (source, and sink by default) and two workers behind a switch."""
    devices = {
        "cam": Device("cam", profile="host"),
        "x": Device("x", profile="host"),
        "y": Device("y", profile="host", scale=2.0, memory_bytes=5 * MIB),
    }
    links = (
        Link("cam", "sw", rtt_ms=2.0, mbps=10.0),
        Link("x", "sw", rtt_ms=1.0, mbps=100.0),
        Link("y", "sw", rtt_ms=1.0, mbps=100.0),
    )
    testbed = Testbed("star", devices, links, "cam", sink, ("sw",))
    profile = synthetic_profile(
        3,
        times_ms=[4, 6, 8],
        cut_bytes=[12_500, 50_000, 25_000, 2_500],
        param_bytes=[1 * MIB, 2 * MIB, 3 * MIB],
        mem_bytes=[MIB, MIB, MIB],
    )
    return CostModel(testbed, dict.fromkeys(devices, profile), overheads=Overheads.none())


def test_multi_hop_with_a_source_outside_the_plan() -> None:
    e = _star_model().evaluate(Plan.parse("x[0:2] -> y[2:3]"))
    # input cam->sw->x: 1 + 0.5 ms + 12.5 kB at the 10 Mbit/s bottleneck (10 ms)
    # cut 2 x->sw->y: 0.5 + 0.5 + 2 ms; output y->sw->cam: 0.5 + 1 + 2 ms
    assert [(t.src, t.dst, t.bytes) for t in e.transfers] == [
        ("cam", "x", 12_500),
        ("x", "y", 25_000),
        ("y", "cam", 2_500),
    ]
    assert [t.ms for t in e.transfers] == pytest.approx([11.5, 3.0, 3.5])
    assert e.latency_ms == pytest.approx(11.5 + 10 + 3 + 16 + 3.5)
    # busiest: y computing 16 ms (the cam->sw link is busy 10 ms); depth 4 -> 44/4 = 11 < 16
    assert e.throughput_rps == pytest.approx(1000 / 16)
    assert set(e.memory_bytes) == {"x", "y"}


def test_sink_elsewhere_is_routed() -> None:
    e = _star_model(sink="x").evaluate(Plan.parse("y[0:3]"))
    # input cam->sw->y 11.5 ms; y computes 2 x 18 ms; output y->sw->x: 1 ms + 2.5 kB at 100 Mbit/s
    assert [(t.src, t.dst) for t in e.transfers] == [("cam", "y"), ("y", "x")]
    assert [t.ms for t in e.transfers] == pytest.approx([11.5, 1.2])
    assert e.latency_ms == pytest.approx(11.5 + 36 + 1.2)
    assert e.throughput_rps == pytest.approx(1000 / 36)


def test_transfers_sharing_a_link_direction_add_up() -> None:
    e = _star_model().evaluate(Plan.parse("x[0:1] -> cam[1:2] -> y[2:3]"))
    # sw->cam carries cut 1 (50 kB at 10 Mbit/s: 40 ms) and the output (2 ms): 42 ms busy
    assert e.latency_ms == pytest.approx(11.5 + 4 + 41.5 + 6 + 21.5 + 16 + 3.5)
    assert e.throughput_rps == pytest.approx(1000 / 42) and e.bound == "link sw->cam"


def test_memory_and_feasibility() -> None:
    model = _star_model()
    e = model.evaluate(Plan.parse("x[0:1] -> y[1:3]"))
    # y holds blocks 1-2: 5 MiB of parameters + 1 MiB peak > its 5 MiB limit
    assert e.memory_bytes == {"x": 2 * MIB, "y": 6 * MIB}
    assert not e.feasible
    assert model.evaluate(Plan.parse("y[0:1] -> x[1:3]")).feasible
    buffered = CostModel(
        model.testbed,
        {d: synthetic_profile(3, seed=1, cut_bytes=[10, 20, 30, 40]) for d in model.devices},
        overheads=Overheads(buffers=2),
    )
    stage = buffered.evaluate(Plan.parse("x[0:2] -> y[2:3]"))
    params = synthetic_profile(3, seed=1, cut_bytes=[10, 20, 30, 40]).blocks
    peak = max(b.mem_bytes for b in params[:2])
    assert stage.memory_bytes["x"] == params[0].param_bytes + params[1].param_bytes + peak + 2 * (
        10 + 30
    )


def test_to_dict_keys() -> None:
    doc = _pair_model(Overheads()).evaluate(Plan.parse("a[0:2] -> b[2:3]")).to_dict()
    assert list(doc) == [
        "plan",
        "latency_ms",
        "throughput_rps",
        "items_per_s",
        "memory_bytes",
        "feasible",
        "stages",
        "transfers",
        "bound",
    ]
    assert doc["plan"] == "a[0:2] -> b[2:3]"
    assert list(doc["stages"][0]) == ["device", "start", "end", "compute_ms"]
    assert list(doc["transfers"][0]) == ["src", "dst", "bytes", "ms"]


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        ("a[0:1] -> z[1:3]", "unknown device 'z'"),
        ("a[0:1] -> b[1:4]", "ends at block 4, but synth .* has 3 blocks"),
        ("a[0:1] -> a[1:3]", "device 'a' appears twice"),
        ("a[0:1] -> b[2:3]", "gap in plan"),
        ("a[0:2] -> b[1:3]", "overlap in plan"),
    ],
)
def test_plan_errors_are_one_line(plan: str, expected: str) -> None:
    with pytest.raises(InvalidPlanError, match=expected) as info:
        _pair_model(Overheads()).evaluate(Plan.parse(plan))
    assert "\n" not in str(info.value)


def test_missing_and_mismatched_profiles(tmp_path: Path) -> None:
    testbed = two_device_testbed()
    with pytest.raises(ProfileError) as info:
        load_cost_model("synth", testbed, profiles_root=str(tmp_path))
    assert "device a" in str(info.value)
    assert str(tmp_path / "devices" / "host" / "synth-b1.json") in str(info.value)
    write_profiles(tmp_path, synthetic_profile(4, seed=3), ["host"])
    model = load_cost_model("synth", testbed, profiles_root=str(tmp_path))
    assert model.n_blocks == 4 and model.block_ms("b", 0) == pytest.approx(
        0.5 * model.block_ms("a", 0)
    )
    with pytest.raises(ProfileError, match="disagree"):
        CostModel(testbed, {"a": synthetic_profile(4), "b": synthetic_profile(5)})
    with pytest.raises(ProfileError, match="no profile for device b"):
        CostModel(testbed, {"a": synthetic_profile(4)})


def _cli_setup(tmp_path: Path) -> list[str]:
    import yaml

    write_profiles(tmp_path, synthetic_profile(4, seed=2), ["host"])
    (tmp_path / "testbeds").mkdir()
    (tmp_path / "testbeds" / "pair.yaml").write_text(
        yaml.safe_dump(two_device_testbed().to_dict())
    )
    return ["--testbed", "pair", "--profiles", str(tmp_path)]


def test_evaluate_command_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from optisplit.cli import main

    common = _cli_setup(tmp_path)
    plans = ["--plan", "a[0:4]", "--plan", "a[0:2] -> b[2:4]"]
    assert main(["evaluate", "synth", *common, *plans, "--condition", "wifi", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["plan"] for o in out] == ["a[0:4]", "a[0:2] -> b[2:4]"]
    assert set(out[1]) == {
        "plan", "latency_ms", "throughput_rps", "items_per_s", "memory_bytes", "feasible",
        "stages", "transfers", "bound",
    }  # fmt: skip
    # wifi: 10 ms RTT, so the cut transfer takes at least 5 ms one way
    assert out[1]["transfers"][0]["ms"] > 5
    assert out[0]["bound"] == "device a"  # one device, its requests pipelined
    assert main(["evaluate", "synth", *common, *plans[:2], "--link-mbps", "3"]) == 0
    table = capsys.readouterr().out
    assert "a[0:4]" in table and "bound by" in table


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--plan", "a[0:2] -> q[2:4]"], 2, "unknown device 'q'"),
        (["--plan", "a[0:2] -> b[3:4]"], 2, "gap in plan"),
        (["--plan", "a[0:4]", "--condition", "storm"], 2, "unknown link condition 'storm'"),
        (["--plan", "a[0:4]", "--batch-size", "8"], 1, "synth-b8.json"),
    ],
)
def test_evaluate_command_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], code: int, message: str
) -> None:
    from optisplit.cli import main

    assert main(["evaluate", "synth", *_cli_setup(tmp_path), *extra]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def model_profile() -> BlockProfile:
    return synthetic_profile(3, times_ms=[10, 20, 30], cut_bytes=[125_000, 250_000, 12_500, 1_250])


def _shared_host(client_ms: float, *, pinned: bool = True) -> CostModel:
    """Two paced devices sharing core 1 and a fast one on core 0, all linked directly."""
    profile = model_profile()

    def device(name: str, core: int, quota: float, **more: object) -> Device:
        return Device(
            name,
            profile="host",
            cores=(core,) if pinned else None,
            cpu_quota=quota,
            throttle="pace" if quota < 1 else "quota",
            **more,  # type: ignore[arg-type]
        )

    devices = {
        "s1": device("s1", 1, 0.4),
        "s2": device("s2", 1, 0.3),
        "f": device("f", 0, 1.0, scale=0.1),
    }
    links = tuple(Link(a, b, 0.0, 1000.0) for a, b in (("s1", "s2"), ("s1", "f"), ("s2", "f")))
    testbed = Testbed("shared", devices, links, "s1", "s1")
    overheads = dataclasses.replace(Overheads.none(), client_ms=client_ms, forward_ms_per_mb=10.0)
    profiles = dict.fromkeys(devices, profile)
    return CostModel(testbed, profiles, overheads=overheads, depth=0)


def test_shared_host_cores_bound_throughput() -> None:
    plan = Plan.parse("s1[0:1] -> s2[1:2] -> f[2:3]")
    model = _shared_host(client_ms=8.0)
    assert model.testbed.host_cores == (0, 1)
    # core 1: s1 computes 10 ms at pace 0.4 (4 ms of CPU), s2 20 ms at 0.3 (6 ms), and the
    # helpers (core 1 has the least allotted: 0.7 of it) take the client's 8 ms plus 10 ms per
    # MB forwarded: the input from the client (125 kB), 250 kB, 12.5 kB, the output back to s1
    # and on to the client (1.25 kB twice); core 0: f's 3 ms
    loads = model.core_loads(plan)
    forwarded = (125_000 + 250_000 + 12_500 + 2 * 1_250) / 1e6 * 10
    assert loads == pytest.approx({0: 3.0, 1: 4 + 6 + 8 + forwarded})
    # s2's own bound is its 20 ms (paced); the shared core is busier
    evaluation = model.evaluate(plan)
    assert evaluation.throughput_rps == pytest.approx(1000 / (18 + forwarded))
    assert evaluation.bound == "core 1"
    # a fixed cost per forwarded message: 5 messages
    per_message = CostModel(
        model.testbed,
        dict.fromkeys(model.devices, model_profile()),
        overheads=dataclasses.replace(model.overheads, forward_ms=0.5),
        depth=0,
    )
    assert per_message.core_loads(plan)[1] == pytest.approx(loads[1] + 5 * 0.5)
    # with little client work the devices' own bound is back
    relieved = _shared_host(client_ms=1.0).evaluate(plan)
    assert relieved.throughput_rps == pytest.approx(50.0) and relieved.bound == "device s2"
    # devices that are machines of their own share no cores
    apart = _shared_host(client_ms=8.0, pinned=False)
    assert apart.testbed.host_cores is None and apart.core_loads(plan) == {}
    assert apart.evaluate(plan).throughput_rps == pytest.approx(50.0)


def test_waiting_shares_take_their_part_of_the_cores_they_run_on() -> None:
    """The client's and forwarder's waiting share takes its part of the helper core, and the
    source's and sink's worker's of their cores; the per-request work gets the rest."""
    plan = Plan.parse("s1[0:1] -> s2[1:2] -> f[2:3]")
    base = _shared_host(client_ms=8.0)
    waiting = CostModel(
        base.testbed,
        dict.fromkeys(base.devices, model_profile()),
        overheads=dataclasses.replace(
            base.overheads, client_wait_share=0.15, worker_wait_share=0.05
        ),
        depth=0,
    )
    # core 1 holds the helpers and s1, the source and sink: 0.8 of it is left; core 0 (f only)
    # keeps all of it
    before, after = base.core_loads(plan), waiting.core_loads(plan)
    assert after == pytest.approx({0: before[0], 1: before[1] / 0.8})
    assert waiting.evaluate(plan).throughput_rps == pytest.approx(1000 / after[1])
    # a worker pinned to two cores spreads its share over them
    spread = dataclasses.replace(
        base.testbed,
        devices={
            **base.testbed.devices,
            "s1": dataclasses.replace(base.testbed.devices["s1"], cores=(0, 1)),
        },
    )
    shares = CostModel(
        spread,
        dict.fromkeys(base.devices, model_profile()),
        overheads=dataclasses.replace(Overheads.none(), worker_wait_share=0.2),
        depth=0,
    )
    assert shares.core_load("f", 9.0) == pytest.approx({0: 9.0 / 0.9})
    assert shares.helper_load(9.0) == pytest.approx({1: 9.0 / 0.9})


def test_shared_host_counts_idle_relays_and_client_copies() -> None:
    model = _shared_host(client_ms=0.0)
    model = CostModel(
        model.testbed,
        dict.fromkeys(model.devices, synthetic_profile(3, times_ms=[10, 20, 30])),
        overheads=Overheads(copy_gbps=1.0, request_ms=0.5, client_ms=0.0),
        depth=0,
    )
    # the source s1 runs no stage but relays the input and the output (request_ms each, plus
    # copies), and the client copies the input out and the output in
    loads = model.core_loads(Plan.parse("f[0:3]"))
    copy = model.overheads.copy_ms
    relay = 2 * 0.5 + copy(model.cut_bytes[0]) + copy(model.cut_bytes[-1])
    client = copy(model.cut_bytes[0]) + copy(model.cut_bytes[-1])
    assert loads[1] == pytest.approx(relay + client)
    f_cpu = 0.1 * 60 + 0.5 + copy(model.cut_bytes[0]) + copy(model.cut_bytes[-1])
    assert loads[0] == pytest.approx(f_cpu)


def test_runtime_cpu_per_request_on_shared_cores() -> None:
    """``request_cpu_ms`` is what each stage or relay costs a core; ``request_ms`` the device."""
    base = _shared_host(client_ms=0.0)
    plan = Plan.parse("f[0:3]")  # s1 relays the input and the output
    overheads = Overheads(copy_gbps=0.0, request_ms=0.5, request_cpu_ms=2.0)
    model = CostModel(
        base.testbed, dict.fromkeys(base.devices, model_profile()), overheads=overheads, depth=0
    )
    assert model.core_loads(plan) == pytest.approx({0: 0.1 * 60 + 2.0, 1: 2 * 2.0})
    assert model.stage_busy("f", 0, 3, first=True, last=True) == pytest.approx(6.5)
    # core 0 runs f's work alone: the bound is f's, at the core's 8 ms
    evaluation = model.evaluate(plan)
    assert evaluation.bound == "device f" and evaluation.throughput_rps == pytest.approx(125.0)
    # without request_cpu_ms the cores take request_ms
    plain = CostModel(
        base.testbed,
        dict.fromkeys(base.devices, model_profile()),
        overheads=dataclasses.replace(overheads, request_cpu_ms=None),
        depth=0,
    )
    assert plain.core_loads(plan) == pytest.approx({0: 6.5, 1: 1.0})
