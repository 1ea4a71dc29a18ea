"""Tracing a model into a chain of blocks with cut points, and building any block range as a module.

We trace with ``torch.fx.symbolic_trace`` (a custom ``Tracer``) rather than ``torch.export``:

* fx keeps the model's own submodules as ``call_module`` nodes, so a stage module built from a
  block range shares parameters with the model and runs the same eager kernels (no
  decomposition into aten ops, no re-specialisation), which is what the runtime deploys;
* the granularity is a choice of leaf modules: at ``coarse`` granularity whole units (a residual
  block, an Inception module, a ``features`` child) are leaves, so even a model whose block
  internals cannot be traced splits at its block boundaries; ``fine`` traces down to every op;
* it is fast: tracing resnet18 takes a few milliseconds, ``torch.export`` takes seconds.

The graph's nodes, in execution order, are grouped into blocks ``0..B-1``. A boundary between
two nodes is a cut only when every value crossing it is a tensor (an ``int`` from ``x.size(0)``
or a tuple cannot be sent to the next device), so such nodes are merged with their neighbour.
Cut ``c`` separates blocks ``< c`` from blocks ``>= c``; its name is the qualified name of the
first module after it (torch.distributed.pipelining's ``SplitPoint.BEGINNING`` convention).

Coarse units: the model's children, descending into every plain ``nn.Sequential`` or
``nn.ModuleList``, into a ``Sequential`` subclass that only chains blocks (RegNet's stages; not
``Conv2dNormActivation``, whose children are single layers), and into a top-level child that
holds a plain container of at least four non-leaf modules (a vision transformer's encoder). This yields every ``features`` child of AlexNet, VGG and MobileNetV2, every
residual block of the ResNets and every child of InceptionV3: each cut the ParetoPipe paper used.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optisplit import _blocks
from optisplit.errors import TraceError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import fx

__all__ = [
    "GRANULARITIES",
    "BlockInfo",
    "Chain",
    "CutInfo",
    "TensorInfo",
    "Verification",
    "load_chain",
    "trace",
]

GRANULARITIES = ("coarse", "fine")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor crossing a cut, at the chain's batch size."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class BlockInfo:
    """Block ``index``: its name and the bytes of the parameters and buffers it uses."""

    index: int
    name: str
    param_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "param_bytes": self.param_bytes}


@dataclass(frozen=True)
class CutInfo:
    """Interior cut ``index`` (1..B-1): the tensors crossing it and their total bytes."""

    index: int
    name: str
    bytes: int
    tensors: list[TensorInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "bytes": self.bytes,
            "tensors": [t.to_dict() for t in self.tensors],
        }


@dataclass(frozen=True)
class Verification:
    """Every cut's halves, stitched, against the whole model."""

    ok: bool
    max_abs_diff: float
    failed_cuts: tuple[int, ...]
    cut_diffs: tuple[float, ...]
    """Max abs difference per interior cut 1..B-1."""


class Chain:
    """A model traced into blocks ``0..B-1`` and the cuts between them.

    Attributes:
        name, granularity, batch_size, n_blocks: what was traced and how.
        blocks: one :class:`BlockInfo` per block.
        cuts: interior cuts 1..B-1, each with the tensors that cross it.
        input_bytes, output_bytes: bytes of the model input (cut 0) and output (cut B).
        input_shape: shape of the (first) model input.
        graph_module: the traced ``torch.fx.GraphModule`` (shares parameters with the model).
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        model: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        *,
        name: str,
        granularity: str,
    ) -> None:
        self.name = name
        self.granularity = granularity
        self.graph_module = graph_module
        self.model = model
        self.example_inputs = example_inputs
        self.batch_size = int(example_inputs[0].shape[0]) if example_inputs[0].dim() else 1
        self.input_shape = tuple(int(d) for d in example_inputs[0].shape)
        nodes = [n for n in graph_module.graph.nodes]
        self._inputs = [n for n in nodes if n.op == "placeholder"]
        self._output_values = _output_values(nodes[-1], name)
        self._block_nodes = _blocks.group(graph_module, nodes)
        self._crossing = _blocks.crossing_values(
            self._block_nodes, self._inputs, self._output_values
        )
        self.n_blocks = len(self._block_nodes)
        names = _blocks.unique([_blocks.block_name(ns) for ns in self._block_nodes])
        self.blocks = [
            BlockInfo(i, names[i], _blocks.param_bytes(graph_module, ns))
            for i, ns in enumerate(self._block_nodes)
        ]
        self.cuts = [
            CutInfo(c, self.blocks[c].name, _total(infos), infos)
            for c in range(1, self.n_blocks)
            for infos in [self.cut_tensors(c)]
        ]
        self.input_bytes = _total(self.cut_tensors(0))
        self.output_bytes = _total(self.cut_tensors(self.n_blocks))

    def __repr__(self) -> str:
        return f"Chain({self.name!r}, {self.granularity}, batch {self.batch_size}, {self.n_blocks} blocks)"

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start < end <= self.n_blocks:
            raise UsageError(
                f"block range [{start}:{end}] is out of range for {self.name} "
                f"({self.granularity}: {self.n_blocks} blocks, 0 <= start < end <= {self.n_blocks})"
            )

    def cut_tensors(self, cut: int) -> list[TensorInfo]:
        """The tensors crossing ``cut``: 0 is the model input, B the model output."""
        if not 0 <= cut <= self.n_blocks:
            raise UsageError(
                f"cut {cut} is out of range for {self.name} "
                f"({self.granularity}: {self.n_blocks} blocks, cuts 0..{self.n_blocks})"
            )
        return [_tensor_info(n) for n in self._crossing[cut]]

    def block_out_bytes(self, index: int) -> int:
        """Bytes of the tensors block ``index`` produces for later blocks or the output."""
        own = set(self._block_nodes[index])
        return sum(_tensor_info(n).bytes for n in self._crossing[index + 1] if n in own)

    def stage_module(self, start: int, end: int) -> torch.nn.Module:
        """A runnable module for blocks ``[start, end)``, sharing parameters with the model.

        Its ``forward`` takes the tensors crossing cut ``start`` (in :meth:`cut_tensors` order;
        the model input for ``start == 0``) and returns the tuple of tensors crossing cut ``end``
        (a 1-tuple holding the model output when ``end == n_blocks``).
        """
        from torch import fx

        self._check_range(start, end)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in self._crossing[start]:
            env[node] = graph.placeholder(node.name)
        for block in self._block_nodes[start:end]:
            for node in block:
                for dep in node.all_input_nodes:
                    if dep not in env and dep.op == "get_attr":
                        env[dep] = graph.node_copy(dep)
                env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(tuple(env[n] for n in self._crossing[end]))
        module = fx.GraphModule(self.graph_module, graph, f"{self.name}_{start}_{end}")
        return module.eval()

    def verify(self, *, rtol: float = 1e-5, mode: str = "halves") -> Verification:
        """Check the chain's stage modules against the whole model.

        ``mode="halves"`` runs, for every cut, ``stage_module(0, c)`` then
        ``stage_module(c, B)`` (one forward pass per cut). ``mode="blocks"`` runs the B
        single-block stage modules one after another (one forward pass in all): every half is
        node for node the composition of its blocks, so this checks every cut's crossing
        tensors at once, though it cannot tell which cut fails.

        A comparison passes when ``|split - whole| <= rtol * (|whole| + max|whole|)``
        elementwise: the relative tolerance, values near zero judged against the output's scale.

        Raises:
            UsageError: unknown mode.
        """
        import torch

        if mode not in ("halves", "blocks"):
            raise UsageError(f"unknown verification mode {mode!r}; choose halves or blocks")
        with torch.no_grad():
            whole = _as_tensor_tuple(self.model(*self.example_inputs), self.name)
            scale = max(float(t.abs().max()) for t in whole)
            if mode == "blocks":
                out = self.example_inputs
                for i in range(self.n_blocks):
                    out = self.stage_module(i, i + 1)(*out)
                diff, ok = _compare(out, whole, rtol * scale, rtol)
                failed = () if ok else tuple(range(1, self.n_blocks))
                return Verification(ok, diff, failed, ())
            diffs: list[float] = []
            failures: list[int] = []
            for cut in range(1, self.n_blocks):
                head = self.stage_module(0, cut)(*self.example_inputs)
                diff, ok = _compare(
                    self.stage_module(cut, self.n_blocks)(*head), whole, rtol * scale, rtol
                )
                diffs.append(diff)
                if not ok:
                    failures.append(cut)
        return Verification(not failures, max(diffs, default=0.0), tuple(failures), tuple(diffs))

    def describe(self) -> dict[str, Any]:
        """The ``optisplit blocks --json`` object (``verified``/``max_abs_diff`` are null)."""
        return {
            "model": self.name,
            "batch_size": self.batch_size,
            "granularity": self.granularity,
            "input_shape": list(self.input_shape),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "blocks": [b.to_dict() for b in self.blocks],
            "cuts": [c.to_dict() for c in self.cuts],
            "verified": None,
            "max_abs_diff": None,
        }


def _compare(
    out: Sequence[torch.Tensor], whole: Sequence[torch.Tensor], atol: float, rtol: float
) -> tuple[float, bool]:
    """Largest absolute difference, and whether every output is within tolerance."""
    import torch

    diff = max(float((a - b).abs().max()) for a, b in zip(out, whole))
    ok = len(out) == len(whole) and all(
        torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(out, whole)
    )
    return diff, ok


def _as_tensor_tuple(value: Any, name: str) -> tuple[torch.Tensor, ...]:
    import torch

    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise TraceError(f"{name} returns a {type(value).__name__}; only tensors or tuples of tensors")


def _output_values(output: fx.Node, name: str) -> list[fx.Node]:
    from torch import fx

    value = output.args[0]
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (tuple, list)) and all(isinstance(v, fx.Node) for v in value):
        return list(value)
    raise TraceError(f"{name} returns {type(value).__name__}; only tensors or tuples of tensors")


def _tensor_info(node: fx.Node) -> TensorInfo:
    meta = node.meta["tensor_meta"]
    shape = tuple(int(d) for d in meta.shape)
    count = 1
    for d in shape:
        count *= d
    itemsize = _itemsize(meta.dtype)
    return TensorInfo(node.name, shape, str(meta.dtype).removeprefix("torch."), count * itemsize)


def _itemsize(dtype: torch.dtype) -> int:
    import torch

    return int(torch.empty((), dtype=dtype).element_size())


def _total(infos: Sequence[TensorInfo]) -> int:
    return sum(t.bytes for t in infos)


def trace(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    granularity: str = "coarse",
    name: str = "model",
) -> Chain:
    """Trace ``model`` into a :class:`Chain` (the model is put in eval mode).

    Raises:
        UsageError: unknown granularity.
        TraceError: the model cannot be traced; the message names the op that stops it.
    """
    import torch
    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp

    if granularity not in GRANULARITIES:
        raise UsageError(
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
        )
    model.eval()
    tracer = _blocks.BlockTracer.make(model, granularity)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise TraceError(f"cannot trace {name}: {_trace_failure(exc)}") from exc
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise TraceError(f"cannot run the traced {name}: {_trace_failure(exc)}") from exc
    return Chain(gm, model, tuple(example_inputs), name=name, granularity=granularity)


def _trace_failure(exc: BaseException) -> str:
    """The error and the innermost line of model code that raised it (the op that stops it)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/torch/" not in f.filename and "/optisplit/" not in f.filename
    ]
    if frames:
        f = frames[-1]
        return f"{message} (at {f.filename}:{f.lineno}: {(f.line or '').strip()})"
    return message


def load_chain(
    model: str,
    *,
    batch_size: int = 1,
    granularity: str = "coarse",
    module: str | None = None,
    weights: str | None = None,
    seed: int = 0,
) -> Chain:
    """Build a zoo (or user) model and trace it at ``batch_size``.

    Raises:
        ModelError: unknown model or bad factory/weights; UsageError: bad batch size or
        granularity; TraceError: the model cannot be traced.
    """
    from optisplit.zoo import build_model, example_input

    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if granularity not in GRANULARITIES:
        raise UsageError(
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
        )
    net = build_model(model, weights=weights, seed=seed, module=module)
    inputs = (example_input(model, batch_size, module=module),)
    return trace(net, inputs, granularity=granularity, name=model)
