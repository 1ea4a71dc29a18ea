"""Network namespaces and TUN devices, driven through iproute2 (``ip``) and ``setns(2)``."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optisplit.errors import TestbedError

__all__ = [
    "NETNS_DIR",
    "add_tun",
    "delete_link",
    "delete_namespace",
    "entered",
    "ip",
    "link_exists",
    "list_links",
    "list_namespaces",
    "make_namespace",
    "namespace_pids",
    "setns",
    "tune_tcp",
]

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; returns stdout.

    Raises:
        TestbedError: iproute2 is missing, or the command failed while ``check`` is true.
    """
    exe = shutil.which("ip")
    if exe is None:
        raise TestbedError("iproute2 ('ip') is not installed; install it to emulate testbeds")
    out = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise TestbedError(f"'ip {' '.join(args)}' failed: {out.stderr.strip()}")
    return out.stdout


def make_namespace(name: str) -> None:
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")


def delete_namespace(name: str) -> None:
    """Delete namespace ``name`` (no error when it is already gone)."""
    if (NETNS_DIR / name).exists():
        ip("netns", "delete", name, check=False)


def list_namespaces(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def namespace_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name``."""
    out = ip("netns", "pids", name, check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


def add_tun(name: str, *, netns: str | None, address: str, mtu: int) -> None:
    """Create a persistent TUN device with a /24 address, up, in ``netns`` (None: this one)."""
    prefix = ["-n", netns] if netns else []
    ip(*prefix, "tuntap", "add", "dev", name, "mode", "tun")
    ip(*prefix, "link", "set", name, "mtu", str(mtu))
    ip(*prefix, "addr", "add", f"{address}/24", "dev", name)
    ip(*prefix, "link", "set", name, "up")


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def list_links(prefix: str) -> list[str]:
    """Interfaces of this namespace whose name starts with ``prefix``."""
    return sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(prefix))


def delete_link(name: str) -> None:
    if link_exists(name):
        ip("link", "delete", name, check=False)


_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the body in network namespace ``netns`` (this thread only), then return.

    Sockets and TUN files opened inside keep their namespace after the body ends.
    """
    try:
        target = os.open(NETNS_DIR / netns, os.O_RDONLY)
    except FileNotFoundError:
        raise TestbedError(f"network namespace {netns} does not exist") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(target)
        os.close(home)


# TCP settings of every device namespace. The cost model charges bytes / rate for a transfer,
# so a link must deliver its rate from the first byte of every request: Reno (the kernel only
# lets a namespace choose among the host's allowed algorithms; BBR paces itself while it probes
# the rate), no slow start after an idle gap between requests, buffers large enough for the
# bandwidth-delay product of the slowest link, and no per-destination metrics carried between
# connections.
TCP_SETTINGS = {
    "net/ipv4/tcp_congestion_control": "reno",
    "net/ipv4/tcp_slow_start_after_idle": "0",
    "net/ipv4/tcp_no_metrics_save": "1",
    "net/ipv4/tcp_wmem": "4096 4194304 16777216",
    "net/ipv4/tcp_rmem": "4096 4194304 33554432",
}


def tune_tcp(netns: str) -> None:
    """Apply ``TCP_SETTINGS`` in ``netns`` (/proc/sys/net follows the writer's namespace)."""
    with entered(netns):
        for key, value in TCP_SETTINGS.items():
            path = Path("/proc/sys", key)
            try:
                path.write_text(value)
            except OSError as exc:
                log.warning("cannot set %s to %r in %s: %s", key, value, netns, exc)
