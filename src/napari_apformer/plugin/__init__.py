"""The napari side: readers, writers, sample data and the widget. Everything that imports
napari or Qt lives here; the modules napari loads at start-up (readers, writers, samples)
do not import torch."""
