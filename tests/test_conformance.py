"""The model reproduces the authors' release on their conformance vector (spec section 5)."""

import numpy as np
import pytest
import torch

MAX_ARGMAX_DIFFERENCES = 5  # "at most a handful of pixels"
LOGIT_TOLERANCE = 1e-4


@pytest.mark.parametrize("case", [0, 1])
def test_each_image_alone_matches_release(official, official_model, case):
    gate = float(official["gates"][case])
    tau = float(official["neg_thresh"])
    for i in range(2):
        with torch.inference_mode():
            out = official_model(
                torch.from_numpy(official["input"][i : i + 1]), token_threshold=tau, gate=gate
            )
        logits = out.logits[0].numpy()
        differing = int((logits.argmax(0) != official[f"argmax_{case}"][i]).sum())
        assert differing <= MAX_ARGMAX_DIFFERENCES
        np.testing.assert_allclose(
            logits[:, ::4, ::4], official[f"logits_strided_{case}"][i], atol=LOGIT_TOLERANCE, rtol=0
        )
        np.testing.assert_allclose(
            out.token_logits[0].numpy(), official[f"sx_{case}"][i], atol=LOGIT_TOLERANCE, rtol=0
        )


@pytest.mark.parametrize("case", [0, 1])
def test_batch_matches_release_and_single_images(official, official_model, case):
    gate = float(official["gates"][case])
    x = torch.from_numpy(official["input"])
    with torch.inference_mode():
        batch = official_model(x, token_threshold=0.9, gate=gate)
        singles = [official_model(x[i : i + 1], token_threshold=0.9, gate=gate) for i in range(2)]
    kept = batch.keep.sum(dim=1).tolist()
    assert kept[0] != kept[1], "the two images must have different keep masks for this test"
    for i in range(2):
        assert torch.equal(batch.keep[i], singles[i].keep[0])
        np.testing.assert_allclose(
            batch.logits[i].numpy(), singles[i].logits[0].numpy(), atol=LOGIT_TOLERANCE, rtol=0
        )
        np.testing.assert_allclose(
            batch.logits[i, :, ::4, ::4].numpy(),
            official[f"logits_strided_{case}"][i],
            atol=LOGIT_TOLERANCE,
            rtol=0,
        )


def test_about_half_of_first_image_is_pruned(official, official_model):
    """The vector's weights were tuned so; if this fails the keep rule is wrong."""
    with torch.inference_mode():
        out = official_model(torch.from_numpy(official["input"][:1]), token_threshold=0.9)
    assert 0.3 < out.keep.float().mean().item() < 0.7


def test_parameter_count_matches_spec(official_model):
    assert sum(p.numel() for p in official_model.parameters()) == 2_639_359


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(official, official_state_dict):
    from napari_apformer.model import load_model

    x = torch.from_numpy(official["input"])
    cpu, gpu = load_model(official_state_dict), load_model(official_state_dict, device="cuda")
    with torch.inference_mode():
        a = cpu(x, token_threshold=0.9, gate=-2.0).logits
        b = gpu(x.cuda(), token_threshold=0.9, gate=-2.0).logits.cpu()
    assert (a.argmax(1) != b.argmax(1)).sum() <= MAX_ARGMAX_DIFFERENCES
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-3, rtol=0)
