"""Sample data: what File > Open Sample gives, and that its notices travel with it."""

import numpy as np

from napari_apformer.plugin import _sample_data
from napari_apformer.train.mni152 import CLASSES


def test_brain_samples_are_placed_in_mni_space_with_tissue_labels():
    [(slice_data, slice_kwargs, kind)] = _sample_data.brain_slice()
    assert kind == "image" and slice_data.shape == (1, 233, 197)
    assert slice_kwargs["units"] == ("mm",) * 3
    [(t1, t1_kwargs, _), (labels, label_kwargs, label_kind)] = _sample_data.brain_volume()
    assert label_kind == "labels" and labels.shape == t1.shape
    assert t1_kwargs["scale"] == label_kwargs["scale"] == (2.0, 2.0, 2.0)
    assert t1_kwargs["translate"] == label_kwargs["translate"]
    assert list(label_kwargs["features"]["class"]) == [c["name"] for c in CLASSES]
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    # White matter is brighter than grey matter, which is brighter than CSF, in a T1.
    means = [t1[labels == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]


def test_colour_sample_and_notices():
    [(retina, kwargs, _)] = _sample_data.retina()
    assert kwargs["rgb"] and retina.shape == (512, 512, 3)
    notice = (_sample_data.SAMPLES / "NOTICE_MNI152.txt").read_text()
    assert "Copyright (C) 1993-2009 Louis Collins" in notice
    assert "CC0" in (_sample_data.SAMPLES / "NOTICE_RETINA.txt").read_text()
