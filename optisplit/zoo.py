"""The model zoo: every torchvision classification model by name, plus user models from a factory.

Models are always built with ``weights=None`` and a seeded initialisation, so every process that
builds the same ``(name, seed)`` holds bit-identical weights; trained weights come only from a
local state-dict file (never a download). A user model is named by ``"package.module:factory"``:
the factory takes no argument and returns an ``nn.Module`` or ``(nn.Module, example_input)``.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit.errors import ModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "build_model",
    "example_input",
    "file_sha256",
    "input_size",
    "list_models",
]

# Constructor arguments that silence torchvision's "default init will change" warnings without
# changing the architecture.
_BUILD_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"init_weights": True},
    "inception_v3": {"init_weights": True},
}

_INPUT_SEED = 0


@functools.cache
def list_models() -> list[str]:
    """Every torchvision classification model name, sorted."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


@functools.cache
def input_size(name: str) -> int:
    """The default square input resolution of a zoo model (224, 299 for inception_v3, ...).

    It is the smallest crop size among the model's published weights: the resolution the
    architecture was designed for (``vit_h_14`` is built for 224 even though its default
    published weights were fine-tuned at 518).

    Raises:
        ModelError: unknown model name, with close matches.
    """
    from torchvision.models import get_model_weights

    _check_name(name)
    sizes = [int(w.transforms().crop_size[0]) for w in get_model_weights(name)]
    return min(sizes) if sizes else 224


def _check_name(name: str) -> None:
    names = list_models()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see 'optisplit models'"
    raise ModelError(f"unknown model {name!r}{hint}")


def build_model(
    name: str,
    *,
    weights: str | None = None,
    seed: int = 0,
    module: str | None = None,
) -> torch.nn.Module:
    """Build a model in eval mode.

    Args:
        name: a zoo name (see :func:`list_models`); only a label when ``module`` is given.
        weights: path of a local state-dict file (``torch.save(model.state_dict())``); ``None``
            initialises with ``torch.manual_seed(seed)`` (without touching the global RNG).
        seed: the initialisation seed.
        module: ``"package.module:factory"`` for a user model.

    Raises:
        ModelError: unknown model, bad factory spec, unreadable or mismatched weights file.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _user_model(module)[0] if module else _zoo_model(name)
    if weights is not None:
        _load_weights(model, weights, name)
    return model.eval()


def _zoo_model(name: str) -> torch.nn.Module:
    import torchvision

    _check_name(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        model: torch.nn.Module = torchvision.models.get_model(
            name, weights=None, **_BUILD_KWARGS.get(name, {})
        )
    return model


def _user_model(spec: str) -> tuple[torch.nn.Module, torch.Tensor | None]:
    import torch

    factory = _resolve_factory(spec)
    try:
        made = factory()
    except Exception as exc:
        raise ModelError(f"model factory {spec} failed: {type(exc).__name__}: {exc}") from exc
    example: torch.Tensor | None = None
    if isinstance(made, tuple) and len(made) == 2:
        made, example = made
        if not isinstance(example, torch.Tensor):
            raise ModelError(
                f"model factory {spec} must return (nn.Module, Tensor); "
                f"the example input is a {type(example).__name__}"
            )
    if not isinstance(made, torch.nn.Module):
        raise ModelError(
            f"model factory {spec} must return an nn.Module or (nn.Module, example_input), "
            f"got {type(made).__name__}"
        )
    return made, example


def _resolve_factory(spec: str) -> Any:
    modname, sep, attr = spec.partition(":")
    if not sep or not modname or not attr:
        raise ModelError(f"model factory must be 'package.module:function', got {spec!r}")
    # Like other runners of user code, look in the working directory first.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(modname)
    except ImportError as exc:
        raise ModelError(f"cannot import module {modname!r} for model factory: {exc}") from exc
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ModelError(f"module {modname!r} has no callable {attr!r}")
    return factory


def _load_weights(model: torch.nn.Module, path: str, name: str) -> None:
    import torch

    file = Path(path)
    if not file.is_file():
        raise ModelError(
            f"weights file not found: {file} (optisplit never downloads weights; "
            "pass a local state-dict file)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read weights file {file}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"weights file {file} does not fit {name}: {first}") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (workers check a weights file against it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def example_input(name: str, batch_size: int, *, module: str | None = None) -> torch.Tensor:
    """A deterministic example input batch for a model (the same in every process).

    Zoo models get ``randn(batch, 3, S, S)`` with ``S = input_size(name)``. A user factory's
    example input gives the per-item shape and dtype: floating inputs are redrawn at the batch
    size, others (token ids) repeat its first item.

    Raises:
        ModelError: unknown model or bad factory; UsageError for a batch size below 1.
    """
    import torch

    from optisplit.errors import UsageError

    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(_INPUT_SEED)
    if module is None:
        size = input_size(name)
        return torch.randn(batch_size, 3, size, size, generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        example = _user_model(module)[1]
    if example is None:
        return torch.randn(batch_size, 3, 224, 224, generator=generator)
    item_shape = tuple(example.shape[1:])
    if example.is_floating_point():
        return torch.randn(batch_size, *item_shape, generator=generator, dtype=example.dtype)
    return example[:1].expand(batch_size, *item_shape).clone()
