"""Link probes on loopback: RTT and bandwidth, the token challenge, hostile clients, files."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import pytest
import yaml
from synthetic import two_device_testbed

from optisplit.cli import main
from optisplit.probe import (
    ProbeError,
    ProbeServer,
    load_link_measurements,
    probe_link,
    save_link_measurement,
)

TOKEN = b"s3cret-token"


def test_probe_measures_rtt_and_bandwidth_with_a_token() -> None:
    with ProbeServer("127.0.0.1", 0, TOKEN) as server:
        host, port = server.address
        measured = probe_link(host, port, token=TOKEN, rtt_samples=20, bulk_bytes=2**20)
    assert measured.rtt_samples == 20
    assert 0 < measured.rtt_p10_ms <= measured.rtt_ms <= measured.rtt_p90_ms < 50
    assert measured.up_mbps > 10 and measured.down_mbps > 10
    assert measured.mbps == min(measured.up_mbps, measured.down_mbps)
    assert measured.address == f"{host}:{port}"


def test_token_challenge_refuses_strangers() -> None:
    with ProbeServer("127.0.0.1", 0, TOKEN) as server:
        host, port = server.address
        with pytest.raises(ProbeError, match="requires a token"):
            probe_link(host, port, rtt_samples=2, bulk_bytes=10)
        with pytest.raises(ProbeError, match="does not know our token"):
            probe_link(host, port, token=b"wrong", rtt_samples=2, bulk_bytes=10)
    with ProbeServer("127.0.0.1", 0) as open_server:
        assert (
            probe_link(*open_server.address, token=TOKEN, rtt_samples=2, bulk_bytes=10).rtt_ms > 0
        )


def test_hostile_clients_are_rejected_and_the_server_keeps_serving() -> None:
    frames = [
        b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10,
        b"OSPR\x09\x00\x00\x00" + b"n" * 16,  # unknown version
        b"OSPR\x01\x00\x00\x00" + b"n" * 16 + b"Z" + b"\x00" * 8,  # unknown command
        b"OSPR\x01\x00\x00\x00" + b"n" * 16 + b"P" + (2**40).to_bytes(8, "big"),  # oversized
        b"OSPR\x01",  # truncated, then closed
    ]
    with ProbeServer("127.0.0.1", 0) as server:
        for frame in frames:
            # the server may drop the connection before reading everything: then shutdown,
            # send or recv fail with a reset or "not connected", which is a rejection too
            with (
                socket.create_connection(server.address, timeout=5) as sock,
                contextlib.suppress(OSError),
            ):
                sock.sendall(frame)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):
                    pass
        deadline = time.monotonic() + 5
        while server.rejected < len(frames) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.rejected == len(frames)
        assert probe_link(*server.address, rtt_samples=3, bulk_bytes=1000).rtt_ms > 0


def test_unreachable_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ProbeError, match="cannot reach probe server"):
        probe_link("127.0.0.1", port, rtt_samples=1, bulk_bytes=1)


def test_probe_link_command_records_the_measurement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "testbeds").mkdir()
    (tmp_path / "testbeds" / "pair.yaml").write_text(
        yaml.safe_dump(two_device_testbed().to_dict())
    )
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    token_file.chmod(0o600)
    with ProbeServer("127.0.0.1", 0, TOKEN) as server:
        address = "{}:{}".format(*server.address)
        args = ["probe-link", address, "--token-file", str(token_file), "--samples", "5"]
        args += ["--bulk-mb", "0.5", "--profiles", str(tmp_path)]
        assert main([*args, "--testbed", "pair", "--link", "a,b", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["rtt_samples"] == 5 and out["saved"] == str(tmp_path / "links" / "pair.json")
        assert main([*args, "--link", "a,b"]) == 2
        assert "--testbed and --link A,B go together" in capsys.readouterr().err
        assert main([*args, "--testbed", "pair", "--link", "a,z"]) == 2
        assert "'z' is not a device" in capsys.readouterr().err
    stored = json.loads((tmp_path / "links" / "pair.json").read_text())
    assert stored["schema_version"] == 1 and stored["links"][0]["between"] == ["a", "b"]
    assert set(load_link_measurements("pair", root=tmp_path)) == {("a", "b")}


def test_link_file_replaces_a_pair(tmp_path: Path) -> None:
    with ProbeServer("127.0.0.1", 0) as server:
        first = probe_link(*server.address, rtt_samples=2, bulk_bytes=100)
        second = probe_link(*server.address, rtt_samples=3, bulk_bytes=100)
    save_link_measurement("t", "b", "a", first, root=tmp_path)
    save_link_measurement("t", "a", "b", second, root=tmp_path)
    save_link_measurement("t", "a", "c", second, root=tmp_path)
    found = load_link_measurements("t", root=tmp_path)
    assert sorted(found) == [("a", "b"), ("a", "c")]
    assert found[("a", "b")]["rtt_samples"] == 3


def test_measured_links_feed_the_cost_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from synthetic import synthetic_profile, write_profiles

    from optisplit.probe import apply_link_measurements

    testbed = two_device_testbed(rtt_ms=2.0, mbps=100.0)
    (tmp_path / "testbeds").mkdir()
    (tmp_path / "testbeds" / "pair.yaml").write_text(yaml.safe_dump(testbed.to_dict()))
    write_profiles(tmp_path, synthetic_profile(3, cut_bytes=[1000, 125_000, 1000, 10]), ["host"])
    with ProbeServer("127.0.0.1", 0) as server:
        measured = probe_link(*server.address, rtt_samples=3, bulk_bytes=1000)
    save_link_measurement("pair", "b", "a", measured, root=tmp_path)
    applied = apply_link_measurements(testbed, root=tmp_path)
    assert applied.links[0].rtt_ms == measured.rtt_ms and applied.links[0].mbps == measured.mbps
    args = ["evaluate", "synth", "--testbed", "pair", "--profiles", str(tmp_path)]
    args += ["--plan", "a[0:1] -> b[1:3]", "--json", "--link-mbps", "10"]
    assert main(args) == 0
    spec = json.loads(capsys.readouterr().out)[0]["transfers"][0]["ms"]
    assert main([*args, "--measured-links"]) == 0
    faster = json.loads(capsys.readouterr().out)[0]["transfers"][0]["ms"]
    # 125 kB at 10 Mbit/s is 100 ms either way; the one-way delay is half the measured RTT
    assert faster == pytest.approx(spec - 1.0 + measured.rtt_ms / 2)
