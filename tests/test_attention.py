"""GRPE and the two kinds of pruning, checked against a plain transcription of the spec."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_apformer.model.apformer.attention import prune_dependencies, relative_position_tables
from napari_apformer.model.apformer.network import TOKENS


def reference_pruning(scores: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Spec section 4, word for word: A = softmax(S); t = min + r (max - min); renormalise."""
    a = torch.softmax(scores, dim=-1)
    low, high = a.amin(-1, keepdim=True), a.amax(-1, keepdim=True)
    mask = (a > low + ratio * (high - low)).to(a.dtype)
    return a * mask / ((a * mask).sum(-1, keepdim=True) + 1e-6)


def test_relative_position_tables():
    index, distance = relative_position_tables(32)
    assert index.shape == distance.shape == (TOKENS, TOKENS)
    q, k = 3 * 32 + 5, 10 * 32 + 1  # (y, x) = (3, 5) and (10, 1)
    dy, dx = 3 - 10, 5 - 1
    assert index[q, k] == (dy + 31) * 63 + (dx + 31)
    assert distance[q, k] == pytest.approx((dy / 32) ** 2 + (dx / 32) ** 2)
    assert index.min() == 0 and index.max() == 63 * 63 - 1


@pytest.mark.slow
@pytest.mark.parametrize("grad", [False, True])
def test_dependency_pruning_matches_spec(grad):
    torch.manual_seed(1)
    scores = torch.randn(2, 3, 50, 70) * 3
    ratio = torch.rand(2, 3, 50, 1) * 0.5
    expected = reference_pruning(scores, ratio)
    with torch.set_grad_enabled(grad):
        pruned = prune_dependencies(scores.clone().requires_grad_(grad), ratio)
        got = pruned.weights / pruned.normaliser
    torch.testing.assert_close(got.detach(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(pruned.kept_per_query, (expected > 0).sum(-1).to(torch.int32))
    assert (pruned.kept_per_query >= 1).all()  # the maximum always survives


def test_dependency_pruning_gradient_matches_spec():
    """The row-maximum shift is detached for speed; the gradient must be the spec's."""
    torch.manual_seed(2)
    scores = (torch.randn(2, 3, 40, 60) * 3).requires_grad_()
    ratio = (torch.rand(2, 3, 40, 1) * 0.5).requires_grad_()
    upstream = torch.randn(2, 3, 40, 60)
    pruned = prune_dependencies(scores, ratio)
    (pruned.weights / pruned.normaliser * upstream).sum().backward()
    got = scores.grad.clone()
    scores.grad = None
    (reference_pruning(scores, ratio) * upstream).sum().backward()
    torch.testing.assert_close(got, scores.grad, atol=1e-6, rtol=1e-4)


def test_position_bias_gradient_reaches_every_table_entry_once_per_use(random_model):
    """index_select builds the bias; its gradient equals that of plain indexing."""
    attention = random_model.trans4.attention_layers[0]
    table = attention.relative_position_bias_table
    upstream = torch.randn(attention.heads, TOKENS, TOKENS)
    (attention.position_bias() * upstream).sum().backward()
    got = table.grad.clone()
    table.grad = None
    plain = table[attention.relative_position_index].permute(2, 0, 1)
    (plain * upstream).sum().backward()
    torch.testing.assert_close(got, table.grad, atol=1e-4, rtol=1e-4)
    table.grad = None


def test_pruned_queries_get_no_attention_output(random_model):
    layer = random_model.trans4.attention_layers[0]
    x = torch.randn(2, TOKENS, 128)
    keep = torch.rand(2, TOKENS) < 0.5
    keep[1] = False  # one image with nothing kept, batched with one that has some
    from napari_apformer.model.apformer.attention import kept_query_index

    index, valid = kept_query_index(keep)
    with torch.inference_mode():
        out, trace = layer(x, index, valid, torch.tensor(-2.0))
    assert (out[~keep] == 0).all()
    assert (out[keep].abs().sum(-1) > 0).all()
    assert (trace.kept_per_query[0][:, ~keep[0]] == 0).all()
    assert (trace.kept_per_query[1] == 0).all()


def test_token_threshold_one_keeps_every_token_even_at_certain_background(random_model):
    logits = torch.zeros(1, 2, 32, 32)
    logits[:, 0] = 200.0  # p_background rounds to exactly 1.0 in float32
    assert torch.softmax(logits, 1)[0, 0].min() == 1.0
    assert random_model.keep_mask(logits, 1.0).all()
    assert not random_model.keep_mask(logits, 0.999).any()


def test_invalid_settings_are_refused(random_model):
    x = torch.rand(1, 1, 256, 256)
    for tau in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="token_threshold"):
            random_model(x, token_threshold=tau)
    with pytest.raises(ValueError, match="gate"):
        random_model(x, gate=[0.0, 1.0])
    with pytest.raises(ValueError, match="256"):
        random_model(torch.rand(1, 1, 128, 128))


@pytest.mark.slow
def test_one_gate_equals_same_gate_per_layer(official, official_model):
    x = torch.from_numpy(official["input"][:1])
    with torch.inference_mode():
        a = official_model(x, gate=0.5).logits
        b = official_model(x, gate=[0.5] * 4).logits
        c = official_model(x, gate=[0.5, 0.5, 0.5, -3.0]).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_position_tables_are_buffers_and_bias_is_built_once(random_model):
    layer = random_model.trans4.attention_layers[0]
    assert "relative_position_index" in dict(layer.named_buffers())
    assert not any("relative_position_index" in k for k in random_model.state_dict())
    with torch.inference_mode():
        first = layer.position_bias()
        assert layer.position_bias() is first
    with torch.no_grad():
        layer.headsita.fill_(0.3)  # an in-place change of the parameter must rebuild it
    with torch.inference_mode():
        assert not torch.equal(layer.position_bias(), first)


@pytest.mark.slow
def test_capture_records_pruned_attention(official, official_model):
    x = torch.from_numpy(official["input"][:1])
    with torch.inference_mode():
        plain = official_model(x, token_threshold=0.9)
        out = official_model(x, token_threshold=0.9, capture=True)
    assert torch.equal(plain.logits, out.logits)
    keep = out.keep[0]
    for trace in out.layers:
        attention = trace.record.attention[0]  # (H, N, N)
        assert attention.shape == (6, TOKENS, TOKENS)
        assert (attention[:, ~keep] == 0).all()
        sums = attention[:, keep].sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-4, rtol=0)
        nonzero = (attention > 0).sum(-1).to(torch.int32)
        assert torch.equal(nonzero, trace.kept_per_query[0])
        before = trace.record.attention_before[0]
        assert ((before[:, keep] > 0).sum(-1) >= nonzero[:, keep]).all()
    assert all(t.record is None for t in plain.layers)


@pytest.mark.slow
def test_compute_falls_with_kept_tokens(official, official_model):
    """Pruned queries are left out of the products, so counted FLOPs fall (no timing here)."""
    x = torch.from_numpy(official["input"][:1])
    counts = {}
    for tau in (1.0, 0.9):
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            out = official_model(x, token_threshold=tau)
        counts[tau] = (counter.get_total_flops(), out.keep.float().mean().item())
    (full, _), (pruned, kept) = counts[1.0], counts[0.9]
    assert kept < 0.7
    assert pruned < 0.8 * full


@pytest.mark.slow
@pytest.mark.parametrize("tau", [1.0, 0.9, 0.5])
def test_reused_first_layer_gives_the_same_output(official, official_model, tau):
    """Layer 1's output per token does not depend on the keep mask, so reusing it is exact."""
    x = torch.from_numpy(official["input"])
    with torch.inference_mode():
        encoded = official_model.encode(x)
        plain = official_model.run_decoder(encoded, tau, gate=-1.0)
        official_model.add_first_layer(encoded, -1.0)
        reused = official_model.run_decoder(encoded, tau, gate=-1.0)
        other_gate = official_model.run_decoder(encoded, tau, gate=0.0)  # must not reuse
        fresh_other = official_model(x, tau, gate=0.0)
    assert torch.equal(plain.keep, reused.keep)
    torch.testing.assert_close(reused.logits, plain.logits, atol=1e-4, rtol=0)
    assert torch.equal(reused.kept_dependencies, plain.kept_dependencies)
    assert torch.equal(other_gate.logits, fresh_other.logits)


@pytest.mark.slow
def test_transformer_batch_with_different_keep_masks_equals_single_images(official, official_model):
    """The padded multi-image path (used on GPUs; the CPU model runs images one by one)."""
    with torch.inference_mode():
        encoded = official_model.encode(torch.from_numpy(official["input"]))
        keep = official_model.keep_mask(encoded.token_logits, 0.9)
        keep[1, :700] = False  # make the counts differ a lot
        gates = official_model.gate_values(-2.0, encoded.x4)
        trans = official_model.trans4
        batch = trans(encoded.x4, keep, gates, capture=True)
        for i in range(2):
            single = trans(encoded.x4[i : i + 1], keep[i : i + 1], gates, capture=True)
            torch.testing.assert_close(batch.features[i], single.features[0], atol=1e-4, rtol=0)
            for b, s in zip(batch.traces, single.traces, strict=True):
                assert torch.equal(b.kept_per_query[i], s.kept_per_query[0])
                torch.testing.assert_close(b.record.attention[i], s.record.attention[0])


@pytest.mark.slow
@pytest.mark.parametrize("tau", [1.0, 0.9])
def test_attention_rows_equal_the_captured_rows(official, official_model, tau):
    """Rows for chosen queries, recomputed from the kept layer inputs, match the full capture,
    also where layer 1 came from the cache."""
    x = torch.from_numpy(official["input"][:1])
    with torch.inference_mode():
        full = official_model(x, token_threshold=tau, gate=-1.0, capture=True)
        encoded = official_model.encode(x)
        official_model.add_first_layer(encoded, -1.0)
        run = official_model.run_decoder(encoded, tau, gate=-1.0, keep_inputs=True)
        assert run.first_layer_reused
        tokens = [int(i) for i in torch.nonzero(full.keep[0])[:3, 0]] + [0]
        inputs = [t.layer_input for t in run.layers]
        rows = official_model.attention_rows(inputs, tokens, [-1.0] * 4)
    torch.testing.assert_close(run.logits, full.logits, atol=1e-4, rtol=0)
    for record, trace in zip(rows, full.layers, strict=True):
        assert record.attention.shape == (1, 6, len(tokens), TOKENS)
        for j, token in enumerate(tokens):
            if not full.keep[0, token]:
                continue  # a pruned query has no row in the capture
            torch.testing.assert_close(
                record.attention[0, :, j], trace.record.attention[0, :, token], atol=1e-5, rtol=0
            )
            torch.testing.assert_close(
                record.attention_before[0, :, j],
                trace.record.attention_before[0, :, token],
                atol=1e-5,
                rtol=0,
            )
