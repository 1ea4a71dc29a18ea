"""The socket wire format: fixed binary frames of raw tensor bytes, and the HMAC handshake.

A frame is a 24-byte prefix, one 80-byte descriptor per tensor, the timestamps (float64), a small
body (JSON for control messages, nonces for the handshake) and the raw contiguous tensor bytes::

    prefix      !4sBBHQII   magic b"OSPL", version, kind, tensor count, request id,
                            timestamp count, body length
    descriptor  !BB6xQ8Q    dtype code, ndim, byte length, shape (ndim used, rest zero)

Every field is checked against hard limits before anything is allocated, so a hostile or broken
peer costs a logged rejection, never memory or a hang: every blocking call has a deadline.
Nothing here unpickles; tensors are received straight into buffers allocated from the
descriptor (``recv_into``), and sent from their own memory with ``sendmsg``.

Handshake (client speaks first; both sides prove they hold the shared token)::

    client -> HELLO      body = client nonce (32) + role
    server -> CHALLENGE  body = server nonce (32) + HMAC(token, "S" + client nonce + server nonce)
    client -> AUTH       body = HMAC(token, "C" + server nonce + client nonce + role)
    server -> AUTH_OK
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import re
import secrets
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optisplit.errors import RuntimeFailure

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAGIC",
    "VERSION",
    "Frame",
    "FrameError",
    "Kind",
    "PeerError",
    "client_handshake",
    "connect",
    "recv_frame",
    "send_control",
    "send_frame",
    "server_handshake",
]

MAGIC = b"OSPL"
VERSION = 1
PREFIX = struct.Struct("!4sBBHQII")
DESCRIPTOR = struct.Struct("!BB6xQ8Q")
MAX_TENSORS = 64
MAX_DIMS = 8
MAX_STAMPS = 4096
MAX_BODY = 1 << 20
MAX_TENSOR_BYTES = 1 << 31
"""Default limit on the tensor bytes of one frame (2 GiB)."""
NONCE_BYTES = 32
_ROLE = re.compile(r"^(control|data:\d{1,4})$")
_POLL_S = 0.25


class FrameError(RuntimeFailure):
    """A peer sent something that is not a valid frame, or did not send it in time."""


class PeerError(FrameError):
    """The peer answered with an ERROR frame; the message is its reason."""


class Kind(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    AUTH_OK = 4
    DEPLOY = 5
    READY = 6
    DATA = 7
    ERROR = 8
    STATS = 9
    STATS_REPLY = 10
    RESET_STATS = 11
    CLOSE = 12
    CLOSED = 13


_DTYPE_NAMES = {
    1: "float32",
    2: "float16",
    3: "bfloat16",
    4: "float64",
    5: "int64",
    6: "int32",
    7: "int16",
    8: "int8",
    9: "uint8",
    10: "bool",
}
_ITEMSIZE = {1: 4, 2: 2, 3: 2, 4: 8, 5: 8, 6: 4, 7: 2, 8: 1, 9: 1, 10: 1}
_CODES = {name: code for code, name in _DTYPE_NAMES.items()}


@dataclass
class Frame:
    """One received or to-be-sent message."""

    kind: Kind
    request_id: int = 0
    tensors: list[torch.Tensor] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)
    body: bytes = b""

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; FrameError when it is not one."""
        try:
            doc = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FrameError(f"{self.kind.name} body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise FrameError(f"{self.kind.name} body must be a JSON object")
        return doc


def dtype_code(dtype: torch.dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    code = _CODES.get(name)
    if code is None:
        raise FrameError(f"dtype {name} cannot travel on the wire ({', '.join(_CODES)})")
    return code


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's own memory as bytes (CPU, contiguous), for sendmsg and recv_into."""
    import torch

    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _descriptor(tensor: torch.Tensor) -> bytes:
    if tensor.dim() > MAX_DIMS:
        raise FrameError(f"tensor has {tensor.dim()} dims; the wire carries at most {MAX_DIMS}")
    shape = [*tensor.shape, *([0] * (MAX_DIMS - tensor.dim()))]
    nbytes = tensor.numel() * tensor.element_size()
    return DESCRIPTOR.pack(dtype_code(tensor.dtype), tensor.dim(), nbytes, *shape)


def send_frame(
    sock: socket.socket,
    kind: Kind,
    request_id: int = 0,
    tensors: Sequence[torch.Tensor] = (),
    stamps: Sequence[float] = (),
    body: bytes = b"",
    *,
    timeout: float = 30.0,
) -> None:
    """Send one frame; tensors go from their own (CPU, contiguous) memory without a copy.

    Raises:
        FrameError: too many tensors/stamps, an unsupported dtype, or the send timed out.
    """
    if len(tensors) > MAX_TENSORS or len(stamps) > MAX_STAMPS or len(body) > MAX_BODY:
        raise FrameError(
            f"frame too large: {len(tensors)} tensors, {len(stamps)} stamps, {len(body)} body bytes"
        )
    cpu = [t.detach().cpu().contiguous() for t in tensors]
    head = [
        PREFIX.pack(MAGIC, VERSION, int(kind), len(cpu), request_id, len(stamps), len(body)),
        *(_descriptor(t) for t in cpu),
        struct.pack(f"!{len(stamps)}d", *stamps),
        body,
    ]
    buffers = [b"".join(head), *(_bytes_view(t) for t in cpu if t.numel())]
    _sendmsg_all(sock, buffers, time.monotonic() + timeout)


def _sendmsg_all(sock: socket.socket, buffers: list[Any], deadline: float) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if len(v)]
    while views:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FrameError("send timed out")
        sock.settimeout(remaining)
        try:
            sent = sock.sendmsg(views[:64])
        except TimeoutError:
            raise FrameError("send timed out") from None
        except OSError as exc:
            raise FrameError(f"send failed: {exc.strerror or exc}") from None
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def send_control(
    sock: socket.socket, kind: Kind, document: dict[str, Any] | None = None, **kw: Any
) -> None:
    """Send a control frame whose body is a JSON object."""
    body = json.dumps(document or {}).encode("utf-8")
    send_frame(sock, kind, body=body, **kw)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float, what: str) -> None:
    got = 0
    while got < len(view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FrameError(f"timed out receiving {what} ({got} of {len(view)} bytes)")
        sock.settimeout(remaining)
        try:
            n = sock.recv_into(view[got:], len(view) - got)
        except TimeoutError:
            continue
        except OSError as exc:
            raise FrameError(f"connection error receiving {what}: {exc.strerror or exc}") from None
        if n == 0:
            raise FrameError(
                f"connection closed while receiving {what} ({got} of {len(view)} bytes)"
            )
        got += n


def _wait_first_byte(
    sock: socket.socket, buf: memoryview, idle_timeout: float | None, stop: Any | None
) -> int:
    """Wait for the first byte of a frame; returns how many bytes arrived (0 on a clean EOF)."""
    start = time.monotonic()
    while True:
        if stop is not None and stop.is_set():
            raise FrameError("stopped while waiting for a frame")
        wait = _POLL_S if stop is not None else None
        if idle_timeout is not None:
            left = idle_timeout - (time.monotonic() - start)
            if left <= 0:
                raise FrameError(f"no frame within {idle_timeout:g} s")
            wait = min(wait, left) if wait is not None else left
        sock.settimeout(wait)
        try:
            return sock.recv_into(buf, len(buf))
        except TimeoutError:
            continue
        except OSError as exc:
            raise FrameError(f"connection error: {exc.strerror or exc}") from None


def recv_frame(
    sock: socket.socket,
    *,
    idle_timeout: float | None = None,
    frame_timeout: float = 30.0,
    stop: Any | None = None,
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
    eof_ok: bool = False,
) -> Frame | None:
    """Receive one frame, validating every header field before allocating.

    Args:
        idle_timeout: how long to wait for the frame to start (None: forever, polling ``stop``).
        frame_timeout: deadline for the rest of the frame once its first byte arrived.
        stop: a threading.Event; when set, waiting stops with FrameError.
        max_tensor_bytes: the most tensor bytes one frame may carry (all tensors together).
        eof_ok: return None on a clean end of stream before a frame starts.

    Raises:
        FrameError: malformed header, a limit exceeded, truncated frame, timeout.
    """
    prefix = bytearray(PREFIX.size)
    view = memoryview(prefix)
    got = _wait_first_byte(sock, view, idle_timeout, stop)
    if got == 0:
        if eof_ok:
            return None
        raise FrameError("connection closed")
    deadline = time.monotonic() + frame_timeout
    _recv_into(sock, view[got:], deadline, "frame prefix")
    kind, n_tensors, request_id, n_stamps, body_len = _parse_prefix(bytes(prefix))
    descriptors = bytearray(DESCRIPTOR.size * n_tensors)
    _recv_into(sock, memoryview(descriptors), deadline, "tensor descriptors")
    specs = [
        _parse_descriptor(
            descriptors[i * DESCRIPTOR.size : (i + 1) * DESCRIPTOR.size], max_tensor_bytes
        )
        for i in range(n_tensors)
    ]
    total = sum(math.prod(shape) * _ITEMSIZE[code] for code, shape in specs)
    if total > max_tensor_bytes:
        raise FrameError(f"tensors of {total} bytes exceed the frame limit of {max_tensor_bytes}")
    tail = bytearray(8 * n_stamps + body_len)
    _recv_into(sock, memoryview(tail), deadline, "stamps and body")
    stamps = list(struct.unpack(f"!{n_stamps}d", tail[: 8 * n_stamps]))
    tensors = [_recv_tensor(sock, code, shape, deadline) for code, shape in specs]
    return Frame(Kind(kind), request_id, tensors, stamps, bytes(tail[8 * n_stamps :]))


def _parse_prefix(prefix: bytes) -> tuple[int, int, int, int, int]:
    magic, version, kind, n_tensors, request_id, n_stamps, body_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}")
    if version != VERSION:
        raise FrameError(f"unsupported wire version {version} (this side speaks {VERSION})")
    if kind not in Kind._value2member_map_:
        raise FrameError(f"unknown frame kind {kind}")
    if n_tensors > MAX_TENSORS:
        raise FrameError(f"{n_tensors} tensors exceed the limit of {MAX_TENSORS}")
    if n_stamps > MAX_STAMPS:
        raise FrameError(f"{n_stamps} timestamps exceed the limit of {MAX_STAMPS}")
    if body_len > MAX_BODY:
        raise FrameError(f"body of {body_len} bytes exceeds the limit of {MAX_BODY}")
    return kind, n_tensors, request_id, n_stamps, body_len


def _parse_descriptor(raw: bytes | bytearray, max_tensor_bytes: int) -> tuple[int, list[int]]:
    code, ndim, nbytes, *dims = DESCRIPTOR.unpack(raw)
    if code not in _DTYPE_NAMES:
        raise FrameError(f"unknown dtype code {code}")
    if ndim > MAX_DIMS:
        raise FrameError(f"{ndim} dims exceed the limit of {MAX_DIMS}")
    shape = list(dims[:ndim])
    if any(dims[ndim:]):
        raise FrameError("unused shape slots must be zero")
    if any(d > max_tensor_bytes for d in shape):
        raise FrameError(f"shape {shape} is out of range")
    expected = math.prod(shape) * _ITEMSIZE[code]
    if nbytes != expected:
        raise FrameError(f"byte length {nbytes} does not match shape {shape} ({expected} bytes)")
    if nbytes > max_tensor_bytes:
        raise FrameError(f"tensor of {nbytes} bytes exceeds the limit of {max_tensor_bytes}")
    return code, shape


def _recv_tensor(
    sock: socket.socket, code: int, shape: list[int], deadline: float
) -> torch.Tensor:
    import torch

    tensor = torch.empty(shape, dtype=getattr(torch, _DTYPE_NAMES[code]))
    if tensor.numel():
        _recv_into(sock, _bytes_view(tensor), deadline, f"tensor {shape}")
    return tensor


# -- connections and the handshake ------------------------------------------------------------


def connect(
    address: tuple[str, int], token: bytes, role: str, *, timeout: float = 10.0
) -> socket.socket:
    """Open an authenticated connection to a worker (or a sink) at ``address``.

    Raises:
        RuntimeFailure: cannot connect, or the peer failed the handshake.
    """
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        host, port = address
        raise RuntimeFailure(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        client_handshake(sock, token, role, timeout=timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"".join(parts), hashlib.sha256).digest()


def client_handshake(
    sock: socket.socket, token: bytes, role: str, *, timeout: float = 10.0
) -> None:
    """Authenticate to the server and check that it holds the token too."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, Kind.HELLO, body=nonce + role.encode(), timeout=timeout)
    frame = _expect(sock, Kind.CHALLENGE, timeout)
    if len(frame.body) != 2 * NONCE_BYTES:
        raise FrameError("malformed challenge")
    server_nonce, proof = frame.body[:NONCE_BYTES], frame.body[NONCE_BYTES:]
    if not hmac.compare_digest(proof, _mac(token, b"S", nonce, server_nonce)):
        raise FrameError("the peer does not hold the shared token (server proof mismatch)")
    send_frame(
        sock,
        Kind.AUTH,
        body=_mac(token, b"C", server_nonce, nonce, role.encode()),
        timeout=timeout,
    )
    _expect(sock, Kind.AUTH_OK, timeout)


def server_handshake(sock: socket.socket, token: bytes, *, timeout: float = 5.0) -> str:
    """Run the server side of the handshake; returns the client's role.

    Raises:
        FrameError: malformed frames, wrong token, unknown role, or too slow.
    """
    hello = _expect(sock, Kind.HELLO, timeout)
    nonce, role = hello.body[:NONCE_BYTES], hello.body[NONCE_BYTES:].decode("ascii", "replace")
    if len(nonce) != NONCE_BYTES or _ROLE.match(role) is None:
        raise FrameError(f"malformed hello (role {role[:20]!r})")
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(
        sock,
        Kind.CHALLENGE,
        body=server_nonce + _mac(token, b"S", nonce, server_nonce),
        timeout=timeout,
    )
    auth = _expect(sock, Kind.AUTH, timeout)
    if not hmac.compare_digest(auth.body, _mac(token, b"C", server_nonce, nonce, role.encode())):
        raise FrameError("wrong token (HMAC mismatch)")
    send_frame(sock, Kind.AUTH_OK, timeout=timeout)
    return role


def _expect(sock: socket.socket, kind: Kind, timeout: float) -> Frame:
    frame = recv_frame(sock, idle_timeout=timeout, frame_timeout=timeout, max_tensor_bytes=0)
    assert frame is not None
    if frame.kind == Kind.ERROR and kind != Kind.ERROR:
        raise PeerError(str(frame.json().get("error", "unknown error")))
    if frame.kind != kind:
        raise FrameError(f"expected {kind.name}, got {frame.kind.name}")
    if frame.tensors:
        raise FrameError(f"{kind.name} must not carry tensors")
    return frame


def expect(sock: socket.socket, kind: Kind, *, timeout: float) -> Frame:
    """Receive one control frame of ``kind`` (an ERROR frame raises with the peer's reason)."""
    return _expect(sock, kind, timeout)
