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
import operator
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
_MIN_ENCODER_LAYERS = 4


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


class _BlockTracer:
    """Builds the fx tracer whose leaves are the coarse units (or torch's defaults at fine)."""

    @staticmethod
    def make(model: torch.nn.Module, granularity: str) -> fx.Tracer:
        from torch import fx

        units = coarse_units(model) if granularity == "coarse" else set()

        class Tracer(fx.Tracer):  # type: ignore[misc]
            def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
                return module_qualified_name in units or super().is_leaf_module(
                    m, module_qualified_name
                )

        return Tracer()


def coarse_units(model: torch.nn.Module) -> set[str]:
    """Qualified names of the modules that are single blocks at coarse granularity."""
    units: set[str] = set()

    def visit(module: torch.nn.Module, prefix: str, top: bool) -> None:
        for name, child in module.named_children():
            qualified = f"{prefix}{name}"
            if (
                _is_plain_container(child)
                or _is_stage_of_blocks(child)
                or (top and _holds_layer_stack(child))
            ):
                visit(child, qualified + ".", top=False)
            else:
                units.add(qualified)

    visit(model, "", top=True)
    return units


def _is_plain_container(module: torch.nn.Module) -> bool:
    import torch

    return type(module) in (torch.nn.Sequential, torch.nn.ModuleList)


def _is_stage_of_blocks(module: torch.nn.Module) -> bool:
    """A ``Sequential`` subclass that only chains blocks (RegNet's ``AnyStage``), unlike
    ``Conv2dNormActivation``, whose children are single layers."""
    import torch

    children = list(module.children())
    return (
        isinstance(module, torch.nn.Sequential)
        and type(module).forward is torch.nn.Sequential.forward
        and bool(children)
        and all(any(True for _ in c.children()) for c in children)
    )


def _holds_layer_stack(module: torch.nn.Module) -> bool:
    for child in module.children():
        if _is_plain_container(child):
            deep = [c for c in child.children() if any(True for _ in c.children())]
            if len(deep) >= _MIN_ENCODER_LAYERS:
                return True
    return False


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
        self._block_nodes = _group(graph_module, nodes)
        self._crossing = _crossing_values(self._block_nodes, self._inputs, self._output_values)
        self.n_blocks = len(self._block_nodes)
        names = _unique([_block_name(ns) for ns in self._block_nodes])
        self.blocks = [
            BlockInfo(i, names[i], _param_bytes(graph_module, ns))
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


def _is_tensor(node: fx.Node) -> bool:
    from torch.fx.passes.shape_prop import TensorMetadata

    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


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


def _group(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """Group compute nodes into blocks: a new block starts at every boundary that is a cut."""
    compute = [n for n in nodes if n.op in ("call_module", "call_function", "call_method")]
    if not compute:
        raise TraceError("the model has no operations to split")
    position = {n: i for i, n in enumerate(compute)}
    last_use = {
        n: max((position.get(u, len(compute)) for u in n.users), default=-1) for n in nodes
    }
    blocks: list[list[fx.Node]] = [[compute[0]]]
    live = {n for n in nodes if n.op == "placeholder" and last_use[n] >= 1}
    for i, node in enumerate(compute[1:], start=1):
        prev = compute[i - 1]
        if last_use[prev] >= i:
            live.add(prev)
        live = {n for n in live if last_use[n] >= i}
        if all(_is_tensor(n) for n in live):
            blocks.append([node])
        else:
            blocks[-1].append(node)
    return blocks


def _crossing_values(
    blocks: list[list[fx.Node]], inputs: list[fx.Node], outputs: list[fx.Node]
) -> list[list[fx.Node]]:
    """For every cut 0..B, the values defined before it and needed after it, in graph order."""
    n_blocks = len(blocks)
    block_of: dict[fx.Node, int] = {n: b for b, ns in enumerate(blocks) for n in ns}
    for node in inputs:
        block_of[node] = -1
    needed_until: dict[fx.Node, int] = {}
    for b, ns in enumerate(blocks):
        for node in ns:
            for dep in node.all_input_nodes:
                if dep in block_of:
                    needed_until[dep] = max(needed_until.get(dep, -1), b)
    for node in outputs:
        needed_until[node] = n_blocks
    order = [*inputs, *(n for ns in blocks for n in ns)]
    crossing: list[list[fx.Node]] = [list(inputs)]
    for cut in range(1, n_blocks):
        crossing.append([n for n in order if block_of[n] < cut <= needed_until.get(n, -1)])
    crossing.append(list(outputs))
    return crossing


def _block_name(nodes: list[fx.Node]) -> str:
    """The first module the block calls; else its first operation, qualified by its scope."""
    node = next((n for n in nodes if n.op == "call_module"), nodes[0])
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack.values()))[0] if stack else ""
    return f"{scope}.{node.name}" if scope else node.name


def _unique(names: list[str]) -> list[str]:
    """A module called again is named ``name@1``, ``name@2`` (as in fx's module stacks)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(f"{name}@{count}" if count else name)
    return out


def _param_bytes(gm: fx.GraphModule, nodes: list[fx.Node]) -> int:
    import torch

    seen: dict[int, int] = {}
    for node in nodes:
        tensors: list[Any] = []
        if node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            tensors = [*sub.parameters(), *sub.buffers()]
        for dep in node.all_input_nodes:
            if dep.op == "get_attr":
                tensors.append(operator.attrgetter(str(dep.target))(gm))
        for t in tensors:
            if isinstance(t, torch.Tensor):
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


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
    tracer = _BlockTracer.make(model, granularity)
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
