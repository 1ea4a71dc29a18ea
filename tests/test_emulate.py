"""Emulated testbeds: routes per device pair, the launcher, and (as root) up/status/down round
trips with shaped links and CPU quotas, cleanup after a crash, and the loopback fallback."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from optisplit import emulate
from optisplit.emulate import cgroup, checks, delay, netns, sandbox, state
from optisplit.emulate.shaping import pair_paths
from optisplit.errors import UsageError
from optisplit.testbed import load_testbed

if TYPE_CHECKING:
    from optisplit.testbed import Testbed

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="building namespaces needs root")


def _write_testbed(folder: Path, name: str, body: str) -> Testbed:
    path = folder / f"{name}.yaml"
    path.write_text(f"schema_version: 1\nname: {name}\n{body}")
    return load_testbed(str(path))


TWO_DEVICES = """\
source: slow
devices:
  slow: {cores: [0], cpu_quota: 0.25}
  fast: {cores: [1], cpu_quota: 0.5}
links:
  - {between: [slow, fast], rtt_ms: 20, mbps: 50}
"""


@pytest.fixture(scope="module")
def unique() -> str:
    return f"t{os.getpid()}"


# ------------------------------------------------------------------------------- pure parts


def test_pair_paths_follow_multi_hop_routes(tmp_path: Path) -> None:
    testbed = _write_testbed(
        tmp_path,
        "hops",
        """\
source: a
switches: [sw]
devices:
  a: {}
  b: {}
  c: {}
links:
  - {between: [a, sw], rtt_ms: 2, mbps: 100, loss_pct: 10}
  - {between: [sw, b], rtt_ms: 4, mbps: 40, jitter_ms: 0.5}
  - {between: [a, c], rtt_ms: 10, mbps: 1000}
""",
    )
    paths = {(p.src, p.dst): p for p in pair_paths(testbed)}
    assert len(paths) == 6  # every ordered pair of distinct devices
    ab = paths[("a", "b")]
    assert ab.one_way_ms == pytest.approx(3.0)  # (2 + 4) / 2
    assert ab.rtt_ms == pytest.approx(6.0)
    assert ab.mbps == 40  # the bottleneck hop
    assert ab.jitter_ms == pytest.approx(0.5)
    assert ab.loss_pct == pytest.approx(10.0)
    assert paths[("b", "a")] == type(ab)("b", "a", 3.0, 40, 0.5, pytest.approx(10.0))
    assert paths[("a", "c")].mbps == 1000 and paths[("a", "c")].one_way_ms == 5.0
    bc = paths[("b", "c")]  # b -> sw -> a -> c
    assert bc.rtt_ms == pytest.approx(16.0) and bc.mbps == 40


def _packet(src: bytes, dst: bytes, size: int) -> bytes:
    header = bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0]) + src + dst
    return header + bytes(size - len(header))


def test_forwarder_serialises_then_delays_each_pair_in_order() -> None:
    a, b, host = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), bytes([10, 0, 0, 254])
    read_b, write_b = os.pipe()
    try:
        paths = {
            # 8 Mbit/s = 1 MB/s, 5 ms one way, no jitter or loss
            (a, b): delay._Path(rate_bytes_per_s=1e6, delay_s=0.005, jitter_s=0.0, loss=0.0),
        }
        fwd = delay.Forwarder({b: write_b}, paths, seed=0)
        fwd._admit(_packet(a, b, 10_000), now=1.0)  # 10 ms on the wire
        fwd._admit(_packet(a, b, 1_000), now=1.0)  # queued behind it: 1 ms more
        fwd._admit(_packet(host, b, 500), now=1.0)  # host traffic is not shaped
        fwd._admit(_packet(a, bytes([10, 0, 0, 9]), 500), now=1.0)  # unknown: dropped
        fwd._admit(b"\x60" + bytes(60), now=1.0)  # IPv6: dropped
        due = sorted(round(h.due - 1.0, 6) for h in fwd._held)
        assert due == [0.0, 0.015, 0.016]
        fwd._deliver(now=1.0151)
        assert len(fwd._held) == 1
        assert len(os.read(read_b, 1 << 16)) == 500 + 10_000
        # an idle link starts afresh: no credit saved up while idle
        fwd._admit(_packet(a, b, 1_000), now=2.0)
        assert max(h.due for h in fwd._held) == pytest.approx(2.0 + 0.001 + 0.005)
    finally:
        os.close(read_b)
        os.close(write_b)


def test_forwarder_loss_and_jitter_keep_order() -> None:
    a, b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    read_b, write_b = os.pipe()
    try:
        path = delay._Path(rate_bytes_per_s=None, delay_s=0.010, jitter_s=0.004, loss=0.25)
        fwd = delay.Forwarder({b: write_b}, {(a, b): path}, seed=3)
        for i in range(2000):
            fwd._admit(_packet(a, b, 100), now=i * 0.001)
        kept = [h.due for h in sorted(fwd._held, key=lambda h: h.seq)]
        assert 0.70 < len(kept) / 2000 < 0.80 and path.dropped == 2000 - len(kept)
        assert kept == sorted(kept)  # jitter never reorders a path
        assert kept[0] >= 0.006 - 1e-9 and kept[-1] <= 1.999 + 0.014 + 1e-9
    finally:
        os.close(read_b)
        os.close(write_b)


def test_cfs_quota_only_where_it_limits() -> None:
    def device(
        quota: float | None, cores: tuple[int, ...] | None, throttle: str = "quota"
    ) -> state.DeviceState:
        return state.DeviceState("d", "ns", "10.0.0.1", None, cores, quota, throttle)

    assert sandbox.cfs_quota(device(0.5, (0,))) == 0.5
    assert sandbox.cfs_quota(device(1.0, (0,))) is None
    assert sandbox.cfs_quota(device(2.0, None)) == 2.0
    assert sandbox.cfs_quota(device(None, (0,))) is None
    assert sandbox.cfs_quota(device(0.5, (0,), "pace")) is None


def test_a_paced_device_keeps_its_anchor_across_conditions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The anchor travels in the state and to the launcher; a testbed brought up again with
    other links keeps it; a new paced device gets one measured on its cores."""
    core = min(os.sched_getaffinity(0))
    paced = state.DeviceState("slow", "ns-s", "10.0.0.1", None, (core,), 0.5, "pace", 0.31)
    plain = state.DeviceState("fast", "ns-f", "10.0.0.2", None, (core,), None)
    bed = state.TestbedState("t", 0, {"slow": paced, "fast": plain}, "h", "10.0.0.254", "fw")
    again = state.TestbedState.from_dict(bed.to_dict())
    assert again.devices["slow"].anchor_ms == 0.31 and again.devices["fast"].anchor_ms is None
    old = bed.to_dict()
    del old["devices"]["slow"]["anchor_ms"]  # a state written before anchors: plain pacing
    assert state.TestbedState.from_dict(old).devices["slow"].anchor_ms is None
    prefix = sandbox.command_prefix(bed, "slow")
    assert prefix[prefix.index("--anchor") + 1] == "0.31" and "--pace" in prefix
    assert "--anchor" not in sandbox.command_prefix(bed, "fast")

    fresh = {"slow": dataclasses.replace(paced, anchor_ms=None), "fast": plain}
    kept = sandbox._kept_anchors(bed)
    assert sandbox._anchored(fresh, kept)["slow"].anchor_ms == 0.31
    # other cores or another pace: measured again (briefly here), the margin on top
    monkeypatch.setattr(sandbox, "ANCHOR_SECONDS", 0.1)
    monkeypatch.setattr(sandbox, "ANCHOR_MARGIN", 1000.0)
    faster = {"slow": dataclasses.replace(paced, cpu_quota=0.6, anchor_ms=None), "fast": plain}
    faster["slow2"] = dataclasses.replace(paced, name="slow2", cores=None, anchor_ms=None)
    measured = sandbox._anchored(faster, kept)
    assert measured["slow"].anchor_ms is not None and measured["slow"].anchor_ms > 1.0
    assert measured["slow2"].anchor_ms == measured["slow"].anchor_ms  # one for the testbed
    assert measured["fast"].anchor_ms is None  # not paced: nothing to anchor


def test_helpers_go_to_the_core_the_devices_leave_most_room_on() -> None:
    def device(cores: tuple[int, ...] | None, quota: float | None) -> state.DeviceState:
        return state.DeviceState("d", "ns", "10.0.0.1", None, cores, quota, "pace")

    allowed = sorted(os.sched_getaffinity(0))
    spare = tuple(allowed[2:])  # cores no device is pinned to come first
    if len(allowed) >= 2:
        a, b = allowed[:2]
        # local3: a full device on one core, two paced ones (0.4 + 0.3) sharing the other
        devices = [device((a,), 1.0), device((b,), 0.4), device((b,), 0.3)]
        assert sandbox.helper_cores(devices) == (spare or (b,))
        # a device without a quota takes its cores whole; one spread over two takes half each
        assert sandbox.helper_cores([device((a,), None), device((a, b), 0.5)]) == (spare or (b,))
        full = [device((a,), 1.0), device((b,), 0.6), device((b,), 0.4)]
        assert sandbox.helper_cores(full) == (spare or None)
    # nothing pinned: the scheduler places the helpers
    assert sandbox.helper_cores([device(None, 0.5)]) is None
    assert sandbox.helper_cores([]) is None


def test_on_cores_pins_every_thread_and_puts_them_back() -> None:
    import threading

    before = os.sched_getaffinity(0)
    core = min(before)
    seen: dict[str, set[int]] = {}
    go, done = threading.Event(), threading.Event()

    def older() -> None:  # started before the block: pinned too
        go.wait(10)
        seen["older"] = os.sched_getaffinity(0)
        done.wait(10)
        seen["older after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=older)
    thread.start()
    with sandbox.on_cores((core,)):
        seen["main"] = os.sched_getaffinity(0)
        go.set()
        time.sleep(0.05)
    done.set()
    thread.join(10)
    assert seen["main"] == seen["older"] == {core}
    assert os.sched_getaffinity(0) == seen["older after"] == before
    with sandbox.on_cores(None):
        assert os.sched_getaffinity(0) == before


def test_names_are_safe_and_distinct() -> None:
    assert state.netns_name("pi-gpu", "pi1") == "os-pi-gpu.pi1"
    assert state.netns_name("a b/c", "d.e") == "os-a_b_c.d_e"
    assert state.netns_name("pi", "gpu.x") != state.netns_name("pi.gpu", "x")


def test_check_report_names_each_problem() -> None:
    ok = checks.LinkCheck("a", "b", 20.1, 49.9, 20.0, 50.0)
    bad = checks.LinkCheck("b", "a", 31.0, 49.9, 20.0, 50.0, problem="link b->a: RTT 31")
    slow = checks.DeviceCheck("a", "10.0.0.1", (0,), 0.25, 0.1, 0.25, problem="device a: 0.1")
    report = checks.CheckReport("x", True, "forwarder", (slow,), (ok, bad))
    assert not report.ok
    assert report.problems() == ["device a: 0.1", "link b->a: RTT 31"]
    document = report.to_dict()
    assert set(document) >= {"devices", "links", "ok", "emulated"}
    assert {"name", "address", "cores", "cpu_quota", "speed"} <= set(document["devices"][0])
    assert {"src", "dst", "rtt_ms", "mbps"} <= set(document["links"][0])
    assert checks.within(0.45, 0.2, checks.RTT_FLOOR_MS)
    assert not checks.within(0.55, 0.2, checks.RTT_FLOOR_MS)
    assert checks.within(54.9, 50.0) and not checks.within(44.0, 50.0)


def test_launcher_pins_cores_and_runs_the_command() -> None:
    code = "import os; print(sorted(os.sched_getaffinity(0)))"
    launcher = [sys.executable, "-m", "optisplit.emulate.enter", "--cores", "0", "--"]
    out = subprocess.run(
        [*launcher, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[0]"
    bad = subprocess.run(
        [sys.executable, "-m", "optisplit.emulate.enter", "--netns", "os-missing.x", "--", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and "enter:" in bad.stderr


def test_not_up_means_loopback_and_pinning_only(tmp_path: Path, unique: str) -> None:
    testbed = _write_testbed(tmp_path, f"{unique}-idle", TWO_DEVICES)
    assert not emulate.is_up(testbed)
    assert emulate.device_host(testbed, "slow") == "127.0.0.1"
    assert emulate.wrap_command(testbed, "slow", ["echo", "hi"]) == [
        "taskset",
        "-c",
        "0",
        "echo",
        "hi",
    ]
    with pytest.raises(UsageError, match="no device 'gpu'"):
        emulate.wrap_command(testbed, "gpu", ["true"])


def test_without_root_the_cli_warns_and_runs_on_loopback(unique: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="optisplit-user-"))  # readable by an unprivileged user
    folder.chmod(0o755)
    _write_testbed(folder, f"{unique}-user", TWO_DEVICES)
    (folder / f"{unique}-user.yaml").chmod(0o644)
    tmp_path = folder
    command = [
        sys.executable,
        "-m",
        "optisplit",
        "testbed",
        "up",
        str(tmp_path / f"{unique}-user.yaml"),
    ]
    if IS_ROOT:  # drop to an unprivileged user, as a user without root would run it
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    out = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "not root" in out.stderr and "no link shaping" in out.stderr
    report = json.loads(out.stdout)
    assert report["emulated"] is False and report["links"] == []
    assert [d["address"] for d in report["devices"]] == ["127.0.0.1", "127.0.0.1"]
    assert not netns.list_namespaces(f"os-{unique}-user.")
    shutil.rmtree(folder)


# ----------------------------------------------------------------------------- as root


@pytest.fixture(scope="module")
def shaped_file(tmp_path_factory: pytest.TempPathFactory, unique: str) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("testbeds")
    testbed = _write_testbed(folder, f"{unique}-two", TWO_DEVICES)
    out = _cli("up", str(folder / f"{testbed.name}.yaml"), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ok"] is True
    yield folder / f"{testbed.name}.yaml"
    emulate.down(testbed.name)
    assert _leftovers(testbed.name) == []


@pytest.fixture()
def shaped(shaped_file: Path) -> Testbed:
    return load_testbed(str(shaped_file))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optisplit", "testbed", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )


def _leftovers(name: str) -> list[str]:
    safe = state.safe_name(name)
    found = [f"netns {n}" for n in netns.list_namespaces(f"os-{safe}.")]
    tree = cgroup.tree(safe)
    if tree is not None and tree.exists():
        found.append(f"cgroup {tree}")
    if state.state_dir(name).exists():
        found.append(f"state {state.state_dir(name)}")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and sandbox._forwarder_of(int(proc.name)) == str(
            state.state_dir(name)
        ):
            found.append(f"forwarder {proc.name}")
    return found


@pytest.mark.netns
@needs_root
def test_status_measures_links_and_devices_within_spec(shaped: Testbed, shaped_file: Path) -> None:
    assert emulate.is_up(shaped)
    out = _cli("status", str(shaped_file), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["emulated"] is True and report["ok"] is True
    links = {(link["src"], link["dst"]): link for link in report["links"]}
    assert set(links) == {("slow", "fast"), ("fast", "slow")}
    for link in links.values():
        assert link["rtt_ms"] == pytest.approx(20.0, rel=0.10)
        assert link["mbps"] == pytest.approx(50.0, rel=0.10)
    devices = {d["name"]: d for d in report["devices"]}
    # the delay forwarder runs on the core the devices leave most room on (slow's, at 0.25)
    forwarder = state.read_state(shaped.name).forwarder_pid  # type: ignore[union-attr]
    helpers = emulate.helper_cores(shaped)
    assert helpers is None or 1 not in helpers  # fast's core is the busier one
    assert os.sched_getaffinity(forwarder) == set(helpers or os.sched_getaffinity(0))
    assert devices["slow"]["speed"] == pytest.approx(0.25, rel=0.10)
    assert devices["fast"]["speed"] == pytest.approx(0.5, rel=0.10)
    assert devices["slow"]["address"] == emulate.device_host(shaped, "slow") != "127.0.0.1"
    # up again with the same spec keeps what is there
    pid = state.read_state(shaped.name).forwarder_pid  # type: ignore[union-attr]
    assert emulate.up(shaped, check=False) is None
    assert state.read_state(shaped.name).forwarder_pid == pid  # type: ignore[union-attr]


@pytest.mark.netns
@needs_root
def test_wrapped_command_runs_in_the_device_sandbox(shaped: Testbed) -> None:
    code = (
        "import os; print(os.stat('/proc/self/ns/net').st_ino, sorted(os.sched_getaffinity(0)),"
        " os.environ.get('TP_SOCKET_IFNAME'));"
        "print(open('/proc/self/cgroup').read())"
    )
    argv = emulate.wrap_command(shaped, "slow", [sys.executable, "-c", code])
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    first, cgroups = out.stdout.split("\n", 1)
    inode, cores, ifname = first.split(" ", 2)
    ns = state.netns_name(shaped.name, "slow")
    assert int(inode) == os.stat(netns.NETNS_DIR / ns).st_ino
    assert cores == "[0]" and ifname == "os0"
    assert f"optisplit/{state.safe_name(shaped.name)}/slow" in cgroups


@pytest.mark.netns
@needs_root
def test_cpu_quota_slows_a_process_by_its_quota(shaped: Testbed) -> None:
    inside = emulate.wrap_command(shaped, "slow", [])
    wall, cpu = checks._loop_seconds(inside, 0.1)
    assert cpu == pytest.approx(0.1, abs=0.01)
    assert wall == pytest.approx(cpu / 0.25, rel=0.12)  # four times as long at a quota of 0.25


@pytest.mark.netns
@needs_root
def test_down_after_a_crash_leaves_nothing_behind(tmp_path: Path, unique: str) -> None:
    testbed = _write_testbed(tmp_path, f"{unique}-crash", TWO_DEVICES)
    emulate.up(testbed, check=False)
    recorded = state.read_state(testbed.name)
    assert recorded is not None and recorded.forwarder_pid is not None
    # A worker left running on a device, then the forwarder dies without a word.
    worker = subprocess.Popen(emulate.wrap_command(testbed, "fast", ["sleep", "60"]))
    time.sleep(0.3)
    os.kill(recorded.forwarder_pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while emulate.is_up(testbed) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not emulate.is_up(testbed)
    out = _cli("down", str(tmp_path / f"{testbed.name}.yaml"))
    assert out.returncode == 0, out.stderr
    assert "namespace" in out.stdout
    assert worker.wait(timeout=5) == -signal.SIGKILL
    assert _leftovers(testbed.name) == []
    assert not netns.link_exists(recorded.host_if)
    again = _cli("down", testbed.name)  # idempotent
    assert again.returncode == 0 and "nothing was up" in again.stdout


@pytest.mark.netns
@needs_root
def test_status_refuses_a_device_off_spec(tmp_path: Path, unique: str) -> None:
    testbed = _write_testbed(tmp_path, f"{unique}-off", TWO_DEVICES)
    emulate.up(testbed, check=False)
    try:
        group = Path(state.read_state(testbed.name).devices["slow"].cgroup)  # type: ignore[union-attr]
        period = int((group / "cpu.cfs_period_us").read_text())
        (group / "cpu.cfs_quota_us").write_text(str(period // 2))  # 0.5 of a core, spec 0.25
        out = _cli("status", str(tmp_path / f"{testbed.name}.yaml"))
        assert out.returncode == 1
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith("optisplit: error: testbed")
        assert re.search(
            r"device slow: speed 0\.(4[5-9]|5[0-5])\d* of its cores, spec 0\.250", line
        )
    finally:
        emulate.down(testbed.name)
    assert _leftovers(testbed.name) == []
