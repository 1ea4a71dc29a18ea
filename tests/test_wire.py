"""The socket wire format: frames round-trip exactly, hostile headers are rejected, HMAC handshake."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
import torch

from optisplit.runtime import wire
from optisplit.runtime.wire import DESCRIPTOR, MAGIC, PREFIX, FrameError, Kind


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _send_async(sock: socket.socket, *args: object, **kw: object) -> threading.Thread:
    thread = threading.Thread(target=wire.send_frame, args=(sock, *args), kwargs=kw)
    thread.start()
    return thread


def test_tensors_stamps_and_body_round_trip(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    tensors = [
        torch.randn(2, 64, 56, 56),
        torch.arange(10, dtype=torch.int64).reshape(2, 5),
        torch.tensor([True, False, True]),
        torch.randn(3, 4).to(torch.bfloat16),
        torch.randn(4, 4).t(),  # not contiguous
        torch.empty(0, 3),
    ]
    thread = _send_async(a, Kind.DATA, 42, tensors, [1.5, 2.25], b'{"x": 1}')
    frame = wire.recv_frame(b, idle_timeout=5.0)
    thread.join()
    assert frame is not None
    assert (frame.kind, frame.request_id, frame.stamps) == (Kind.DATA, 42, [1.5, 2.25])
    assert frame.json() == {"x": 1}
    assert len(frame.tensors) == len(tensors)
    for got, want in zip(frame.tensors, tensors):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_clean_eof_before_a_frame_is_none_when_allowed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.close()
    assert wire.recv_frame(b, idle_timeout=1.0, eof_ok=True) is None


def _prefix(**kw: int | bytes) -> bytes:
    fields: dict[str, int | bytes] = {
        "magic": MAGIC,
        "version": wire.VERSION,
        "kind": int(Kind.DATA),
        "n": 0,
        "rid": 1,
        "stamps": 0,
        "body": 0,
    }
    fields.update(kw)
    return PREFIX.pack(*fields.values())


def _descriptor(code: int, shape: list[int], nbytes: int | None = None) -> bytes:
    itemsize = 4
    size = nbytes if nbytes is not None else itemsize * int(torch.tensor(shape).prod())
    return DESCRIPTOR.pack(code, len(shape), size, *shape, *[0] * (8 - len(shape)))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (_prefix(magic=b"XXXX"), "bad magic"),
        (_prefix(version=9), "wire version"),
        (_prefix(kind=200), "unknown frame kind"),
        (_prefix(n=65535), "tensors exceed"),
        (_prefix(stamps=100_000), "timestamps exceed"),
        (_prefix(body=1 << 30), "body of"),
        (_prefix(n=1) + _descriptor(77, [2]), "unknown dtype"),
        (_prefix(n=1) + _descriptor(1, [2, 3], nbytes=999), "does not match shape"),
        (_prefix(n=1) + _descriptor(1, [1 << 20, 1 << 20]), "exceeds the limit"),
        (_prefix(n=1) + struct.pack("!BB6xQ8Q", 1, 9, 4, *[1] * 8), "dims exceed"),
        (_prefix(n=2) + _descriptor(1, [1 << 22]) * 2, "exceed the frame limit"),
        (_prefix(n=1) + _descriptor(1, [4]), "connection closed"),  # truncated
        (_prefix()[:10], "connection closed"),
    ],
)
def test_hostile_headers_are_rejected(
    pair: tuple[socket.socket, socket.socket], raw: bytes, reason: str
) -> None:
    a, b = pair
    a.sendall(raw)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(FrameError, match=reason):
        wire.recv_frame(b, idle_timeout=2.0, frame_timeout=2.0, max_tensor_bytes=1 << 24)


def test_a_stalled_frame_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(_prefix()[:5])
    with pytest.raises(FrameError, match="timed out"):
        wire.recv_frame(b, idle_timeout=1.0, frame_timeout=0.3)


def test_no_frame_within_the_idle_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    with pytest.raises(FrameError, match="no frame within"):
        wire.recv_frame(b, idle_timeout=0.2)


def _serve_handshake(sock: socket.socket, token: bytes, out: dict[str, object]) -> None:
    try:
        out["role"] = wire.server_handshake(sock, token, timeout=2.0)
    except FrameError as exc:
        out["error"] = str(exc)


def test_handshake_with_the_same_token(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    out: dict[str, object] = {}
    thread = threading.Thread(target=_serve_handshake, args=(b, b"t0k", out))
    thread.start()
    wire.client_handshake(a, b"t0k", "data:3", timeout=2.0)
    thread.join()
    assert out == {"role": "data:3"}


def test_client_rejects_a_server_without_the_token(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    out: dict[str, object] = {}
    thread = threading.Thread(target=_serve_handshake, args=(b, b"other", out))
    thread.start()
    with pytest.raises(FrameError, match="server proof mismatch"):
        wire.client_handshake(a, b"t0k", "control", timeout=2.0)
    a.close()
    thread.join()
    assert "error" in out


def test_server_rejects_a_wrong_mac_and_bad_roles(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    out: dict[str, object] = {}
    thread = threading.Thread(target=_serve_handshake, args=(b, b"t0k", out))
    thread.start()
    wire.send_frame(a, Kind.HELLO, body=b"n" * wire.NONCE_BYTES + b"control")
    challenge = wire.recv_frame(a, idle_timeout=2.0)
    assert challenge is not None and challenge.kind == Kind.CHALLENGE
    wire.send_frame(a, Kind.AUTH, body=b"\0" * 32)
    thread.join()
    assert "HMAC mismatch" in str(out["error"])

    c, d = socket.socketpair()
    out2: dict[str, object] = {}
    thread = threading.Thread(target=_serve_handshake, args=(d, b"t0k", out2))
    thread.start()
    wire.send_frame(c, Kind.HELLO, body=b"n" * wire.NONCE_BYTES + b"root")
    thread.join()
    c.close()
    d.close()
    assert "malformed hello" in str(out2["error"])
