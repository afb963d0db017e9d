"""The model zoo contract, tested for every registered model."""

from __future__ import annotations

import pytest
import torch

from cohort.models import create_model, list_models, model_block_info

SHAPES = [(1, 28, 28), (3, 32, 32)]

# AMLN paper, Table 1 (millions of parameters, 100 classes)
PAPER_PARAMETERS = {
    "wrn_40_2": 2.27,
    "wrn_16_2": 0.72,
    "resnet110": 1.74,
    "resnet32": 0.48,
    "wrn_40_1": 0.57,
    "wrn_16_1": 0.18,
    "resnet56": 0.86,
    "resnet20": 0.28,
}


def test_zoo_lists_the_promised_models():
    expected = {
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "wrn_16_1",
        "wrn_16_2",
        "wrn_40_1",
        "wrn_40_2",
        "wrn_28_10",
        "resnet18",
        "resnet34",
    }
    assert expected <= set(list_models())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_and_blocks_match_block_info(name, shape):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=shape[0])
    x = torch.randn(2, *shape)
    output = model(x)
    assert output.logits.shape == (2, 7)
    assert model.block_info == model_block_info(name)  # static info agrees with the instance
    assert len(output.blocks) == len(model.block_info)
    for block, info in zip(output.blocks, model.block_info):
        side = info.spatial_size(shape[1])
        assert block.shape == (2, info.channels, side, side)
    assert output.pooled.shape[0] == 2
    (output.logits.sum() + sum(b.mean() for b in output.blocks)).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_cifar_nets_have_three_blocks_torchvision_four(name):
    expected = 4 if name in ("resnet18", "resnet34") else 3
    assert len(model_block_info(name)) == expected


@pytest.mark.parametrize("name,millions", sorted(PAPER_PARAMETERS.items()))
def test_parameter_counts_match_amln_table_1(name, millions):
    model = create_model(name, num_classes=100, in_channels=3)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.03)


def test_unknown_model_suggests_a_name():
    with pytest.raises(KeyError, match="did you mean 'resnet20'"):
        create_model("resnet200", 10, 3)


def test_models_record_their_architecture():
    assert create_model("wrn_16_2", 10, 1).arch == "wrn_16_2"
