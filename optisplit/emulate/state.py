"""What an emulated testbed has built, recorded on disk so that ``down`` works after a crash."""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from optisplit._io import write_json
from optisplit.errors import TestbedError
from optisplit.pace import pace_of

__all__ = [
    "NETNS_PREFIX",
    "DeviceState",
    "TestbedState",
    "lock",
    "netns_name",
    "read_state",
    "state_dir",
    "state_root",
    "used_slots",
    "write_state",
]

SCHEMA_VERSION = 1
NETNS_PREFIX = "os-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def state_root() -> Path:
    """The folder holding one sub-folder per emulated testbed (``OPTISPLIT_RUN_DIR`` overrides)."""
    return Path(os.environ.get("OPTISPLIT_RUN_DIR", "/run/optisplit"))


def safe_name(name: str) -> str:
    """``name`` reduced to characters that are safe in namespace, cgroup and file names."""
    return _UNSAFE.sub("_", name)


def state_dir(testbed: str) -> Path:
    return state_root() / safe_name(testbed)


def netns_name(testbed: str, device: str) -> str:
    """Network namespace of ``device``: ``os-<testbed>.<device>`` (the dot cannot be in either)."""
    return f"{NETNS_PREFIX}{safe_name(testbed)}.{safe_name(device)}"


@dataclass(frozen=True)
class DeviceState:
    """One emulated device: its namespace, address, cgroup folder and CPU limits."""

    name: str
    netns: str
    address: str
    cgroup: str | None
    cores: tuple[int, ...] | None
    cpu_quota: float | None
    throttle: str = "quota"
    # A paced device's reference kernel time (ms) on its cores when the testbed came up: the
    # speed its anchored pacer keeps to (``optisplit.pace``); None: plain pacing.
    anchor_ms: float | None = None

    @property
    def pace(self) -> float | None:
        """The speed a paced device runs at, or None (see ``Device.pace``)."""
        return pace_of(self.throttle, self.cpu_quota)


@dataclass(frozen=True)
class TestbedState:
    """Everything ``up`` built for one testbed; ``down`` undoes exactly this, then sweeps."""

    __test__ = False  # not a pytest test class

    name: str
    slot: int
    devices: dict[str, DeviceState]
    host_if: str
    host_address: str
    delay_path: str
    forwarder_pid: int | None = None
    spec: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["schema_version"] = SCHEMA_VERSION
        return document

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> TestbedState:
        devices = {
            name: DeviceState(
                name=d["name"],
                netns=d["netns"],
                address=d["address"],
                cgroup=d.get("cgroup"),
                cores=tuple(d["cores"]) if d.get("cores") is not None else None,
                cpu_quota=d.get("cpu_quota"),
                throttle=d.get("throttle", "quota"),
                anchor_ms=d.get("anchor_ms"),
            )
            for name, d in document["devices"].items()
        }
        return cls(
            name=document["name"],
            slot=int(document["slot"]),
            devices=devices,
            host_if=document["host_if"],
            host_address=document["host_address"],
            delay_path=document.get("delay_path", "forwarder"),
            forwarder_pid=document.get("forwarder_pid"),
            spec=dict(document.get("spec", {})),
        )


def write_state(state: TestbedState) -> Path:
    return write_json(state_dir(state.name) / "state.json", state.to_dict())


def read_state(testbed: str) -> TestbedState | None:
    """The recorded state of ``testbed``, or None when nothing is recorded."""
    path = state_dir(testbed) / "state.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise TestbedError(f"cannot read emulation state {path}: {exc}") from None
    if document.get("schema_version") != SCHEMA_VERSION:
        raise TestbedError(
            f"emulation state {path} has schema_version {document.get('schema_version')!r}; "
            f"this optisplit reads {SCHEMA_VERSION} (remove the folder to start over)"
        )
    return TestbedState.from_dict(document)


def used_slots() -> set[int]:
    """Address slots (10.231.<slot>.0/24) taken by testbeds recorded as up."""
    slots: set[int] = set()
    root = state_root()
    if not root.is_dir():
        return slots
    for path in root.glob("*/state.json"):
        try:
            slots.add(int(json.loads(path.read_text(encoding="utf-8"))["slot"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return slots


@contextmanager
def lock() -> Iterator[None]:
    """Serialise ``up``/``down`` across processes (slot allocation, shared cgroup parents)."""
    root = state_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
