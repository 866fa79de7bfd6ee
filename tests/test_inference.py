"""The engine: same results as the model, cache reuse, progress, cancellation, statistics."""

import numpy as np
import pytest
import torch

from napari_apformer import allocator
from napari_apformer.engine.inference import Segmenter
from napari_apformer.model.apformer.flops import decoder_flops, encoder_flops, first_layer_flops


@pytest.fixture
def segmenter(official_model):
    return Segmenter(official_model, device="cpu", batch_size=2)


@pytest.fixture
def volume(official):
    """Three slices: the vector's brain slice, the same transposed, and its random image."""
    brain, noise = official["input"][0, 0], official["input"][1, 0]
    return np.stack([brain, brain.T, noise]) * 1000


@pytest.mark.slow
def test_engine_equals_model_on_a_256_slice(official, official_model):
    segmenter = Segmenter(official_model, device="cpu")
    image = official["input"][0, 0]
    prepared = segmenter.prepare(image)
    prepared.low, prepared.high = 0.0, 1.0  # the vector's input is already in [0, 1]
    result = segmenter.segment(prepared, token_threshold=0.9, gate=-2.0)
    with torch.inference_mode():
        out = official_model(torch.from_numpy(official["input"][:1]), 0.9, -2.0)
    assert np.array_equal(result.labels, out.logits[0].argmax(0).numpy())
    assert np.array_equal(result.maps["keep"][0].ravel(), out.keep[0].numpy())
    assert (result.labels != official["argmax_0"][0]).sum() <= 5


@pytest.mark.slow
def test_volume_labels_follow_the_slice_axis(segmenter, volume):
    along_0 = segmenter.segment(segmenter.prepare(volume, axis=0))
    along_2 = segmenter.segment(segmenter.prepare(np.moveaxis(volume, 0, 2), axis=2))
    assert along_0.labels.shape == volume.shape
    assert np.array_equal(np.moveaxis(along_2.labels, 2, 0), along_0.labels)
    assert along_0.stats.slices == 3


@pytest.mark.slow
def test_threshold_change_reuses_encoder_and_matches_a_fresh_run(official_model, segmenter, volume):
    prepared = segmenter.prepare(volume, axis=0)
    segmenter.segment(prepared, slices=[0], token_threshold=0.9)  # one-off: leaves no cache
    assert len(segmenter.encoder_cache) == 0
    first = segmenter.segment(prepared, slices=[0], token_threshold=0.9, gate=-2.0, cache=True)
    assert first.stats.encoder_cache_hits == 0
    second = segmenter.segment(prepared, slices=[0], token_threshold=0.6, gate=0.0, cache=True)
    assert second.stats.encoder_cache_hits == 1
    model = segmenter.model
    kept_first = first.stats.counters["kept_tokens"][0]
    kept_second = second.stats.counters["kept_tokens"][0]
    assert first.stats.flops == (  # encoder, layer 1 for every token, the rest for kept ones
        encoder_flops(model) + first_layer_flops(model) + decoder_flops(model, kept_first, True)
    )
    # the gate changed, so layer 1 is recomputed for every token at the new gate
    assert second.stats.flops == first_layer_flops(model) + decoder_flops(model, kept_second, True)
    third = segmenter.segment(prepared, slices=[0], token_threshold=0.7, gate=0.0, cache=True)
    kept_third = third.stats.counters["kept_tokens"][0]
    assert third.stats.flops == decoder_flops(model, kept_third, True)
    # the cost of a plain pass at these settings, nothing cached, is reported beside it
    assert third.stats.flops_full == encoder_flops(model) + decoder_flops(model, kept_third)
    fresh = Segmenter(official_model, device="cpu")
    expected = fresh.segment(
        fresh.prepare(volume, axis=0), slices=[0], token_threshold=0.6, gate=0.0
    )
    assert np.array_equal(second.labels, expected.labels)
    assert np.array_equal(second.maps["keep"], expected.maps["keep"])
    assert second.stats.fraction("kept_tokens") < first.stats.fraction("kept_tokens")


@pytest.mark.slow
def test_progress_and_cancellation(segmenter, volume):
    prepared = segmenter.prepare(np.concatenate([volume, volume]), axis=0)  # 6 slices
    job = segmenter.start(prepared)
    first = next(job)
    assert (first.done, first.total) == (2, 6) and not job.done
    del job  # cancelling is just not asking for more
    assert allocator._runs == 0  # the run's hold on freed memory ended with it
    job = segmenter.start(prepared)
    assert [p.done for p in job] == [2, 4, 6] and job.done
    assert job.result.stats.slices == 6


@pytest.mark.slow
def test_batches_give_the_same_labels_as_single_slices(official_model, volume):
    batched = Segmenter(official_model, device="cpu", batch_size=8)
    single = Segmenter(official_model, device="cpu", batch_size=1)
    a = batched.segment(batched.prepare(volume, axis=0))
    b = single.segment(single.prepare(volume, axis=0))
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.maps["keep"], b.maps["keep"])


@pytest.mark.slow
def test_probabilities_attention_and_token_maps(segmenter, volume):
    prepared = segmenter.prepare(volume[:, :200, :150], axis=0)
    result = segmenter.segment(prepared, probabilities=True, attention_slices=[1])
    assert result.probabilities.shape == (9, 3, 200, 150)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(result.probabilities.argmax(0), result.labels)
    assert set(result.attention_states) == {1}
    keep = result.maps["keep"][1].ravel()
    kept, pruned = int(np.flatnonzero(keep)[0]), int(np.flatnonzero(~keep)[0])
    after, before = segmenter.attention(result, 1, kept)
    assert after.shape == before.shape == (4, 6, 32, 32)
    np.testing.assert_allclose(after.sum(axis=(2, 3)), 1.0, atol=1e-4)
    np.testing.assert_allclose(before.sum(axis=(2, 3)), 1.0, atol=1e-4)
    assert (after > 0).sum() <= (before > 0).sum()
    assert not segmenter.attention(result, 1, pruned)[0].any()
    with pytest.raises(ValueError, match="attention_slices"):
        segmenter.attention(result, 0, kept)
    keep = result.maps["keep"]
    assert ((result.maps["kept_dependencies"] > 0) == keep).all()
    assert ((result.maps["background_probability"] >= 0.9) == ~keep).all()


@pytest.mark.slow
def test_statistics_count_what_was_spent(segmenter, volume):
    prepared = segmenter.prepare(volume, axis=0)
    full = segmenter.segment(prepared, token_threshold=1.0)
    assert full.stats.fraction("kept_tokens") == 1.0
    assert full.stats.flops == full.stats.flops_unpruned  # counted by torch
    pruned = segmenter.segment(prepared, token_threshold=0.5)
    assert pruned.stats.flops < full.stats.flops
    assert 0 < pruned.stats.fraction("kept_dependencies") <= 1


def test_bad_slice_index_and_settings(segmenter, volume):
    prepared = segmenter.prepare(volume, axis=0)
    with pytest.raises(ValueError, match="out of range"):
        segmenter.start(prepared, slices=[3])
    with pytest.raises(ValueError, match="token_threshold"):
        segmenter.start(prepared, token_threshold=0)
    with pytest.raises(ValueError, match="batch size"):
        Segmenter(segmenter.model, batch_size=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="only without a CUDA GPU")
def test_cuda_asked_for_without_a_gpu_is_refused(segmenter):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Segmenter(segmenter.model, device="cuda")
