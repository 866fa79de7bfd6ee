"""mobileutr-ap: MobileUtr with APFormer's pruning head and query- and dependency-wise pruning
in its transformer stage (model/mobileutr/pruned_network.py, pruned_stage.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_apformer.engine.inference import Segmenter
from napari_apformer.errors import InputError
from napari_apformer.model.base import CachedSplit, QueryAttention, Trainable, build_model
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import grow_model, load_model, save_weights
from napari_apformer.model.mobileutr import MobileUtr, MobileUtrAP
from napari_apformer.model.mobileutr.pruned_stage import PrunedGlobalAttn

SMALL = {"depths": [1, 1, 1, 1, 2]}  # default widths, two pruned blocks
ADDED = {"pred_class.weight", "pred_class.bias"} | {
    f"transformer_bottleneck.{i}.SelfAttn.attn.{name}"
    for i in range(2)
    for name in ("gate", "thresh_for_kv.weight")
}


def _pair(seed: int = 0) -> tuple[MobileUtr, MobileUtrAP]:
    """A random MobileUtr and a mobileutr-ap holding the same weights (plus its own)."""
    torch.manual_seed(seed)
    plain = build_model("mobileutr", 1, 3, sizes=SMALL).eval()
    pruned = build_model("mobileutr-ap", 1, 3, sizes=SMALL).eval()
    result = pruned.load_state_dict(plain.state_dict(), strict=False)
    assert set(result.missing_keys) == ADDED and not result.unexpected_keys
    return plain, pruned  # type: ignore[return-value]


def _set_background(model: MobileUtrAP, logit: float) -> None:
    """Make the pruning head's background logit `logit` and its foreground logit 0 for every
    token, whatever the input."""
    with torch.no_grad():
        model.pred_class.weight.zero_()
        model.pred_class.bias.copy_(torch.tensor([float(logit), 0.0]))


def test_registered_as_a_family_with_mobileutrs_variants():
    model = build_model("mobileutr-ap", 1, 4, variant="L")
    assert isinstance(model, MobileUtrAP) and model.family == "mobileutr-ap"
    assert model.architecture()["sizes"] == MobileUtr.variants["L"]
    for capability in (CachedSplit, QueryAttention, Trainable):
        assert isinstance(model, capability)
    assert all(isinstance(b.SelfAttn.attn, PrunedGlobalAttn) for b in model.transformer_bottleneck)
    assert model.attention_shape() == (3 + 4, 8)


def test_settings_are_apformers():
    apformer = {s.name: s for s in build_model("apformer", 1, 2).declared_settings()}
    ours = {s.name: s for s in build_model("mobileutr-ap", 1, 2).declared_settings()}
    assert set(ours) == set(apformer) == {"token_threshold", "gate"}
    for name, setting in ours.items():
        theirs = apformer[name]
        for attribute in ("label", "low", "high", "step", "low_open"):
            assert getattr(setting, attribute) == getattr(theirs, attribute), (name, attribute)
    assert ours["token_threshold"].default == apformer["token_threshold"].default
    assert ours["gate"].per_layer == 3 and ours["gate"].default == [-2.0] * 3


def test_with_the_pruning_off_it_is_mobileutr():
    plain, pruned = _pair(1)
    x = torch.rand(2, 1, 64, 96)
    with torch.inference_mode():
        reference = plain.predict(x).logits
        out = pruned.predict(x, token_threshold=1.0, gate=-10.0)
    assert (out.logits - reference).abs().max() < 1e-4
    assert torch.equal(out.counters["kept_tokens"][:, 0], torch.full((2,), 96))
    kept, possible = out.counters["kept_dependencies"].double().unbind(1)
    assert (kept / possible > 0.95).all()  # the gate at its floor drops only the weakest links
    # the same network with the pruning switched off in the other way: a head that calls
    # nothing background
    _set_background(pruned, -30.0)
    with torch.inference_mode():
        again = pruned.predict(x, token_threshold=0.5, gate=-10.0)
    assert torch.equal(again.logits, out.logits)


def test_pruned_queries_skip_attention():
    plain, pruned = _pair(2)
    _set_background(pruned, 30.0)  # every token background: every query pruned
    with torch.no_grad():  # the same network without the attention branch
        for block in plain.transformer_bottleneck:
            block.SelfAttn.attn.proj.weight.zero_()
            block.SelfAttn.attn.proj.bias.zero_()
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        out = pruned.predict(x, token_threshold=0.9)
        reference = plain.predict(x).logits
    assert not out.maps["keep"].any() and int(out.counters["kept_dependencies"][0, 0]) == 0
    torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=1e-5)


def test_a_kept_querys_update_does_not_depend_on_the_others():
    _, pruned = _pair(3)
    attn = pruned.transformer_bottleneck[0].SelfAttn.attn
    tokens = torch.randn(2, 64, 128)
    keep = torch.rand(2, 64) < 0.4
    from napari_apformer.model.apformer.attention import kept_query_index

    gate = torch.tensor(-1.0)
    with torch.inference_mode():
        everything = attn.pruned(tokens, *kept_query_index(torch.ones_like(keep)), gate)[0]
        update, trace = attn.pruned(tokens, *kept_query_index(keep), gate)
    assert torch.equal(update[~keep], torch.zeros_like(update[~keep]))
    torch.testing.assert_close(update[keep], everything[keep], atol=1e-6, rtol=1e-5)
    assert (trace.kept_per_query.transpose(1, 2)[~keep] == 0).all()
    assert (trace.kept_per_query.transpose(1, 2)[keep] > 0).all()


def test_higher_gates_keep_fewer_dependencies_and_the_maps_agree():
    _, pruned = _pair(4)
    x = torch.rand(1, 1, 64, 64)
    kept = []
    with torch.inference_mode():
        for gate in (-10.0, -2.0, 0.0, 3.0):
            out = pruned.predict(x, token_threshold=1.0, gate=gate)
            count, possible = (int(v) for v in out.counters["kept_dependencies"][0])
            fraction = out.maps["kept_dependencies"][0]
            assert abs(float(fraction.mean()) - count / possible) < 1e-5
            kept.append(count)
        per_layer = pruned.predict(x, token_threshold=1.0, gate=[-10.0, 3.0])
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    assert kept[-1] < int(per_layer.counters["kept_dependencies"][0, 0]) < kept[0]


@pytest.mark.slow
def test_flops_follow_the_kept_tokens_and_match_torch():
    plain, pruned = _pair(5)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():  # background probability 0.5 + a little per token
        pruned.pred_class.weight.normal_(0, 0.5)
    spent = []
    for threshold in (1.0, 0.6, 0.5, 0.4):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            out = pruned.predict(x, token_threshold=threshold)
        assert int(out.flops[0]) == counter.get_total_flops()
        assert int(out.full_flops[0]) == int(out.flops[0])
        spent.append((int(out.counters["kept_tokens"][0, 0]), int(out.flops[0])))
    assert spent == sorted(spent, reverse=True) and spent[0][1] > spent[-1][1]
    # unpruned: MobileUtr's count plus the pruning head and the ratio layers
    tokens, width = 64, 128
    added = 2 * tokens * width * 2 + 2 * 2 * tokens * width
    assert pruned.reference_flops(64, 64) == plain.reference_flops(64, 64) + added


def test_the_engine_cache_and_attention():
    _, pruned = _pair(6)
    with torch.no_grad():
        pruned.pred_class.weight.normal_(0, 0.5)
    segmenter = Segmenter(pruned, device="cpu")
    image = np.random.default_rng(0).random((2, 40, 56)).astype(np.float32)
    prepared = segmenter.prepare(image)
    first = segmenter.segment(prepared, cache=True, attention_slices=[1], token_threshold=0.5)
    again = segmenter.segment(prepared, cache=True, token_threshold=0.5)
    plain = Segmenter(pruned, device="cpu").segment(prepared, token_threshold=0.5)
    assert np.array_equal(first.labels, plain.labels) and np.array_equal(again.labels, plain.labels)
    assert again.stats.flops < first.stats.flops  # the encoder came from the cache
    keep = first.maps["keep"][1]
    assert keep.any() and not keep.all()
    kept_token = int(np.flatnonzero(keep.ravel())[0])
    pruned_token = int(np.flatnonzero(~keep.ravel())[0])
    after, before = segmenter.attention(first, 1, token=kept_token)
    assert after.shape == before.shape == (3, 4, 48 // 8, 64 // 8)
    np.testing.assert_allclose(before.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(after.sum(axis=(2, 3)), 1.0, rtol=1e-4)
    assert np.array_equal(after[0], before[0])  # the LGL stage is not pruned
    assert (after[1:] == 0).sum() > (before[1:] == 0).sum()  # dependencies dropped
    after, before = segmenter.attention(first, 1, token=pruned_token)
    # pruned in the transformer stage only: the LGL stage still attends from there
    assert not after[1:].any() and not before[1:].any()
    np.testing.assert_allclose(after[0].sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_query_attention_before_pruning_is_mobileutrs():
    plain, pruned = _pair(7)
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        theirs = plain.predict(x, want_attention=True).attention[0]
        # the pass at the gates' floor: the first pruned block sees MobileUtr's input, the
        # second one nearly (the first dropped its weakest links)
        ours = pruned.predict(x, True, token_threshold=1.0, gate=-10.0).attention[0]
        for token in (0, 27, 63):
            reference, _ = plain.query_attention(theirs, token)
            after, before = pruned.query_attention(ours, token, gate=0.0)
            torch.testing.assert_close(before[:2], reference[:2], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(before[2], reference[2], atol=2e-4, rtol=1e-3)
            assert (after[1:] == 0).any() and torch.equal(after[0], before[0])
    with pytest.raises(InputError, match="outside the 8 x 8 token grid"):
        pruned.query_attention(ours, 64)


def test_training_losses_hold_the_pruning_heads():
    _, pruned = _pair(8)
    pruned.train()
    x = torch.rand(2, 1, 64, 64)
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    target[:, 20:40, 16:48] = torch.randint(1, 3, (2, 20, 32))
    losses = pruned.training_losses(x, target, step=0, ssa_every=2)
    assert {"total", "segmentation", "head", "ssa"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["ssa"] > 0
    expected = 0.8 * losses["segmentation"] + 0.1 * losses["head"] + 0.1 * losses["ssa"]
    torch.testing.assert_close(losses["total"], expected)
    losses["total"].backward()
    assert (
        pruned.pred_class.weight.grad is not None and pruned.pred_class.weight.grad.abs().sum() > 0
    )
    assert pruned.training_losses(x, target, step=1, ssa_every=2)["ssa"] == 0


def test_checkpoints_of_the_two_families_are_told_apart(tmp_path):
    plain, pruned = _pair(9)
    assert load_model(dict(pruned.state_dict())).family == "mobileutr-ap"
    assert load_model(dict(plain.state_dict())).family == "mobileutr"
    pruned.set_defaults(pruned.resolve_settings({"gate": [-1.0, 0.5], "token_threshold": 0.7}))
    save_weights(pruned, ModelCard.generic("ap", 1, 3), tmp_path / "ap")
    loaded = load_model(tmp_path / "ap.safetensors")
    assert loaded.card.architecture["family"] == "mobileutr-ap"
    assert loaded.defaults() == {"token_threshold": 0.7, "gate": [-1.0, 0.5]}


def test_sizes_not_a_multiple_of_16_are_refused():
    _, pruned = _pair(10)
    with pytest.raises(InputError, match="56 x 64"):
        pruned.predict(torch.rand(1, 1, 56, 64))


def test_grown_from_mobileutr_weights_holds_every_tensor_and_refuses_apformers():
    torch.manual_seed(0)
    plain = build_model("mobileutr", 1, 3, sizes=SMALL).eval()
    grown = grow_model(plain, "mobileutr-ap", "plain.safetensors")
    assert isinstance(grown, MobileUtrAP) and grown.architecture() == {
        **plain.architecture(),
        "family": "mobileutr-ap",
    }
    mine = grown.state_dict()
    assert set(mine) - set(plain.state_dict()) == ADDED
    assert all(torch.equal(mine[k], v) for k, v in plain.state_dict().items())
    apformer = build_model("apformer", 1, 3)
    with pytest.raises(InputError, match=r"^a\.safetensors: .*apformer") as error:
        grow_model(apformer, "mobileutr-ap", "a.safetensors")
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="no place in it"):  # mobileutr-ap's head is extra
        grow_model(grown, "mobileutr", "ap.safetensors")
