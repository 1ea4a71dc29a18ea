"""``optisplit worker``: serve pipeline stages (and link probes) on this device."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from pathlib import Path

from optisplit.cli._common import positive_int
from optisplit.errors import UsageError

__all__ = ["parse_address", "read_token", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="serve pipeline stages and link probes on this device",
        description=(
            "Serve pipeline stages: the orchestrator (optisplit validate) deploys block ranges "
            "here, and activations flow worker to worker. Every connection must prove it holds "
            "the token (HMAC challenge); the socket backend never unpickles. The rpc backend "
            "(torch.distributed.rpc) unpickles what it receives: use it on trusted networks only. "
            "Prints 'listening on HOST:PORT' once ready."
        ),
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:0, a free port on loopback)",
    )
    parser.add_argument(
        "--token-file", required=True, metavar="F", help="file holding the shared secret"
    )
    parser.add_argument(
        "--torch-device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where stages compute; tensors still travel as CPU bytes (default cpu)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads (default 1)"
    )
    parser.set_defaults(func=_run)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); UsageError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def read_token(path: str) -> bytes:
    """The shared secret from ``path`` (surrounding whitespace stripped)."""
    file = Path(path)
    try:
        token = file.read_bytes().strip()
        mode = file.stat().st_mode
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise UsageError(f"token file {path} is empty")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        logging.getLogger(__name__).warning(
            "token file %s is readable by other users (chmod 600 it)", path
        )
    return token


def _run(args: argparse.Namespace) -> int:
    from optisplit.runtime.launcher import die_with_parent

    die_with_parent()
    host, port = parse_address(args.listen)
    token = read_token(args.token_file)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from optisplit.runtime.stage import configure_torch
    from optisplit.runtime.worker import Worker

    configure_torch(args.threads, args.torch_device)

    try:
        worker = Worker(host, port, token, torch_device=args.torch_device)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    bound_host, bound_port = worker.address
    print(f"optisplit worker listening on {bound_host}:{bound_port}", flush=True)
    logging.getLogger("optisplit").setLevel(logging.INFO)
    try:
        worker.serve_forever()
    finally:
        worker.shutdown()
        sys.stdout.flush()
    return 0
