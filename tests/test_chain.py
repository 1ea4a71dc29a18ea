"""Tracing into chains: cut points, crossing tensors, stage modules, verification, errors."""

from __future__ import annotations

import time

import pytest
import torch

from optisplit.chain import Chain, load_chain, trace
from optisplit.errors import TraceError, UsageError
from tests.models import tiny_cnn, tiny_residual, untraceable


def _chain(factory: object = tiny_residual, granularity: str = "coarse") -> Chain:
    model, x = factory()  # type: ignore[operator]
    return trace(model, (x,), granularity=granularity, name="tiny")


def test_coarse_blocks_and_cuts() -> None:
    chain = _chain()
    assert [b.name for b in chain.blocks] == [
        "stem",
        "layers.0",
        "layers.1",
        "pool",
        "flatten",
        "fc",
    ]
    assert chain.n_blocks == 6 and chain.batch_size == 2
    assert [c.index for c in chain.cuts] == [1, 2, 3, 4, 5]
    assert [c.name for c in chain.cuts] == ["layers.0", "layers.1", "pool", "flatten", "fc"]
    cut = chain.cuts[0]
    assert len(cut.tensors) == 1 and cut.tensors[0].shape == (2, 8, 16, 16)
    assert cut.bytes == 2 * 8 * 16 * 16 * 4 and cut.tensors[0].dtype == "float32"
    assert chain.input_bytes == 2 * 3 * 16 * 16 * 4 and chain.output_bytes == 2 * 10 * 4
    assert chain.blocks[1].param_bytes == (2 * 8 * 8 * 9 + 4 * 8 * 2) * 4 + 2 * 8
    assert chain.cut_tensors(0)[0].bytes == chain.input_bytes
    assert chain.cut_tensors(6)[0].bytes == chain.output_bytes


def test_fine_cuts_inside_a_residual_carry_both_branches() -> None:
    chain = _chain(granularity="fine")
    names = [b.name for b in chain.blocks]
    assert names[:4] == ["stem", "layers.0.conv1", "layers.0.bn1", "layers.0.relu"]
    assert "layers.0.relu@1" in names
    inside = chain.cuts[names.index("layers.0.bn1") - 1]
    assert len(inside.tensors) == 2
    assert inside.bytes == sum(t.bytes for t in inside.tensors) == 2 * 2 * 8 * 16 * 16 * 4
    assert chain.verify().ok


@pytest.mark.parametrize("granularity", ["coarse", "fine"])
def test_stage_modules_compose_to_the_model(granularity: str) -> None:
    model, x = tiny_residual()
    chain = trace(model, (x,), granularity=granularity, name="tiny")
    with torch.no_grad():
        whole = model(x)
        for start, end in [(0, 2), (0, chain.n_blocks), (3, chain.n_blocks)]:
            stage = chain.stage_module(start, end)
            args = (x,) if start == 0 else chain.stage_module(0, start)(x)
            out = stage(*args)
            assert isinstance(out, tuple)
            if end == chain.n_blocks:
                assert len(out) == 1 and torch.equal(out[0], whole)
            else:
                assert [tuple(t.shape) for t in out] == [t.shape for t in chain.cut_tensors(end)]


def test_stage_module_shares_parameters() -> None:
    model, x = tiny_cnn()
    chain = trace(model, (x,), name="tiny")
    stage = chain.stage_module(0, 1)
    pointers = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in stage.parameters()} <= pointers
    assert (
        0 < sum(p.numel() for p in stage.parameters()) < sum(p.numel() for p in model.parameters())
    )


def test_out_of_range() -> None:
    chain = _chain()
    with pytest.raises(UsageError, match=r"block range \[4:9\] is out of range for tiny"):
        chain.stage_module(4, 9)
    with pytest.raises(UsageError, match="cut 7 is out of range for tiny"):
        chain.cut_tensors(7)
    with pytest.raises(UsageError, match="unknown granularity 'medium'"):
        _chain(granularity="medium")


class _Drifted(torch.nn.Module):
    """The model with its output nudged: every stitched split now differs from it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1.001


def test_verify_reports_a_broken_cut() -> None:
    chain = _chain(tiny_cnn)
    result = chain.verify()
    assert result.ok and result.max_abs_diff == 0.0
    assert len(result.cut_diffs) == chain.n_blocks - 1
    chain.model = _Drifted(chain.model)
    result = chain.verify()
    assert not result.ok and result.max_abs_diff > 0
    assert result.failed_cuts == tuple(range(1, chain.n_blocks))
    assert not chain.verify(mode="blocks").ok
    chain.model = chain.model.inner  # type: ignore[assignment]
    fast = chain.verify(mode="blocks")
    assert fast.ok and fast.max_abs_diff == 0.0 and fast.cut_diffs == ()
    with pytest.raises(UsageError, match="unknown verification mode 'all'"):
        chain.verify(mode="all")


def test_untraceable_names_the_line() -> None:
    with pytest.raises(TraceError, match=r"cannot trace tiny: .*control flow .*models.py:\d+"):
        _chain(untraceable)


def test_resnet18_coarse_is_fast_and_has_every_residual_block() -> None:
    load_chain("resnet18")  # warm the imports
    start = time.perf_counter()
    chain = load_chain("resnet18", batch_size=2)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, elapsed  # about 0.2 s on an idle machine; CI shares its cores
    names = [c.name for c in chain.cuts]
    for block in ["layer1.0", "layer1.1", "layer2.0", "layer4.1", "fc"]:
        assert block in names
    assert chain.cuts[names.index("layer2.0")].bytes == 2 * 64 * 56 * 56 * 4


PAPER_CUTS = {
    "alexnet": [f"features.{k}" for k in range(1, 13)],
    "vgg16": [f"features.{k}" for k in range(1, 31)],
    "mobilenet_v2": [f"features.{k}" for k in range(1, 19)],
    "resnet18": [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["avgpool"],
    "resnet50": [f"layer{i}.{j}" for i, n in [(1, 3), (2, 4), (3, 6), (4, 3)] for j in range(n)],
    "inception_v3": ["Conv2d_2a_3x3", "maxpool1", "Mixed_5b", "Mixed_6a", "Mixed_7c", "avgpool"],
}


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(PAPER_CUTS))
def test_paper_models_contain_the_paper_cuts_and_verify(model: str) -> None:
    chain = load_chain(model)
    names = {c.name for c in chain.cuts}
    missing = [c for c in PAPER_CUTS[model] if c not in names]
    assert not missing
    assert all(len(c.tensors) == 1 for c in chain.cuts)
    result = chain.verify()
    assert result.ok, result.failed_cuts
