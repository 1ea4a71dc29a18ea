"""The model zoo: names, input sizes, deterministic seeded builds, weights files, user factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from optisplit.errors import ModelError, UsageError
from optisplit.zoo import build_model, example_input, input_size, list_models

PAPER_MODELS = ("alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "inception_v3")


def test_lists_every_torchvision_classifier() -> None:
    import torchvision

    names = list_models()
    assert names == sorted(torchvision.models.list_models(module=torchvision.models))
    assert set(PAPER_MODELS) <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names  # detection models are not classifiers


def test_input_sizes() -> None:
    assert input_size("inception_v3") == 299
    assert input_size("resnet18") == 224
    assert input_size("vit_h_14") == 224  # built for 224, although its default weights use 518
    assert input_size("efficientnet_b3") == 300


def test_unknown_model_suggests_close_matches() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'resnt18'; did you mean resnet18"):
        build_model("resnt18")
    with pytest.raises(ModelError, match="see 'optisplit models'"):
        input_size("zzzz")


def test_seeded_builds_are_identical_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("squeezenet1_1", seed=7)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = build_model("squeezenet1_1", seed=7)
    c = build_model("squeezenet1_1", seed=8)
    assert not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_weights_file(tmp_path: Path) -> None:
    source = build_model("squeezenet1_1", seed=3)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = build_model("squeezenet1_1", seed=0, weights=str(path))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(ModelError, match="weights file not found: .*nope.pt .*never downloads"):
        build_model("squeezenet1_1", weights=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelError, match="does not fit alexnet"):
        build_model("alexnet", weights=str(path))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights file .*garbage.pt"):
        build_model("squeezenet1_1", weights=str(garbage))


def test_user_factory() -> None:
    model = build_model("tiny", module="tests.models:tiny_cnn", seed=1)
    again = build_model("tiny", module="tests.models:tiny_cnn", seed=1)
    assert type(model).__name__ == "TinyCNN" and not model.training
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    x = example_input("tiny", 5, module="tests.models:tiny_cnn")
    assert x.shape == (5, 3, 16, 16)
    assert model(x).shape == (5, 10)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must be 'package.module:function'"),
        ("tests.nonexistent_mod:f", "cannot import module 'tests.nonexistent_mod'"),
        ("tests.models:missing", "has no callable 'missing'"),
        ("tests.models:synthetic_profile", "model factory tests.models:synthetic_profile failed"),
    ],
)
def test_bad_factories(spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model("x", module=spec)


def test_example_input_is_deterministic() -> None:
    a = example_input("inception_v3", 2)
    assert a.shape == (2, 3, 299, 299)
    assert torch.equal(a, example_input("inception_v3", 2))
    with pytest.raises(UsageError, match="batch size must be at least 1, got 0"):
        example_input("resnet18", 0)
