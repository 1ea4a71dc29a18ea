"""Grouping a traced fx graph into blocks: coarse units, legal cuts, crossing values, names.

The private half of :mod:`optisplit.chain` (see there for the rules); pure graph bookkeeping.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from optisplit.errors import TraceError

if TYPE_CHECKING:
    import torch
    from torch import fx

_MIN_ENCODER_LAYERS = 4


class BlockTracer:
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


def _is_tensor(node: fx.Node) -> bool:
    from torch.fx.passes.shape_prop import TensorMetadata

    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def group(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[list[fx.Node]]:
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


def crossing_values(
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


def block_name(nodes: list[fx.Node]) -> str:
    """The first module the block calls; else its first operation, qualified by its scope."""
    node = next((n for n in nodes if n.op == "call_module"), nodes[0])
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack.values()))[0] if stack else ""
    return f"{scope}.{node.name}" if scope else node.name


def unique(names: list[str]) -> list[str]:
    """A module called again is named ``name@1``, ``name@2`` (as in fx's module stacks)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(f"{name}@{count}" if count else name)
    return out


def param_bytes(gm: fx.GraphModule, nodes: list[fx.Node]) -> int:
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
