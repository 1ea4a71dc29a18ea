"""Atomic file writes and versioned JSON documents, so a failure never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optisplit.errors import OptisplitError


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename.

    Raises:
        OptisplitError: the folder cannot be created or written.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise OptisplitError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_json(path: str | os.PathLike[str], document: Mapping[str, Any]) -> Path:
    """Atomically write ``document`` as indented JSON."""
    return atomic_write_text(path, json.dumps(document, indent=2, sort_keys=False) + "\n")


def read_json(
    path: str | os.PathLike[str],
    *,
    kind: str,
    schema_versions: tuple[int, ...],
    error: type[OptisplitError] = OptisplitError,
) -> dict[str, Any]:
    """Read a JSON document that carries a ``schema_version`` we know.

    Args:
        path: the file.
        kind: what the file is, for messages ("profile", "link measurement").
        schema_versions: the versions this reader understands.
        error: the exception type to raise.

    Raises:
        error: missing or unreadable file, invalid JSON, unknown schema version.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{kind} file not found: {file}") from None
    except OSError as exc:
        raise error(f"cannot read {kind} file {file}: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{kind} file {file} is not valid JSON (line {exc.lineno}): {exc.msg}"
        ) from None
    if not isinstance(document, dict):
        raise error(f"{kind} file {file} must hold a JSON object")
    version = document.get("schema_version")
    if version not in schema_versions:
        known = ", ".join(str(v) for v in schema_versions)
        raise error(
            f"{kind} file {file} has schema_version {version!r}; this optisplit reads {known}"
        )
    return document
