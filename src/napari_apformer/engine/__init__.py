"""Image arrays in, segmentation results out: preprocessing, cache, batches, statistics."""
