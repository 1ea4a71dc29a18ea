"""The userspace delay path: a forwarder between the devices' TUN interfaces.

Each emulated device has one TUN interface; every IPv4 packet a device sends to another device
is read here, serialised onto its (source, destination) path at the path's rate, held for the
path's one-way delay (plus jitter, never reordering a path), optionally dropped with the path's
loss rate, and written into the destination's TUN. The time a packet arrives is therefore

    arrival = max(read time, previous packet's departure) + bytes / rate + one-way delay,

which is a store-and-forward link of that rate and delay, the cost model's transfer formula,
with no token-bucket burst: a kernel ``tbf``/``htb`` on the TUN would let its first burst
through at memory speed (with 64 kB packets, whole activations) and the TUN orphans packets,
so TCP would get no back-pressure from it either. Queues are deep and never drop; TCP's
window bounds them. Traffic to and from the host's own TUN interface is not shaped.

Run as ``python -m optisplit.emulate.delay STATE_DIR``; it reads ``forwarder.json`` there,
writes ``forwarder.ready`` once attached and exits when the state folder disappears or on
SIGTERM.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import logging
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Forwarder", "main"]

log = logging.getLogger(__name__)

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_READ_SIZE = 1 << 17
_WATCH_S = 0.5


@dataclass
class _Path:
    """Live state of one ordered address pair."""

    rate_bytes_per_s: float | None
    delay_s: float
    jitter_s: float
    loss: float
    free_at: float = 0.0
    last_due: float = 0.0
    dropped: int = 0


@dataclass(order=True)
class _Held:
    due: float
    seq: int
    fd: int = field(compare=False)
    packet: bytes = field(compare=False)


def open_tun(ifname: str, netns: str | None) -> int:
    """Attach to the persistent TUN ``ifname`` (in network namespace ``netns``)."""
    from optisplit.emulate.netns import entered

    with entered(netns) if netns else contextlib.nullcontext():
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        ifr = struct.pack("16sH22x", ifname.encode(), _IFF_TUN | _IFF_NO_PI)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
    return fd


class Forwarder:
    """Moves packets between TUN file descriptors keyed by IPv4 address."""

    def __init__(self, tuns: dict[bytes, int], paths: dict[tuple[bytes, bytes], _Path], seed: int):
        self._tuns = tuns
        self._paths = paths
        self._fds = sorted(set(tuns.values()))
        self._held: list[_Held] = []
        self._seq = 0
        self._rng = random.Random(seed)
        self.stopped = False

    def _admit(self, packet: bytes, now: float) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return  # only IPv4 travels between emulated devices
        src, dst = packet[12:16], packet[16:20]
        fd = self._tuns.get(dst)
        if fd is None:
            return
        path = self._paths.get((src, dst))
        due = now
        if path is not None:
            if path.loss and self._rng.random() < path.loss:
                path.dropped += 1
                return
            if path.rate_bytes_per_s:
                path.free_at = max(now, path.free_at) + len(packet) / path.rate_bytes_per_s
                due = path.free_at
            due += path.delay_s
            if path.jitter_s:
                due += self._rng.uniform(-path.jitter_s, path.jitter_s)
            due = max(due, path.last_due, now)
            path.last_due = due
        self._seq += 1
        heapq.heappush(self._held, _Held(due, self._seq, fd, packet))

    def _read_all(self, fd: int, now: float) -> None:
        for _ in range(64):
            try:
                packet = os.read(fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            self._admit(packet, now)

    def _deliver(self, now: float) -> None:
        held = self._held
        while held and held[0].due <= now:
            item = heapq.heappop(held)
            try:
                os.write(item.fd, item.packet)
            except OSError as exc:
                log.debug("dropped a packet: %s", exc)

    def run(self, alive: Any = None) -> None:
        """Forward until ``stopped`` is set or ``alive()`` turns false (checked twice a second)."""
        next_watch = time.monotonic() + _WATCH_S
        while not self.stopped:
            now = time.monotonic()
            if alive is not None and now >= next_watch:
                if not alive():
                    return
                next_watch = now + _WATCH_S
            timeout = next_watch - now
            if self._held:
                timeout = min(timeout, max(0.0, self._held[0].due - now))
            try:
                readable, _, _ = select.select(self._fds, [], [], timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd in readable:
                self._read_all(fd, now)
            self._deliver(time.monotonic())


def _address(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


def build(config: dict[str, Any]) -> Forwarder:
    """A forwarder for ``forwarder.json``: ``tuns`` (ifname, netns, address) and ``paths``."""
    tuns = {_address(t["address"]): open_tun(t["ifname"], t.get("netns")) for t in config["tuns"]}
    paths = {}
    for p in config["paths"]:
        rate = p["mbps"] * 1e6 / 8.0 if p.get("mbps") else None
        paths[(_address(p["src_address"]), _address(p["dst_address"]))] = _Path(
            rate_bytes_per_s=rate,
            delay_s=max(0.0, p["one_way_ms"] / 1e3 - config.get("overhead_ms", 0.0) / 1e3),
            jitter_s=p.get("jitter_ms", 0.0) / 1e3,
            loss=p.get("loss_pct", 0.0) / 100.0,
        )
    return Forwarder(tuns, paths, seed=int(config.get("seed", 0)))


def _prioritise() -> None:
    """Run unthrottled and ahead of device workers, so delays stay exact under load."""
    from optisplit.emulate import cgroup

    found = cgroup.cgroup_root()
    if found is not None:
        with contextlib.suppress(Exception):
            cgroup.join(found[0])
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError as exc:
        log.warning("forwarder runs without real-time priority (%s)", exc)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = json.loads((folder / "forwarder.json").read_text())
    _prioritise()
    forwarder = build(config)

    def stop(signum: int, frame: Any) -> None:
        forwarder.stopped = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    (folder / "forwarder.ready").write_text(str(os.getpid()))
    log.info("forwarding between %d interfaces", len(config["tuns"]))
    forwarder.run(alive=(folder / "forwarder.json").exists)
    return 0


if __name__ == "__main__":
    sys.exit(main())
