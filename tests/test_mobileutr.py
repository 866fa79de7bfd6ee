"""MobileUtr: conformance with the release (spec section 8), its checkpoints, input checks,
FLOPs, and query-point attention of both bottleneck stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_apformer.engine.inference import Segmenter
from napari_apformer.errors import InputError
from napari_apformer.model.base import CachedSplit, QueryAttention, build_model
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import load_model, save_weights
from napari_apformer.model.mobileutr import MobileUtr
from napari_apformer.model.mobileutr.blocks import DropPath
from napari_apformer.model.mobileutr.release import fold_grey_stem

DATA = Path(__file__).parent / "data"
FULL_VECTOR = Path(__file__).parents[2] / "shared/vectors/mobileutr_c1k4_seed0.npz"
ATOL, RTOL = 1e-3, 1e-4  # the spec's tolerance: |dlogit| <= ATOL + RTOL |logit|
STEM = "patch_embeddings.stem.0.weight"


@pytest.fixture(scope="module")
def vector() -> dict[str, np.ndarray]:
    """The trimmed conformance vector (see tests/data/README.md)."""
    with np.load(DATA / "mobileutr_c1k4_seed0_trimmed.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def release_state(vector) -> dict[str, torch.Tensor]:
    """The release's state_dict as it saves it: a 3-channel stem, lklgl_bottleneck names."""
    return {k[3:]: torch.from_numpy(v) for k, v in vector.items() if k.startswith("sd/")}


@pytest.fixture(scope="module")
def grey_logits(vector, release_state) -> torch.Tensor:
    """Our logits of the vector's grey input with the folded 1-channel stem."""
    state = {**release_state, STEM: torch.from_numpy(vector[f"fold1ch/{STEM}"])}
    model = load_model(state)
    assert (model.in_channels, model.n_classes, model.variant) == (1, 4, "default")
    with torch.inference_mode():
        return model.predict(torch.from_numpy(vector["input"])).logits


def assert_conforms(ours: torch.Tensor, reference: np.ndarray) -> float:
    """Max |dlogit| over the tolerance; fails where a logit is outside it."""
    reference_t = torch.from_numpy(reference)
    excess = (ours - reference_t).abs() - (ATOL + RTOL * reference_t.abs())
    assert excess.max() <= 0, f"worst logit off by {excess.max() + ATOL:.2e} beyond tolerance"
    return float((ours - reference_t).abs().max())


def assert_labels_agree(logits: torch.Tensor, reference: np.ndarray, margin: float = 1e-3) -> None:
    """Labels equal the release's wherever the top two logits differ by more than `margin`
    (ten times the float noise the conformance allows); a near-tie may go either way with the
    CPU's summation order; near-ties stay rare."""
    top2 = logits.topk(2, dim=1).values
    decided = ((top2[:, 0] - top2[:, 1]) > margin).numpy()
    ours = logits.argmax(1).numpy()
    assert np.array_equal(ours[decided], reference[decided])
    assert (~decided).sum() <= 0.01 * decided.size  # 0.25 % here (random weights)


@pytest.mark.slow
def test_the_release_state_dict_loads_unchanged_and_matches_its_logits(vector, release_state):
    model = load_model(release_state)
    assert model.family == "mobileutr" and model.architecture()["sizes"]["heads"] == 4
    assert model.in_channels == 3  # taken literally: the release's stem is 3-channel
    x = torch.from_numpy(vector["input"]).repeat(1, 3, 1, 1)  # what the release's forward does
    with torch.inference_mode():
        logits = model.predict(x).logits
    assert_conforms(logits[..., ::2, ::2], vector["logits_strided"])
    assert_labels_agree(logits, vector["argmax"])


@pytest.mark.slow
def test_a_grey_model_with_the_folded_stem_matches_the_release(vector, grey_logits):
    worst = assert_conforms(grey_logits[..., ::2, ::2], vector["logits_strided"])
    assert worst < 2e-4  # the spec measured 7e-5: float noise of the sum over channels
    assert_labels_agree(grey_logits, vector["argmax"])


@pytest.mark.skipif(not FULL_VECTOR.is_file(), reason="the shared vector is not on this clone")
def test_every_logit_of_the_shared_vector(grey_logits):
    with np.load(FULL_VECTOR) as z:
        assert_conforms(grey_logits, z["logits"])


def test_folding_the_stem_gives_the_vectors_grey_stem(vector, release_state):
    folded = fold_grey_stem(release_state)[STEM]
    np.testing.assert_allclose(folded.numpy(), vector[f"fold1ch/{STEM}"], atol=1e-6)


def test_the_first_releases_prefix_and_a_state_dict_wrapper_load(release_state, tmp_path):
    renamed = {
        k.replace("lklgl_bottleneck.", "adaptive_lgl_bottleneck."): v
        for k, v in release_state.items()
    }
    assert not any(k.startswith("lklgl") for k in renamed)
    path = tmp_path / "checkpoint_best.pth"  # U-Bench: {"state_dict": ..., ...}
    torch.save({"state_dict": renamed, "epoch": torch.tensor(300)}, path)
    model = load_model(path)
    reference = load_model(release_state)
    for (key, ours), (_, theirs) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), key


def test_the_l_variant_and_the_class_count_come_from_the_tensors():
    torch.manual_seed(0)
    model = build_model("mobileutr", 2, 7, "L")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_model(state)
    assert loaded.variant == "L" and loaded.architecture() == model.architecture()
    assert (loaded.in_channels, loaded.n_classes, loaded.heads) == (2, 7, 8)
    params = sum(p.numel() for p in loaded.parameters())
    assert params == 6_209_316 - 288 + 3 * 33  # the release's L with 2 stem channels, 7 classes


def test_parameter_counts_are_the_releases():
    counts = {
        (variant, channels): sum(
            p.numel() for p in build_model("mobileutr", channels, 4, variant).parameters()
        )
        for variant in ("default", "L")
        for channels in (1, 3)
    }
    assert counts == {
        ("default", 1): 1_390_068,
        ("default", 3): 1_390_356,
        ("L", 1): 6_208_740,
        ("L", 3): 6_209_316,
    }


def test_batch_equals_single_images():
    torch.manual_seed(1)
    model = build_model("mobileutr", 1, 3, sizes={"depths": [1, 1, 1, 2, 2]}).eval()
    x = torch.rand(3, 1, 64, 48)
    with torch.inference_mode():
        batch = model.predict(x, want_attention=True)
        singles = [model.predict(x[i : i + 1], want_attention=True) for i in range(3)]
        together = model(x)  # one batched pass, no image-by-image split
    for i, single in enumerate(singles):
        assert torch.equal(batch.logits[i], single.logits[0])
        assert torch.equal(batch.flops[i], single.flops[0])
        for a, b in zip(batch.attention[i], single.attention[0], strict=True):
            assert torch.equal(a, b)
    torch.testing.assert_close(together, batch.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(248, 256), (256, 200), (8, 8)])
def test_sizes_not_a_multiple_of_16_are_refused_with_the_size(height, width):
    model = build_model("mobileutr", 1, 2).eval()
    with pytest.raises(InputError, match=f"multiples of 16, got {height} x {width}"):
        model.predict(torch.zeros(1, 1, height, width))
    with pytest.raises(InputError, match=f"got {height} x {width}"):
        model(torch.zeros(1, 1, height, width))


def test_the_channel_count_is_taken_literally():
    model = build_model("mobileutr", 1, 2).eval()
    with pytest.raises(InputError, match=r"\(B, 1, H, W\), got \(1, 3, 32, 32\)"):
        model.predict(torch.zeros(1, 3, 32, 32))  # no hidden 1 <-> 3 replication
    with torch.inference_mode():
        out = build_model("mobileutr", 5, 2).eval().predict(torch.zeros(1, 5, 32, 32))
    assert out.logits.shape == (1, 2, 32, 32)


@pytest.mark.parametrize(
    ("variant", "height", "width"), [("default", 48, 80), ("L", 64, 32), ("L", 96, 96)]
)
def test_counted_flops_equal_torch_flop_counter(variant, height, width):
    model = build_model("mobileutr", 1, 4, variant).eval()
    x = torch.rand(1, 1, height, width)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        out = model.predict(x)
    assert int(out.flops[0]) == counter.get_total_flops() == model.reference_flops(height, width)


def test_gflops_at_256_are_the_specs():
    """Spec section 4 (FlopCounterMode on the release, 3-channel stem, 4 classes)."""
    for variant, gflops in (("default", 6.50), ("L", 24.90)):
        model = build_model("mobileutr", 3, 4, variant)
        assert round(model.reference_flops(256, 256) / 1e9, 2) == gflops


def test_large_inputs_attend_in_chunks(monkeypatch):
    """Attention in chunks of queries gives the same logits and the same counted FLOPs."""
    from napari_apformer.model.mobileutr import blocks

    torch.manual_seed(2)
    model = build_model("mobileutr", 1, 2, sizes={"depths": [1, 1, 1, 1, 1]}).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        whole = model.predict(x).logits
        # the transformer stage's 64 queries in chunks of 20 (4 heads x 64 keys x 20)
        monkeypatch.setattr(blocks, "SCORES_PER_CHUNK", 4 * 64 * 20)
        with FlopCounterMode(display=False) as counter:
            chunked = model.predict(x)
    torch.testing.assert_close(chunked.logits, whole, atol=1e-5, rtol=1e-5)
    assert int(chunked.flops[0]) == counter.get_total_flops()


def test_the_fused_attention_kernel_gives_the_same_logits(monkeypatch):
    """Off the CPU attention runs in torch's fused kernel: the same logits."""
    from napari_apformer.model.mobileutr import blocks

    torch.manual_seed(8)
    model = build_model("mobileutr", 1, 2, sizes={"depths": [1, 1, 1, 1, 1]}).eval()
    x = torch.rand(2, 1, 64, 80)
    explicit = blocks.multi_head_attention
    with torch.inference_mode():
        reference = model(x)
        monkeypatch.setattr(
            blocks, "multi_head_attention", lambda *args: explicit(*args, fused=True)
        )
        fused = model(x)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


# -- bad checkpoints -------------------------------------------------------------------------


def _one_line_error(state_or_path) -> str:
    with pytest.raises(InputError) as caught:
        load_model(state_or_path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_missing_lgl_stage_is_named(release_state):
    for prefix in ("lklgl_bottleneck.", "transformer_bottleneck."):
        state = {k: v for k, v in release_state.items() if not k.startswith(prefix)}
        message = _one_line_error(state)
        assert message.startswith("state_dict: ") and prefix[:-1] in message


def test_a_missing_decoder_stage_is_named(release_state, tmp_path):
    state = {k: v for k, v in release_state.items() if not k.startswith("Up_conv3.")}
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    message = _one_line_error(path)
    assert message.startswith(str(path)) and "missing" in message and "Up_conv3." in message


def test_a_tensor_of_the_wrong_shape_is_named(release_state):
    state = dict(release_state)
    key = "transformer_bottleneck.1.SelfAttn.attn.qkv.weight"
    state[key] = torch.zeros(100, 128)
    message = _one_line_error(state)
    assert f"wrong shape for {key}: (100, 128), expected (384, 128)" in message


def test_widths_that_fit_no_variant_need_a_card(tmp_path):
    torch.manual_seed(3)
    sizes = {"dims": [8, 16, 32, 64], "heads": 2}
    model = build_model("mobileutr", 1, 3, sizes=sizes).eval()
    message = _one_line_error({k: v.clone() for k, v in model.state_dict().items()})
    assert "widths 8, 16, 32, 64 fit no variant" in message and "model card" in message
    save_weights(model, ModelCard.generic("narrow", 1, 3), tmp_path / "narrow")
    loaded = load_model(tmp_path / "narrow.safetensors")  # the card records the head count
    assert loaded.heads == 2 and loaded.architecture() == model.architecture()


# -- attention -------------------------------------------------------------------------------


def _attention_inputs(model: MobileUtr, x: torch.Tensor) -> list[torch.Tensor]:
    """What each bottleneck layer's qkv projection receives, caught with hooks."""
    seen: list[torch.Tensor] = []
    blocks = [*model.lklgl_bottleneck, *model.transformer_bottleneck]
    hooks = [
        b.SelfAttn.attn.qkv.register_forward_hook(lambda m, i, o: seen.append(i[0][0]))
        for b in blocks
    ]
    try:
        with torch.inference_mode():
            model.predict(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _plain_attention(model: MobileUtr, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """(heads, n, n) softmax(QK^T / sqrt(d)) written out from the qkv weights."""
    blocks = [*model.lklgl_bottleneck, *model.transformer_bottleneck]
    qkv = blocks[layer].SelfAttn.attn.qkv
    width, heads = qkv.in_features, model.heads
    with torch.inference_mode():
        q, k, _ = (tokens @ qkv.weight.T + qkv.bias).split(width, dim=-1)
        q = q.reshape(-1, heads, width // heads).transpose(0, 1)
        k = k.reshape(-1, heads, width // heads).transpose(0, 1)
        return torch.softmax(q @ k.transpose(1, 2) / (width // heads) ** 0.5, dim=-1)


def test_query_attention_of_both_stages():
    torch.manual_seed(4)
    model = build_model("mobileutr", 1, 3, sizes={"depths": [1, 1, 1, 2, 1]}).eval()
    assert isinstance(model, QueryAttention) and not isinstance(model, CachedSplit)
    x = torch.rand(1, 1, 64, 96)
    rows, cols, stride = model.attention_grid(64, 96)
    assert (rows, cols, stride) == (8, 12, 8) and model.attention_shape() == (3, 4)
    with torch.inference_mode():
        state = model.predict(x, want_attention=True).attention[0]
    inputs = _attention_inputs(model, x)
    for r, c in ((0, 0), (3, 5), (7, 11)):
        token = r * cols + c
        with torch.inference_mode():
            after, before = model.query_attention(state, token)
        assert after.shape == (3, 4, rows * cols) and torch.equal(after, before)
        torch.testing.assert_close(after.sum(-1), torch.ones(3, 4))
        # the transformer stage: the query's row over every token
        plain = _plain_attention(model, 2, inputs[2])
        torch.testing.assert_close(after[2], plain[:, token], atol=1e-6, rtol=1e-5)
        # the LGL stage: the row of the sampled token whose 2 x 2 cell holds the query, each
        # key's weight spread over its cell
        for layer in (0, 1):
            plain = _plain_attention(model, layer, inputs[layer])  # (heads, 24, 24)
            query = (r // 2) * (cols // 2) + c // 2
            grid = after[layer].view(4, rows, cols)
            cells = grid.unflatten(1, (rows // 2, 2)).unflatten(3, (cols // 2, 2))
            assert torch.allclose(cells, cells[:, :, :1, :, :1].expand_as(cells))
            torch.testing.assert_close(
                cells.sum((2, 4)).flatten(1), plain[:, query], atol=1e-6, rtol=1e-5
            )
    with pytest.raises(InputError, match="outside the 8 x 12 token grid"):
        model.query_attention(state, rows * cols)


def test_the_engine_shows_mobileutr_attention_on_its_grid():
    torch.manual_seed(5)
    model = build_model("mobileutr", 1, 3, sizes={"depths": [1, 1, 1, 1, 1]}).eval()
    segmenter = Segmenter(model, device="cpu")
    image = np.random.default_rng(0).random((3, 40, 56)).astype(np.float32)
    result = segmenter.segment(segmenter.prepare(image), attention_slices=[1])
    after, before = segmenter.attention(result, 1, token=5)
    assert after.shape == (2, 4, 48 // 8, 64 // 8)  # 40 x 56 pixels padded to 48 x 64
    np.testing.assert_allclose(after.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    assert np.array_equal(after, before)


def test_grey_data_on_a_three_channel_stem_equals_the_folded_model():
    """Why the engine may repeat a grey image for a 3-channel model: the folded 1-channel
    model gives the same logits."""
    torch.manual_seed(6)
    model = build_model("mobileutr", 3, 2, sizes={"depths": [1, 1, 1, 1, 1]}).eval()
    folded = load_model(fold_grey_stem(model.state_dict()))
    assert folded.in_channels == 1
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        expected = model.predict(x.repeat(1, 3, 1, 1)).logits
        torch.testing.assert_close(folded.predict(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_no_settings_maps_or_counters():
    model = build_model("mobileutr", 1, 2)
    assert model.settings() == [] and model.map_specs() == [] and model.counter_specs() == []
    with pytest.raises(InputError, match="unknown setting gate for mobileutr"):
        model.predict(torch.zeros(1, 1, 32, 32), gate=0.0)


def test_drop_path_drops_whole_samples_in_training_only():
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 2, 2)
    assert drop.eval()(x) is x
    torch.manual_seed(7)
    y = drop.train()(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all() and 0 < (per_sample[:, 0] == 0).sum() < 64
