"""Link probes over TCP: round-trip time and bulk bandwidth, with an optional HMAC challenge.

Protocol (all integers big-endian, no pickle):

1. The client opens with ``HELLO = MAGIC(4) version(1) flags(1) reserved(2) client_nonce(16)``.
2. The server answers one byte: ``0`` (open) or ``1`` (token required) followed by
   ``server_nonce(16)`` and ``HMAC-SHA256(token, "S" + client_nonce + server_nonce)`` (the
   server proves it knows the token); the client then sends
   ``HMAC-SHA256(token, "C" + server_nonce + client_nonce)`` and the server answers ``0`` (ok)
   or closes the connection.
3. Commands ``op(1) length(8)``: ``P`` ping (``length`` payload bytes echoed back), ``U``
   upload (the client streams ``length`` bytes; the server answers ``length(8)`` once it holds
   them all), ``D`` download (the server streams ``length`` bytes), ``Q`` quit.

RTT is the median of many small pings. Bandwidth of a direction is
``bytes * 8 / (elapsed - rtt)``: the elapsed time of a bulk transfer from its first byte sent to
its acknowledgement (upload) or its last byte received (download), less one round trip.

The runtime worker answers probes on its own port (connections that do not start with the
runtime's magic go to ``serve_probe_connection``); ``optisplit probe-server`` is a stand-alone
server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import socket
import statistics
import struct
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from optisplit._io import read_json, write_json
from optisplit.errors import OptisplitError, TestbedError
from optisplit.testbed import Testbed

__all__ = [
    "MAGIC",
    "SCHEMA_VERSION",
    "LinkMeasurement",
    "ProbeError",
    "ProbeServer",
    "apply_link_measurements",
    "links_path",
    "load_link_measurements",
    "probe_link",
    "save_link_measurement",
    "serve_probe_connection",
]

log = logging.getLogger(__name__)

MAGIC = b"OSPR"
VERSION = 1
SCHEMA_VERSION = 1
_HELLO = struct.Struct(">4sBBH16s")
_COMMAND = struct.Struct(">cQ")
_COUNT = struct.Struct(">Q")
_NONCE = 16
_MAC = 32
_MAX_PING = 64 * 1024
_MAX_BULK = 1 << 30
_CHUNK = 256 * 1024
_TIMEOUT_S = 30.0


class ProbeError(OptisplitError, ConnectionError):
    """A probe failed: unreachable server, refused token, or a malformed exchange."""


@dataclass(frozen=True)
class LinkMeasurement:
    """One probed link, as seen from the client."""

    address: str
    rtt_ms: float
    rtt_p10_ms: float
    rtt_p90_ms: float
    rtt_samples: int
    up_mbps: float
    down_mbps: float
    bulk_bytes: int
    measured_at: str

    @property
    def mbps(self) -> float:
        """The slower direction's bandwidth (testbed links carry one figure)."""
        return min(self.up_mbps, self.down_mbps)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mbps": self.mbps}


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"".join(parts), hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ProbeError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _drain(sock: socket.socket, n: int) -> None:
    """Receive and discard ``n`` bytes into one reused buffer."""
    buf = bytearray(min(n, _CHUNK) or 1)
    left = n
    while left:
        k = sock.recv_into(buf, min(left, len(buf)))
        if k == 0:
            raise ProbeError(f"connection closed with {left} of {n} bytes outstanding")
        left -= k


def _stream(sock: socket.socket, n: int) -> None:
    chunk = bytes(min(n, _CHUNK))
    left = n
    while left:
        part = chunk if left >= len(chunk) else chunk[:left]
        sock.sendall(part)
        left -= len(part)


# ----- server -----------------------------------------------------------------------------------


def serve_probe_connection(sock: socket.socket, token: bytes | None) -> None:
    """Answer one probe client on an accepted socket until it quits or misbehaves.

    Args:
        sock: the accepted connection (nothing read from it yet).
        token: the shared secret clients must prove; ``None`` serves anyone.

    Raises:
        ProbeError: bad magic or version, failed authentication, or a malformed command; the
            caller logs it and closes the socket.
    """
    sock.settimeout(_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    magic, version, _flags, _, client_nonce = _HELLO.unpack(_recv_exact(sock, _HELLO.size))
    if magic != MAGIC or version != VERSION:
        raise ProbeError(f"not a probe client (magic {magic!r}, version {version})")
    _server_auth(sock, token, client_nonce)
    while True:
        op, length = _COMMAND.unpack(_recv_exact(sock, _COMMAND.size))
        if op == b"Q":
            return
        if op == b"P" and length <= _MAX_PING:
            sock.sendall(_recv_exact(sock, length))
        elif op == b"U" and length <= _MAX_BULK:
            _drain(sock, length)
            sock.sendall(_COUNT.pack(length))
        elif op == b"D" and length <= _MAX_BULK:
            _stream(sock, length)
        else:
            raise ProbeError(f"bad probe command {op!r} with length {length}")


def _server_auth(sock: socket.socket, token: bytes | None, client_nonce: bytes) -> None:
    if token is None:
        sock.sendall(b"\x00")
        return
    server_nonce = secrets.token_bytes(_NONCE)
    sock.sendall(b"\x01" + server_nonce + _mac(token, b"S", client_nonce, server_nonce))
    proof = _recv_exact(sock, _MAC)
    if not hmac.compare_digest(proof, _mac(token, b"C", server_nonce, client_nonce)):
        raise ProbeError("probe client failed the token challenge")
    sock.sendall(b"\x00")


class ProbeServer:
    """A stand-alone probe server: one thread per connection, stopped by ``close``."""

    def __init__(self, host: str, port: int, token: bytes | None = None) -> None:
        self.token = token
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self.rejected = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: Any) -> None:
        try:
            serve_probe_connection(conn, self.token)
        except (OSError, OptisplitError, struct.error) as exc:
            self.rejected += 1
            log.warning("probe from %s rejected: %s", peer, exc)
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def __enter__(self) -> ProbeServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----- client -----------------------------------------------------------------------------------


def probe_link(
    host: str,
    port: int,
    *,
    token: bytes | None = None,
    rtt_samples: int = 50,
    ping_bytes: int = 32,
    bulk_bytes: int = 8 * 2**20,
    timeout_s: float = _TIMEOUT_S,
) -> LinkMeasurement:
    """Measure RTT and bandwidth to a probe server (a worker or ``optisplit probe-server``).

    Args:
        host: the server's address.
        port: its port.
        token: the shared secret, when the server requires one.
        rtt_samples: pings whose median is the RTT.
        ping_bytes: payload of one ping.
        bulk_bytes: bytes moved in each direction for the bandwidth.
        timeout_s: limit on every blocking call.

    Raises:
        ProbeError: the server cannot be reached, refuses the token, or breaks the protocol.
    """
    if rtt_samples < 1 or bulk_bytes < 1 or not 0 <= ping_bytes <= _MAX_PING:
        raise ProbeError(
            "probe needs rtt_samples >= 1, bulk_bytes >= 1, 0 <= ping_bytes <= 64 KiB"
        )
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise ProbeError(
            f"cannot reach probe server {host}:{port}: {exc.strerror or exc}"
        ) from None
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            _client_auth(sock, token)
            rtts = _pings(sock, rtt_samples, ping_bytes)
            rtt = statistics.median(rtts)
            up = _upload(sock, bulk_bytes, rtt)
            down = _download(sock, bulk_bytes, rtt)
            sock.sendall(_COMMAND.pack(b"Q", 0))
        except OSError as exc:
            raise ProbeError(f"probe of {host}:{port} failed: {exc.strerror or exc}") from None
    deciles = statistics.quantiles(rtts, n=10) if len(rtts) > 1 else [rtt] * 9
    return LinkMeasurement(
        address=f"{host}:{port}",
        rtt_ms=rtt * 1e3,
        rtt_p10_ms=deciles[0] * 1e3,
        rtt_p90_ms=deciles[-1] * 1e3,
        rtt_samples=len(rtts),
        up_mbps=up,
        down_mbps=down,
        bulk_bytes=bulk_bytes,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _client_auth(sock: socket.socket, token: bytes | None) -> None:
    nonce = secrets.token_bytes(_NONCE)
    sock.sendall(_HELLO.pack(MAGIC, VERSION, 1 if token else 0, 0, nonce))
    mode = _recv_exact(sock, 1)
    if mode == b"\x00":
        return
    if mode != b"\x01":
        raise ProbeError(f"unexpected answer {mode!r} from the probe server")
    server_nonce = _recv_exact(sock, _NONCE)
    proof = _recv_exact(sock, _MAC)
    if token is None:
        raise ProbeError("the probe server requires a token (pass --token-file)")
    if not hmac.compare_digest(proof, _mac(token, b"S", nonce, server_nonce)):
        raise ProbeError("the probe server does not know our token")
    sock.sendall(_mac(token, b"C", server_nonce, nonce))
    try:
        ok = _recv_exact(sock, 1)
    except ProbeError:
        raise ProbeError("the probe server refused our token") from None
    if ok != b"\x00":
        raise ProbeError("the probe server refused our token")


def _pings(sock: socket.socket, samples: int, size: int) -> list[float]:
    payload = os.urandom(size)
    header = _COMMAND.pack(b"P", size)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        sock.sendall(header + payload)
        echo = _recv_exact(sock, size)
        times.append(time.perf_counter() - start)
        if echo != payload:
            raise ProbeError("ping echo differs from what was sent")
    return times


def _rate(nbytes: int, elapsed: float, rtt: float) -> float:
    """Mbit/s of a bulk transfer, with one round trip of latency taken out."""
    busy = max(elapsed - rtt, elapsed * 0.01, 1e-9)
    return nbytes * 8 / busy / 1e6


def _upload(sock: socket.socket, nbytes: int, rtt: float) -> float:
    start = time.perf_counter()
    sock.sendall(_COMMAND.pack(b"U", nbytes))
    _stream(sock, nbytes)
    (count,) = _COUNT.unpack(_recv_exact(sock, _COUNT.size))
    elapsed = time.perf_counter() - start
    if count != nbytes:
        raise ProbeError(f"server acknowledged {count} of {nbytes} bytes")
    return _rate(nbytes, elapsed, rtt)


def _download(sock: socket.socket, nbytes: int, rtt: float) -> float:
    start = time.perf_counter()
    sock.sendall(_COMMAND.pack(b"D", nbytes))
    _drain(sock, nbytes)
    return _rate(nbytes, time.perf_counter() - start, rtt)


# ----- files ------------------------------------------------------------------------------------


def links_path(testbed: str, *, root: str | os.PathLike[str] = "profiles") -> Path:
    """``<root>/links/<testbed>.json``."""
    return Path(root) / "links" / f"{testbed}.json"


def load_link_measurements(
    testbed: str, *, root: str | os.PathLike[str] = "profiles"
) -> dict[tuple[str, str], dict[str, Any]]:
    """Measured links of a testbed, keyed by the sorted device pair (empty when none)."""
    path = links_path(testbed, root=root)
    if not path.is_file():
        return {}
    doc = read_json(
        path, kind="link measurement", schema_versions=(SCHEMA_VERSION,), error=TestbedError
    )
    found = {}
    for entry in doc.get("links", []):
        a, b = sorted(entry["between"])
        found[(a, b)] = dict(entry)
    return found


def save_link_measurement(
    testbed: str,
    a: str,
    b: str,
    measurement: LinkMeasurement,
    *,
    root: str | os.PathLike[str] = "profiles",
) -> Path:
    """Record (or replace) the measurement of link ``a``–``b`` in the testbed's links file."""
    found = load_link_measurements(testbed, root=root)
    found[tuple(sorted((a, b)))] = {"between": [a, b], **measurement.to_dict()}  # type: ignore[index]
    doc = {
        "schema_version": SCHEMA_VERSION,
        "testbed": testbed,
        "links": [found[k] for k in sorted(found)],
    }
    return write_json(links_path(testbed, root=root), doc)


def apply_link_measurements(
    testbed: Testbed, *, root: str | os.PathLike[str] = "profiles"
) -> Testbed:
    """The testbed with the RTT and bandwidth of every measured link replacing its spec.

    Measurements come from ``<root>/links/<testbed>.json``; a measured pair that is not a
    direct link of the testbed (a multi-hop path) is ignored with a warning.
    """
    found = load_link_measurements(testbed.name, root=root)
    links = []
    for link in testbed.links:
        measured = found.pop((min(link.a, link.b), max(link.a, link.b)), None)
        if measured is not None:
            link = dataclasses.replace(
                link, rtt_ms=float(measured["rtt_ms"]), mbps=float(measured["mbps"])
            )
        links.append(link)
    for a, b in found:
        log.warning("measured pair %s-%s is not a direct link of %s; ignored", a, b, testbed.name)
    return dataclasses.replace(testbed, links=tuple(links))
