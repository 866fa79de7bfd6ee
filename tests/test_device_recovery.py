"""The engine under device trouble: out of memory, a failing GPU, overlapped batches,
reduced precision. No GPU is needed: failures are injected into the model."""

import numpy as np
import pytest
import torch

from conftest import SAMPLE
from napari_apformer.engine.inference import Segmenter
from napari_apformer.errors import InputError
from napari_apformer.io.formats import read_image_file
from napari_apformer.model import load_model
from napari_apformer.weights import resolve_weights


@pytest.fixture
def volume(official):
    brain, noise = official["input"][0, 0], official["input"][1, 0]
    return np.stack([brain, brain.T, noise, brain[::-1], brain[:, ::-1]]) * 1000


@pytest.fixture
def reference(official_model, volume):
    segmenter = Segmenter(official_model, device="cpu", batch_size=1)
    return segmenter.segment(segmenter.prepare(volume)).labels


def _failing_forward(segmenter, monkeypatch, error, when):
    """Make APFormer's forward pass raise `error` for batches where when(batch_size, call) is
    true. On the CPU the model calls itself once per slice of a batch: those calls count too.
    """
    forward, calls = segmenter.model.forward, []

    def flaky(x, *args, **kwargs):
        calls.append(x.shape[0])
        if when(x.shape[0], len(calls)):
            raise error
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(segmenter.model, "forward", flaky)
    return calls


@pytest.mark.slow
def test_out_of_memory_halves_the_batch_and_loses_nothing(
    official_model, volume, reference, monkeypatch
):
    segmenter = Segmenter(official_model, device="cpu", batch_size=4)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    calls = _failing_forward(segmenter, monkeypatch, oom, lambda size, call: size > 2)
    result = segmenter.segment(segmenter.prepare(volume))
    assert np.array_equal(result.labels, reference)
    assert segmenter.batch_size == 2
    assert calls[0] == 4 and max(calls[1:]) == 2
    assert result.notices == ["cpu ran out of memory; continuing with batch size 2"]
    assert result.stats.slices == len(volume)


def test_out_of_memory_at_batch_1_on_the_cpu_is_a_clear_error(official_model, volume, monkeypatch):
    segmenter = Segmenter(official_model, device="cpu", batch_size=2)
    oom = torch.OutOfMemoryError("out of memory")
    _failing_forward(segmenter, monkeypatch, oom, lambda size, call: call > 3)
    job = segmenter.start(segmenter.prepare(volume))
    with pytest.raises(InputError, match="not enough memory for even one slice"):
        job.finish()
    assert job.result.stats.slices == 2  # the first batch was collected and stays


@pytest.mark.slow
def test_a_failing_gpu_moves_the_run_to_the_cpu(official_model, volume, reference, monkeypatch):
    segmenter = Segmenter(official_model, device="cpu", batch_size=2)
    # Pretend the run is on a GPU (the model stays on the CPU, so the work itself is real).
    monkeypatch.setattr(segmenter, "device", torch.device("cuda", 0))
    monkeypatch.setattr(Segmenter, "overlap", property(lambda self: False))
    failure = RuntimeError("CUDA error: unspecified launch failure")
    _failing_forward(segmenter, monkeypatch, failure, lambda size, call: call == 4)
    result = segmenter.segment(segmenter.prepare(volume))
    assert np.array_equal(result.labels, reference)
    assert segmenter.device == torch.device("cpu")
    assert len(result.notices) == 1
    assert "cuda:0 failed (CUDA error: unspecified launch failure)" in result.notices[0]
    assert "2 of 5 slices were done and are kept" in result.notices[0]
    assert result.stats.device.startswith("cpu (after cuda:0")


def test_other_errors_are_not_swallowed(official_model, volume, monkeypatch):
    segmenter = Segmenter(official_model, device="cpu", batch_size=2)
    _failing_forward(segmenter, monkeypatch, ValueError("a bug"), lambda size, call: True)
    with pytest.raises(ValueError, match="a bug"):
        segmenter.segment(segmenter.prepare(volume))


@pytest.mark.slow
def test_overlapped_batches_give_the_same_results(official_model, volume, reference, monkeypatch):
    monkeypatch.setattr(Segmenter, "overlap", property(lambda self: True))
    segmenter = Segmenter(official_model, device="cpu", batch_size=2)
    job = segmenter.start(segmenter.prepare(volume), probabilities=True, attention_slices=[4])
    steps = [p.done for p in job]
    assert steps == [2, 4, 5]
    plain = Segmenter(official_model, device="cpu", batch_size=2)
    expected = plain.segment(plain.prepare(volume), probabilities=True, attention_slices=[4])
    assert np.array_equal(job.result.labels, reference)
    assert np.allclose(job.result.probabilities, expected.probabilities)
    assert np.array_equal(job.result.maps["keep"], expected.maps["keep"])
    assert job.result.stats.flops == expected.stats.flops
    assert torch.equal(job.result.attention_states[4][0], expected.attention_states[4][0])


@pytest.mark.slow
def test_reduced_precision_changes_few_labels(official_model):
    """The shipped weights on the sample slice; bfloat16 stands in for CUDA's float16 (CPU
    float16 is very slow): bfloat16 keeps 8 bits of mantissa, float16 11."""
    model = load_model(resolve_weights(None))
    image = read_image_file(SAMPLE).data
    full = Segmenter(model, device="cpu")
    reduced = Segmenter(model, device="cpu", precision="bfloat16")
    expected = full.segment(full.prepare(image, axis=2)).labels
    labels = reduced.segment(reduced.prepare(image, axis=2)).labels
    assert np.count_nonzero(expected) > 0
    assert np.mean(labels != expected) < 0.01
    with pytest.raises(InputError, match="precision must be one of"):
        Segmenter(official_model, device="cpu", precision="half")


def test_a_volume_too_large_for_memory_says_what_it_needs(official_model, monkeypatch):
    import napari_apformer.engine.inference as inference

    segmenter = Segmenter(official_model, device="cpu", batch_size=8)
    volume = np.zeros((300, 64, 64), np.int16)  # the pixels are not read before the check
    image = segmenter.prepare(volume, axis=0)
    monkeypatch.setattr(inference, "available_bytes", lambda: 200 * 2**20)
    with pytest.raises(InputError) as error:
        segmenter.start(image, probabilities=True)
    message = str(error.value)
    assert "needs about" in message and "200 MiB is available" in message
    assert "--batch-size 1" in message and "no probabilities" in message
    small = Segmenter(official_model, device="cpu", batch_size=1)
    assert small.start(small.prepare(volume, axis=0)).total == 300  # fits: starts


def test_a_nifti_too_large_to_read_is_refused_before_reading(tmp_path, monkeypatch):
    import nibabel as nib

    import napari_apformer.io.memory as memory
    import napari_apformer.io.nifti as nifti

    path = tmp_path / "ct.nii.gz"
    image = nib.Nifti1Image(np.zeros((64, 64, 40), np.int16), np.eye(4))
    image.header.set_slope_inter(1.0, -1024.0)  # read as float64: 8 bytes a voxel
    nib.save(image, path)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1_000_000)
    with pytest.raises(InputError, match=r"reading it needs 2 MiB of memory but only 1 MiB"):
        nifti.read_nifti(path)
