"""The training losses of the spec on inputs whose value is known."""

import math

import pytest
import torch

from napari_apformer.model import build_model
from napari_apformer.model.apformer.losses import (
    segmentation_loss,
    ssa_loss,
    token_target,
    training_loss,
)


def test_ssa_loss_on_known_attention():
    n = 16
    identity = torch.eye(n)[None, None]  # sharp (entropy 0) and symmetric
    assert ssa_loss([identity]).item() == pytest.approx(0.8 * 0.1)  # symmetry clamps at 0.1
    uniform = torch.full((1, 1, n, n), 1 / n)  # entropy 1, symmetric
    assert ssa_loss([uniform]).item() == pytest.approx(0.8 * 0.1 + 0.2 * 10 * 0.1, rel=1e-5)
    shifted = torch.roll(torch.eye(n), 1, dims=1)[None, None]  # sharp, far from symmetric
    expected_sym = n - 0.5  # smooth L1 on entries of size n at 2n of n*n places
    assert ssa_loss([shifted]).item() == pytest.approx(0.8 * expected_sym * 2 * n / n**2, rel=1e-5)
    assert ssa_loss([identity, uniform]).item() == pytest.approx(
        (ssa_loss([identity]) + ssa_loss([uniform])).item() / 2
    )


def test_segmentation_loss_is_low_for_a_confident_correct_prediction():
    target = torch.randint(0, 3, (2, 8, 8))
    good = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 20
    bad = good.roll(1, dims=1)
    assert segmentation_loss(good, target) < 0.01 < 1.0 < segmentation_loss(bad, target)


def test_token_target_marks_blocks_with_any_foreground():
    target = torch.zeros(1, 256, 256, dtype=torch.long)
    target[0, 9, 17] = 2
    tokens = token_target(target)
    assert tokens.shape == (1, 32, 32) and tokens.sum() == 1 and tokens[0, 1, 2] == 1


def test_training_loss_backpropagates():
    """On a small APFormer: the full one's SSA maps take gigabytes of autograd memory."""
    torch.manual_seed(0)
    layers = [{"heads": 2, "dim_head": 8, "mlp": 16, "scale": 8**-0.5}] * 2
    sizes = {"input_size": 64, "widths": [4, 8, 8, 16], "layers": layers}
    random_model = build_model("apformer", 1, 4, sizes=sizes).train()
    x = torch.rand(1, 1, 64, 64)
    target = torch.randint(0, 4, (1, 64, 64))
    out = random_model(x, token_threshold=1.0, content_attention=True)
    losses = training_loss(out, target)
    assert set(losses) == {"total", "segmentation", "ssa", "head"}
    total = 0.8 * losses["segmentation"] + 0.1 * losses["ssa"] + 0.1 * losses["head"]
    assert losses["total"].item() == pytest.approx(total.item())
    losses["total"].backward()
    assert random_model.inc.double_conv[0].weight.grad.abs().sum() > 0
    assert random_model.trans4.pred_class.weight.grad.abs().sum() > 0
    qkv = random_model.trans4.attention_layers[0].to_qkv.weight.grad
    assert qkv is not None and math.isfinite(qkv.abs().sum().item())


@pytest.mark.slow
def test_training_loss_needs_content_attention(random_model):
    with torch.inference_mode():
        out = random_model(torch.rand(1, 1, 256, 256))
    with pytest.raises(ValueError, match="content_attention"):
        training_loss(out, torch.zeros(1, 256, 256, dtype=torch.long))
