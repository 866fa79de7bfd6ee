"""Freed memory stays in the process while a model runs (napari_apformer.allocator, glibc).

Without it, glibc may hand the tens of MB of attention scores back to the kernel after every
pass, and the next pass faults them in again page by page. After one fine-tuning in the
widget (whose allocator settings turn glibc's adaptive threshold off for good) that happened
on every slider change: 43,700 minor page faults and twice the time per change
(docs/performance.md). These tests count page faults, which do not depend on the machine's
speed.
"""

from __future__ import annotations

import os
import resource
import sys

import numpy as np
import pytest
import torch

from napari_apformer import allocator
from napari_apformer.allocator import freed_memory_kept

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_runs_after_a_fine_tuning_fault_no_memory_in_again(official_model):
    from napari_apformer.engine.inference import Segmenter

    with freed_memory_kept() as kept:  # what the adapt panel does around a fine-tuning
        if not kept:
            pytest.skip("not glibc")
    segmenter = Segmenter(official_model, "cpu")
    image = segmenter.prepare(np.random.default_rng(0).random((256, 256), np.float32))
    for _ in range(2):  # the first run sets its memory up
        segmenter.segment(image, token_threshold=1.0)
    before = minor_faults()
    segmenter.segment(image, token_threshold=1.0)
    # one unpruned pass frees about 100 MB of scores: 25,000 pages if they went back
    assert minor_faults() - before < 2_000


def test_a_job_holds_nothing_between_its_batches(official_model, monkeypatch):
    """The setting is held while a batch runs, not while the job waits (a volume in the
    widget waits for the GUI thread; a cancelled one may never be asked again)."""
    from napari_apformer.engine import inference
    from napari_apformer.engine.inference import Segmenter

    held, launch = [], inference.Segmenter._launch
    monkeypatch.setattr(
        inference.Segmenter,
        "_launch",
        lambda self, *args: held.append(allocator._runs) or launch(self, *args),
    )
    segmenter = Segmenter(official_model, "cpu", batch_size=1)
    job = segmenter.start(segmenter.prepare(np.zeros((2, 64, 64), np.float32), axis=0))
    next(job)
    assert allocator._runs == 0 and held == [1]
    job.finish()
    assert allocator._runs == 0 and held == [1, 1]


def test_the_last_run_to_end_gives_back_what_any_run_asked_to():
    size = 300 * 2**20
    base = resident_bytes()
    with freed_memory_kept(give_back=False) as kept:  # a slider change
        if not kept:
            pytest.skip("not glibc")
        with freed_memory_kept(give_back=True):  # a volume, in another thread
            block = np.ones(size, np.uint8)
            del block
        assert allocator._runs == 1
        assert resident_bytes() - base > size // 2  # kept: the slider's run still goes
    assert allocator._runs == 0
    assert resident_bytes() - base < size // 4  # handed back once both ended


def test_a_slider_run_keeps_its_memory_for_the_next():
    size = 100 * 2**20  # under KEEP_BETWEEN_RUNS
    with freed_memory_kept(give_back=False) as kept:
        if not kept:
            pytest.skip("not glibc")
        block = torch.ones(size, dtype=torch.uint8)
        del block
    held = resident_bytes()
    before = minor_faults()
    with freed_memory_kept(give_back=False):
        block = torch.ones(size, dtype=torch.uint8)
        del block
    assert minor_faults() - before < size // os.sysconf("SC_PAGE_SIZE") // 4
    assert resident_bytes() <= held + size // 4


@pytest.mark.slow
def test_training_gives_its_peak_memory_back_when_it_ends():
    size = 400 * 2**20
    with freed_memory_kept() as kept:
        if not kept:
            pytest.skip("not glibc")
        before = resident_bytes()
        block = np.ones(size, np.uint8)
        del block
        held = resident_bytes() - before  # freed, but kept by the process
    after = resident_bytes() - before
    assert held > size // 2  # kept while training
    assert after < size // 4  # handed back afterwards
