"""Emulated testbeds: one network namespace, shaped links and a CPU-limited cgroup per device.

``up`` builds a testbed from its spec (and checks it), ``down`` removes it, ``is_up``,
``device_host`` and ``wrap_command`` let launchers place processes on its devices. Without root,
or while a testbed is not up, devices are processes on loopback: ``is_up`` is false,
``device_host`` is 127.0.0.1 and ``wrap_command`` only pins cores (and paces a paced device).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from optisplit.errors import TestbedError, UsageError
from optisplit.pace import ENV as PACE_ENV

if TYPE_CHECKING:
    from collections.abc import Callable

    from optisplit.emulate.checks import CheckReport
    from optisplit.emulate.state import TestbedState
    from optisplit.testbed import Testbed

__all__ = [
    "LOOPBACK",
    "check_testbed",
    "device_host",
    "down",
    "forwarder_pid",
    "helper_cores",
    "is_up",
    "up",
    "wrap_command",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def _device(testbed: Testbed, device: str) -> None:
    if device not in testbed.devices:
        known = ", ".join(sorted(testbed.devices))
        raise UsageError(f"testbed {testbed.name} has no device {device!r} (devices: {known})")


def _running(testbed: Testbed) -> TestbedState | None:
    from optisplit.emulate import sandbox
    from optisplit.emulate.state import read_state

    if not sandbox.is_root():
        return None
    state = sandbox.running(testbed)
    if state is None and read_state(testbed.name) is not None:
        log.warning(
            "testbed %s is recorded as up but is broken (its forwarder or a namespace is gone); "
            "run 'optisplit testbed down %s' and up again",
            testbed.name,
            testbed.name,
        )
    return state


def is_up(testbed: Testbed) -> bool:
    """Whether ``testbed`` is emulated right now (namespaces, forwarder and cgroups in place)."""
    return _running(testbed) is not None


def device_host(testbed: Testbed, device: str) -> str:
    """IP address of ``device``: its namespace's address when emulated, else 127.0.0.1."""
    _device(testbed, device)
    state = _running(testbed)
    return LOOPBACK if state is None else state.devices[device].address


def wrap_command(testbed: Testbed, device: str, argv: list[str]) -> list[str]:
    """``argv`` prefixed so that it runs as ``device``: its cgroup (CPU quota), cores, namespace.

    The launcher joins the cgroup first and then enters the namespace with ``setns(2)`` (``ip
    netns exec`` would remount ``/sys``), and sets ``TP_SOCKET_IFNAME``/``GLOO_SOCKET_IFNAME``
    to the device's interface. When the testbed is not up, only the core pinning and a paced
    device's speed (which needs no privileges) remain.
    """
    from optisplit.emulate import sandbox

    _device(testbed, device)
    state = _running(testbed)
    if state is None:
        spec = testbed.devices[device]
        pace = [] if spec.pace is None else ["env", f"{PACE_ENV}={spec.pace}"]
        return [*pace, *sandbox.pin_prefix(spec.cores), *argv]
    return [*sandbox.command_prefix(state, device), *argv]


def forwarder_pid(testbed: Testbed) -> int | None:
    """The pid of ``testbed``'s delay forwarder while it is emulated, else None."""
    state = _running(testbed)
    return None if state is None else state.forwarder_pid


def helper_cores(testbed: Testbed) -> tuple[int, ...] | None:
    """Cores for the processes that serve the devices of ``testbed`` on this host (the client,
    the delay forwarder): those the devices' pinning and quotas leave the most room on, or None
    (no device is pinned, or every core is fully allotted). See ``sandbox.helper_cores``."""
    from optisplit.emulate import sandbox

    return sandbox.helper_cores(testbed.devices.values())


def up(
    testbed: Testbed, *, check: bool = True, on_check: Callable[[str], None] | None = None
) -> CheckReport | None:
    """Build ``testbed`` (kept as is when already up with the same spec) and check it.

    Returns:
        The check report (None when ``check`` is false or without root, where nothing is built
        and a warning says devices run on loopback without shaping). ``on_check`` is called
        after each device and link check.

    Raises:
        TestbedError: building failed, or a check is off spec (a testbed this call built is
            then taken down again; one that was up already stays up).
    """
    from optisplit.emulate import checks, sandbox

    if not sandbox.is_root():
        log.warning(
            "not root: testbed %s runs on loopback with no link shaping and no CPU limits",
            testbed.name,
        )
        return None
    before = sandbox.running(testbed)
    state = sandbox.build(testbed)
    built = before is None or before.forwarder_pid != state.forwarder_pid
    if not check:
        return None
    try:
        report = checks.check_testbed(testbed, on_check=on_check)
    except BaseException:  # Ctrl-C or a failed probe: leave nothing this call built
        if built:
            sandbox.teardown(testbed.name)
        raise
    if not report.ok:
        if built:
            sandbox.teardown(testbed.name)
        raise TestbedError(f"testbed {testbed.name} is off spec: " + "; ".join(report.problems()))
    return report


def down(name: str) -> list[str]:
    """Remove emulated testbed ``name`` and any leftovers of it; idempotent.

    Returns:
        What was removed (empty when nothing was up).
    """
    from optisplit.emulate import sandbox

    if not sandbox.is_root():
        return []
    return sandbox.teardown(name)


def check_testbed(testbed: Testbed) -> CheckReport:
    """Probe every device pair's RTT and rate and every device's speed against the spec."""
    from optisplit.emulate import checks

    return checks.check_testbed(testbed)
