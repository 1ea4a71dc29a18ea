"""Runtimes that run a split plan for real: socket (binary frames), rpc (PyTorch RPC), in process.

``BACKEND_NAMES`` is the one lookup table from a backend name to its class; every backend
implements :class:`optisplit.runtime.base.Backend` and passes the same contract suite.
"""

from __future__ import annotations

import importlib
from typing import Any

from optisplit.errors import UsageError

__all__ = ["BACKEND_NAMES", "backend_class"]

BACKEND_NAMES: dict[str, str] = {
    "inprocess": "optisplit.runtime.inprocess:InProcessBackend",
    "rpc": "optisplit.runtime.rpc_backend:RpcBackend",
    "socket": "optisplit.runtime.socket_backend:SocketBackend",
}


def backend_class(name: str) -> Any:
    """The backend class registered as ``name``; UsageError listing the valid names."""
    target = BACKEND_NAMES.get(name)
    if target is None:
        raise UsageError(
            f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKEND_NAMES))}"
        )
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
