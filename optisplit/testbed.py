"""Testbeds: devices, links, source and sink, loaded from YAML into a networkx graph (pure).

A testbed file ``profiles/testbeds/<name>.yaml`` (``schema_version: 1``)::

    schema_version: 1
    name: pi-gpu
    source: pi1            # where inputs appear
    sink: pi1              # where results must arrive (default: the source)
    devices:
      pi1: {profile: host, scale: 8.0, memory_mb: 4096, cores: [0], cpu_quota: 0.25,
            throttle: pace}
      gpu: {profile: host, scale: 0.2, memory_mb: 16384, address: "10.0.0.2:29500"}
    links:
      - {between: [pi1, gpu], rtt_ms: 0.4, mbps: 1000, loss_pct: 0, jitter_ms: 0}
    switches: []           # names usable as link endpoints (multi-hop routes)

``profile`` names the device whose profile files are used (default: the device's own name) and
``scale`` multiplies its times (default 1.0). ``cores``, ``cpu_quota`` and ``throttle`` are for an
emulated testbed: the cores a device is pinned to and the share of one core it gets, enforced
either by a CFS ``quota`` (the default) or by ``pace`` (the device's processes rest after each
stage in proportion to its CPU time, see :mod:`optisplit.pace`). Links are full duplex: each
direction carries ``mbps`` on its own. A route between two devices is the path of least total
RTT in the graph; it may pass through switches and other devices.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit.errors import TestbedError, UsageError
from optisplit.pace import pace_of

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "CONDITIONS",
    "SCHEMA_VERSION",
    "Device",
    "Link",
    "Testbed",
    "apply_condition",
    "core_shares",
    "helper_cores",
    "list_testbeds",
    "load_testbed",
    "parse_testbed",
    "testbed_path",
]

SCHEMA_VERSION = 1

CONDITIONS: dict[str, tuple[float, float]] = {
    "lan": (0.2, 1000.0),
    "wifi": (10.0, 50.0),
    "constrained": (400.0, 5.0),
}
"""Named link conditions: ``name -> (rtt_ms, mbps)``, applied to every link.

``constrained`` is the paper's stress test: 200 ms one-way delay and a 5 Mbit/s token bucket.
"""

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_DEVICE_KEYS = {"profile", "scale", "memory_mb", "address", "cores", "cpu_quota", "throttle"}
THROTTLES = ("quota", "pace")
_LINK_KEYS = {"between", "rtt_ms", "mbps", "loss_pct", "jitter_ms"}
_TOP_KEYS = {"schema_version", "name", "source", "sink", "devices", "links", "switches"}


@dataclass(frozen=True)
class Device:
    """One compute device of a testbed."""

    name: str
    profile: str
    scale: float = 1.0
    memory_bytes: int | None = None
    address: str | None = None
    cores: tuple[int, ...] | None = None
    cpu_quota: float | None = None
    throttle: str = "quota"

    @property
    def pace(self) -> float | None:
        """The speed a paced device runs at (None unless ``throttle: pace`` limits it)."""
        return pace_of(self.throttle, self.cpu_quota)


@dataclass(frozen=True)
class Link:
    """A full-duplex link between two graph nodes (devices or switches)."""

    a: str
    b: str
    rtt_ms: float
    mbps: float
    loss_pct: float = 0.0
    jitter_ms: float = 0.0

    @property
    def one_way_ms(self) -> float:
        return self.rtt_ms / 2.0

    def other(self, node: str) -> str:
        """The endpoint that is not ``node``."""
        return self.b if node == self.a else self.a


@dataclass(frozen=True)
class Testbed:
    """Devices and links; ``source`` is where inputs appear, ``sink`` where results arrive."""

    __test__ = False  # not a pytest test class

    name: str
    devices: dict[str, Device] = field(hash=False)
    links: tuple[Link, ...]
    source: str
    sink: str
    switches: tuple[str, ...] = ()

    def graph(self) -> nx.Graph:
        """The testbed as an undirected networkx graph; edges carry ``link`` and ``rtt_ms``."""
        import networkx as nx

        graph = nx.Graph()
        for name in self.devices:
            graph.add_node(name, kind="device")
        for name in self.switches:
            graph.add_node(name, kind="switch")
        for link in self.links:
            graph.add_edge(link.a, link.b, link=link, rtt_ms=link.rtt_ms)
        return graph

    def path(self, src: str, dst: str) -> list[str]:
        """The nodes of the least-RTT route from ``src`` to ``dst`` (both included).

        Raises:
            TestbedError: unknown node or no route.
        """
        import networkx as nx

        graph = self.graph()
        for node in (src, dst):
            if node not in graph:
                raise TestbedError(f"testbed {self.name} has no device or switch {node!r}")
        try:
            return [str(n) for n in nx.shortest_path(graph, src, dst, weight="rtt_ms")]
        except nx.NetworkXNoPath:
            raise TestbedError(f"testbed {self.name}: no route from {src} to {dst}") from None

    def route(self, src: str, dst: str) -> list[Link]:
        """The links of the least-RTT route from ``src`` to ``dst``, in order (empty if equal)."""
        nodes = self.path(src, dst)
        graph = self.graph()
        return [graph.edges[u, v]["link"] for u, v in itertools.pairwise(nodes)]

    def with_links(self, *, rtt_ms: float | None = None, mbps: float | None = None) -> Testbed:
        """A copy where every link takes ``rtt_ms`` and/or ``mbps`` (``None`` keeps each value)."""
        if rtt_ms is not None and (not math.isfinite(rtt_ms) or rtt_ms < 0):
            raise UsageError(f"link RTT must be a number >= 0 ms, got {rtt_ms}")
        if mbps is not None and (not math.isfinite(mbps) or mbps <= 0):
            raise UsageError(f"link bandwidth must be a number > 0 Mbit/s, got {mbps}")
        links = tuple(
            dataclasses.replace(
                link,
                rtt_ms=link.rtt_ms if rtt_ms is None else float(rtt_ms),
                mbps=link.mbps if mbps is None else float(mbps),
            )
            for link in self.links
        )
        return dataclasses.replace(self, links=links)

    @property
    def host_cores(self) -> tuple[int, ...] | None:
        """The cores of the one host every device shares (an emulated testbed), or None.

        A testbed whose every device is pinned to ``cores`` runs on one machine: its devices,
        and the client and delay forwarder serving them, share these cores. Otherwise the
        devices are machines of their own.
        """
        if not self.devices or any(not d.cores for d in self.devices.values()):
            return None
        return tuple(sorted({c for d in self.devices.values() for c in d.cores or ()}))

    def to_dict(self) -> dict[str, Any]:
        """The file form (``memory_mb`` in MiB), suitable for ``parse_testbed``."""
        devices: dict[str, Any] = {}
        for name, dev in self.devices.items():
            entry: dict[str, Any] = {"profile": dev.profile, "scale": dev.scale}
            if dev.memory_bytes is not None:
                entry["memory_mb"] = dev.memory_bytes / 2**20
            if dev.address is not None:
                entry["address"] = dev.address
            if dev.cores is not None:
                entry["cores"] = list(dev.cores)
            if dev.cpu_quota is not None:
                entry["cpu_quota"] = dev.cpu_quota
            if dev.throttle != "quota":
                entry["throttle"] = dev.throttle
            devices[name] = entry
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "source": self.source,
            "sink": self.sink,
            "devices": devices,
            "links": [
                {
                    "between": [link.a, link.b],
                    "rtt_ms": link.rtt_ms,
                    "mbps": link.mbps,
                    "loss_pct": link.loss_pct,
                    "jitter_ms": link.jitter_ms,
                }
                for link in self.links
            ],
            "switches": list(self.switches),
        }


def core_shares(devices: Iterable[Device], allowed: Iterable[int]) -> dict[int, float]:
    """How much of each core in ``allowed`` the pinned ``devices`` are allotted (in cores).

    A device's quota (all of its cores when it has none) is spread evenly over its cores;
    cores outside ``allowed`` are left out.
    """
    load = dict.fromkeys(sorted(allowed), 0.0)
    for device in devices:
        cores = [c for c in (device.cores or ()) if c in load]
        if not cores:
            continue
        share = len(cores) if device.cpu_quota is None else min(device.cpu_quota, len(cores))
        for core in cores:
            load[core] += share / len(cores)
    return load


def helper_cores(devices: Iterable[Device], allowed: Iterable[int]) -> tuple[int, ...] | None:
    """The cores of ``allowed`` where the emulation's own processes (the client, the delay
    forwarder) disturb the pinned ``devices`` least: those with the smallest share allotted,
    when that share leaves room (under one core); None when no device is pinned to one of
    ``allowed`` or every core is fully allotted (the helpers then run anywhere)."""
    devices = list(devices)
    load = core_shares(devices, allowed)
    pinned = any(c in load for d in devices for c in d.cores or ())
    least = min(load.values(), default=1.0)
    if not pinned or least >= 1.0:
        return None
    return tuple(c for c in load if load[c] == least)


def apply_condition(testbed: Testbed, name: str) -> Testbed:
    """Every link of ``testbed`` under the named condition (``lan``, ``wifi``, ``constrained``).

    Raises:
        UsageError: an unknown condition name, listing the valid ones.
    """
    if name not in CONDITIONS:
        raise UsageError(
            f"unknown link condition {name!r}; choose one of {', '.join(sorted(CONDITIONS))}"
        )
    rtt_ms, mbps = CONDITIONS[name]
    return testbed.with_links(rtt_ms=rtt_ms, mbps=mbps)


def testbed_path(name: str, *, root: str | os.PathLike[str] = "profiles") -> Path:
    """Where the testbed called ``name`` lives under ``root``."""
    return Path(root) / "testbeds" / f"{name}.yaml"


def list_testbeds(root: str | os.PathLike[str] = "profiles") -> list[str]:
    """Names of the testbed files under ``root/testbeds``."""
    folder = Path(root) / "testbeds"
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_testbed(name_or_path: str, *, root: str | os.PathLike[str] = "profiles") -> Testbed:
    """Load a testbed by name (``root/testbeds/<name>.yaml``) or by file path.

    Raises:
        TestbedError: missing file (listing the known testbeds) or a malformed one, naming the
            file, the field and what is wrong.
    """
    import yaml

    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        path = candidate
    else:
        path = testbed_path(name_or_path, root=root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        known = ", ".join(list_testbeds(root)) or "none"
        raise TestbedError(
            f"testbed {name_or_path!r} not found (looked for {path}); known testbeds: {known}"
        ) from None
    except OSError as exc:
        raise TestbedError(f"cannot read testbed file {path}: {exc.strerror or exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TestbedError(f"testbed file {path} is not valid YAML: {exc}") from None
    return parse_testbed(document, source_name=str(path))


def parse_testbed(document: Any, *, source_name: str = "testbed") -> Testbed:
    """Build a testbed from its file form, checking every field.

    Raises:
        TestbedError: ``"<source_name>: <field>: <what is wrong>"``.
    """
    return _Parser(source_name).testbed(document)


class _Parser:
    """Validates a testbed document; every error names the file and the field."""

    def __init__(self, source_name: str) -> None:
        self.source_name = source_name

    def fail(self, where: str, what: str) -> TestbedError:
        return TestbedError(f"{self.source_name}: {where}: {what}")

    def testbed(self, doc: Any) -> Testbed:
        if not isinstance(doc, Mapping):
            raise TestbedError(f"{self.source_name}: expected a mapping at the top level")
        self.unknown_keys(doc, _TOP_KEYS, "top level")
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise self.fail(
                "schema_version",
                f"is {doc.get('schema_version')!r}; this optisplit reads {SCHEMA_VERSION}",
            )
        name = self.name(doc.get("name"), "name")
        switches = self.switches(doc.get("switches") or [])
        devices = self.devices(doc.get("devices"), set(switches))
        links = self.links(doc.get("links") or [], set(devices) | set(switches))
        source = self.endpoint(doc.get("source"), "source", devices)
        sink = self.endpoint(doc.get("sink", source), "sink", devices)
        testbed = Testbed(name, devices, links, source, sink, switches)
        self.connected(testbed)
        return testbed

    def unknown_keys(self, doc: Mapping[str, Any], known: set[str], where: str) -> None:
        extra = sorted(set(doc) - known)
        if extra:
            raise self.fail(
                where, f"unknown field {extra[0]!r} (known: {', '.join(sorted(known))})"
            )

    def name(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.fail(
                where, f"expected a name of letters, digits, '_', '.', '-', got {value!r}"
            )
        return value

    def number(self, value: Any, where: str, *, minimum: float, strict: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < minimum or (strict and value == minimum):
            sign = ">" if strict else ">="
            raise self.fail(where, f"expected a number {sign} {minimum:g}, got {value!r}")
        return float(value)

    def switches(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail("switches", f"expected a list of names, got {value!r}")
        names = tuple(self.name(v, f"switches[{i}]") for i, v in enumerate(value))
        if len(set(names)) != len(names):
            raise self.fail("switches", "a switch name appears twice")
        return names

    def devices(self, value: Any, switches: set[str]) -> dict[str, Device]:
        if not isinstance(value, Mapping) or not value:
            raise self.fail("devices", "expected a non-empty mapping of device name to settings")
        devices = {}
        for key, spec in value.items():
            name = self.name(key, "devices")
            if name in switches:
                raise self.fail(f"devices.{name}", "is also listed as a switch")
            devices[name] = self.device(name, spec or {})
        return devices

    def device(self, name: str, spec: Any) -> Device:
        where = f"devices.{name}"
        if not isinstance(spec, Mapping):
            raise self.fail(where, f"expected a mapping of settings, got {spec!r}")
        self.unknown_keys(spec, _DEVICE_KEYS, where)
        memory = spec.get("memory_mb")
        quota = spec.get("cpu_quota")
        throttle = spec.get("throttle", "quota")
        if throttle not in THROTTLES:
            raise self.fail(f"{where}.throttle", f"expected quota or pace, got {throttle!r}")
        if throttle == "pace" and isinstance(quota, (int, float)) and quota > 1:
            raise self.fail(f"{where}.throttle", "pace slows one core: needs cpu_quota <= 1")
        return Device(
            name=name,
            profile=self.name(spec.get("profile", name), f"{where}.profile"),
            scale=self.number(spec.get("scale", 1.0), f"{where}.scale", minimum=0, strict=True),
            memory_bytes=None
            if memory is None
            else int(self.number(memory, f"{where}.memory_mb", minimum=0, strict=True) * 2**20),
            address=self.address(spec.get("address"), f"{where}.address"),
            cores=self.cores(spec.get("cores"), f"{where}.cores"),
            cpu_quota=None
            if quota is None
            else self.number(quota, f"{where}.cpu_quota", minimum=0, strict=True),
            throttle=throttle,
        )

    def address(self, value: Any, where: str) -> str | None:
        if value is None:
            return None
        host, sep, port = str(value).rpartition(":")
        if not isinstance(value, str) or not sep or not host or not port.isdigit():
            raise self.fail(where, f"expected HOST:PORT, got {value!r}")
        if not 0 < int(port) < 65536:
            raise self.fail(where, f"port {port} is out of range 1..65535")
        return value

    def cores(self, value: Any, where: str) -> tuple[int, ...] | None:
        if value is None:
            return None
        ok = isinstance(value, list) and value
        if not ok or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value
        ):
            raise self.fail(
                where, f"expected a non-empty list of core numbers >= 0, got {value!r}"
            )
        return tuple(value)

    def links(self, value: Any, nodes: set[str]) -> tuple[Link, ...]:
        if not isinstance(value, list):
            raise self.fail("links", f"expected a list of links, got {value!r}")
        links: list[Link] = []
        seen: set[frozenset[str]] = set()
        for i, spec in enumerate(value):
            link = self.link(spec, f"links[{i}]", nodes)
            pair = frozenset((link.a, link.b))
            if pair in seen:
                raise self.fail(f"links[{i}]", f"a second link between {link.a} and {link.b}")
            seen.add(pair)
            links.append(link)
        return tuple(links)

    def link(self, spec: Any, where: str, nodes: set[str]) -> Link:
        if not isinstance(spec, Mapping):
            raise self.fail(where, f"expected a mapping, got {spec!r}")
        self.unknown_keys(spec, _LINK_KEYS, where)
        between = spec.get("between")
        if not isinstance(between, list) or len(between) != 2:
            raise self.fail(f"{where}.between", f"expected two names, got {between!r}")
        a, b = (str(n) for n in between)
        for node in (a, b):
            if node not in nodes:
                raise self.fail(f"{where}.between", f"unknown device or switch {node!r}")
        if a == b:
            raise self.fail(f"{where}.between", f"a link needs two different ends, got {a} twice")
        for required in ("rtt_ms", "mbps"):
            if required not in spec:
                raise self.fail(f"{where}.{required}", "is missing")
        return Link(
            a=a,
            b=b,
            rtt_ms=self.number(spec["rtt_ms"], f"{where}.rtt_ms", minimum=0),
            mbps=self.number(spec["mbps"], f"{where}.mbps", minimum=0, strict=True),
            loss_pct=self.loss(spec.get("loss_pct", 0.0), f"{where}.loss_pct"),
            jitter_ms=self.number(spec.get("jitter_ms", 0.0), f"{where}.jitter_ms", minimum=0),
        )

    def loss(self, value: Any, where: str) -> float:
        loss = self.number(value, where, minimum=0)
        if loss >= 100:
            raise self.fail(where, f"expected a percentage below 100, got {value!r}")
        return loss

    def endpoint(self, value: Any, where: str, devices: Mapping[str, Device]) -> str:
        if value not in devices:
            raise self.fail(
                where, f"{value!r} is not a device (devices: {', '.join(sorted(devices))})"
            )
        return str(value)

    def connected(self, testbed: Testbed) -> None:
        import networkx as nx

        graph = testbed.graph()
        reach = nx.node_connected_component(graph, testbed.source)
        for name in testbed.devices:
            if name not in reach:
                raise self.fail(
                    f"devices.{name}", f"has no route to the source {testbed.source} (add a link)"
                )
