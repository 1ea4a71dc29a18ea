"""Testbed files: loading, validation errors, routes, link conditions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from optisplit.errors import TestbedError, UsageError
from optisplit.testbed import (
    CONDITIONS,
    apply_condition,
    list_testbeds,
    load_testbed,
    parse_testbed,
)

ROOT = Path(__file__).resolve().parents[1] / "profiles"

GOOD = {
    "schema_version": 1,
    "name": "tri",
    "source": "a",
    "devices": {"a": {}, "b": {"scale": 0.5, "memory_mb": 64}, "c": {"profile": "a"}},
    "links": [
        {"between": ["a", "b"], "rtt_ms": 10, "mbps": 100},
        {"between": ["a", "c"], "rtt_ms": 1, "mbps": 50},
        {"between": ["c", "b"], "rtt_ms": 2, "mbps": 1000},
    ],
}


def test_shipped_testbeds_load() -> None:
    names = list_testbeds(ROOT)
    for name in ("pi-pi", "pi-gpu", "pi-pi-gpu", "edge8", "local", "local3"):
        assert name in names
        testbed = load_testbed(name, root=ROOT)
        assert testbed.name == name
        assert testbed.sink == testbed.source
    edge8 = load_testbed("edge8", root=ROOT)
    assert len(edge8.devices) == 8 and edge8.switches == ("sw",)
    assert edge8.path("pi1", "gpu") == ["pi1", "sw", "gpu"]
    local = load_testbed("local", root=ROOT)
    assert local.devices["slow"].cpu_quota == 0.5 and local.devices["slow"].cores == (1,)
    assert local.devices["slow"].throttle == "pace" and local.devices["slow"].pace == 0.5
    assert local.devices["fast"].throttle == "pace" and local.devices["fast"].pace == 0.8
    assert parse_testbed(local.to_dict()) == local
    assert local.devices["fast"].profile == "fast"
    pi = load_testbed("pi-gpu", root=ROOT).devices["pi1"]
    assert pi.profile == "host" and pi.scale == 8.0 and pi.memory_bytes == 4096 * 2**20


def test_defaults_and_least_rtt_route() -> None:
    testbed = parse_testbed(GOOD)
    assert testbed.sink == "a"
    assert testbed.devices["a"].profile == "a" and testbed.devices["a"].scale == 1.0
    assert testbed.devices["b"].memory_bytes == 64 * 2**20
    # a-c-b (3 ms) beats the direct a-b link (10 ms), passing through device c
    assert testbed.path("a", "b") == ["a", "c", "b"]
    assert [(link.a, link.b) for link in testbed.route("a", "b")] == [("a", "c"), ("c", "b")]
    assert testbed.route("a", "a") == []
    assert parse_testbed(testbed.to_dict()) == testbed


def test_conditions_and_overrides() -> None:
    testbed = parse_testbed(GOOD)
    wifi = apply_condition(testbed, "wifi")
    assert {(link.rtt_ms, link.mbps) for link in wifi.links} == {CONDITIONS["wifi"]}
    assert CONDITIONS["constrained"] == (400.0, 5.0)
    only_rate = testbed.with_links(mbps=7)
    assert [link.rtt_ms for link in only_rate.links] == [10, 1, 2]
    assert {link.mbps for link in only_rate.links} == {7}
    with pytest.raises(UsageError, match="constrained, lan, wifi"):
        apply_condition(testbed, "5g")
    with pytest.raises(UsageError, match="> 0"):
        testbed.with_links(mbps=0)


def _broken(**changes: object) -> dict[str, object]:
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    for key, value in changes.items():
        path = key.split("__")
        target = doc
        for part in path[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if value is None:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"schema_version": 2}, "schema_version: is 2"),
        ({"devices__b__speed": 3}, "devices.b: unknown field 'speed'"),
        ({"devices__b__scale": -1}, "devices.b.scale: expected a number > 0"),
        ({"devices__b__memory_mb": "lots"}, "devices.b.memory_mb"),
        ({"devices__b__address": "10.0.0.1"}, "devices.b.address: expected HOST:PORT"),
        ({"devices__b__cores": [-1]}, "devices.b.cores"),
        ({"devices__b__throttle": "nice"}, "devices.b.throttle: expected quota or pace"),
        (
            {"devices__b__throttle": "pace", "devices__b__cpu_quota": 2},
            "devices.b.throttle: pace slows one core",
        ),
        ({"links__0__between": ["a", "z"]}, "links[0].between: unknown device or switch 'z'"),
        ({"links__0__mbps": 0}, "links[0].mbps: expected a number > 0"),
        ({"links__0__rtt_ms": None}, "links[0].rtt_ms: is missing"),
        ({"links__1__loss_pct": 100}, "links[1].loss_pct"),
        ({"links__2__between": ["a", "b"]}, "links[2]: a second link between a and b"),
        ({"source": "z"}, "source: 'z' is not a device"),
        ({"sink": "q"}, "sink: 'q' is not a device"),
        ({"devices": {}}, "devices: expected a non-empty mapping"),
        ({"links": [{"between": ["a", "b"], "rtt_ms": 1, "mbps": 1}]}, "devices.c: has no route"),
        ({"colour": "red"}, "top level: unknown field 'colour'"),
    ],
)
def test_malformed_testbed_names_file_and_field(
    tmp_path: Path, changes: dict[str, object], expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_broken(**changes)))
    with pytest.raises(TestbedError) as info:
        load_testbed(str(path))
    message = str(info.value)
    assert str(path) in message
    assert expected in message


def test_missing_and_unparsable_testbeds(tmp_path: Path) -> None:
    with pytest.raises(TestbedError, match=r"not found .*known testbeds: .*pi-gpu"):
        load_testbed("nowhere", root=ROOT)
    path = tmp_path / "x.yaml"
    path.write_text("devices: [unclosed")
    with pytest.raises(TestbedError, match="not valid YAML"):
        load_testbed(str(path))


def test_host_cores_and_helper_cores() -> None:
    from optisplit.testbed import core_shares, helper_cores

    local3 = load_testbed("local3", root=ROOT)
    assert local3.host_cores == (0, 1)
    devices = list(local3.devices.values())
    assert core_shares(devices, [0, 1]) == pytest.approx({0: 0.8, 1: 0.7})
    assert helper_cores(devices, [0, 1]) == (1,)
    # cores the devices leave alone come first; a full host leaves the helpers anywhere
    assert helper_cores(devices, [0, 1, 2]) == (2,)
    full = [dataclasses.replace(d, cpu_quota=1.0) for d in devices]
    assert helper_cores(full, [0, 1]) is None
    # one device without cores: the devices are machines of their own
    loose = dict(local3.devices, fast=dataclasses.replace(local3.devices["fast"], cores=None))
    assert dataclasses.replace(local3, devices=loose).host_cores is None
