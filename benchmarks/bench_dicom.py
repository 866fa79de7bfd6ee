"""What reading a DICOM CT series adds to segmenting it (issue 16: at most 20 % for a
200-slice 512 x 512 series on 2 CPU cores).

    python benchmarks/bench_dicom.py [--slices 200] [--size 512] [--rounds 3] [--threads 2]

Writes a CT series with pydicom (int16, rescale intercept -1024, uncompressed; the slices of
the packaged MNI152 sample resampled to the size asked for, files shuffled) into a temporary
folder, then alternates, round by round, reading it as `apformer predict` does (scan_dicom
lists the folder, read_dicom_series reads the series with GDCM) and segmenting the volume
read (default weights, axial slices), so that both see the same machine load. Files are in
the page cache (just written, then read once before the first round). Prints a Markdown table
and the median ratio. Needs the `radiology` extra.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_volume import synthetic_volume
from napari_apformer.hardware import describe


def write_series(folder: Path, volume: np.ndarray, spacing: float = 0.7) -> None:
    """`volume` (Z, Y, X) int16 as an axial CT series, one file per slice, shuffled names."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(0).permutation(len(volume))
    for k, pixels in enumerate(volume):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "Bench^Mark", "CT"
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = 2, "bench", k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-180.0, -180.0, 1.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], 1.0
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (pixels.astype(np.int16) + 1024).tobytes()
        ds.save_as(folder / f"IM{order[k]:05d}.dcm", enforce_file_format=True)


def read(folder: Path):
    """(seconds listing, seconds reading, the ImageFile), as apformer predict reads it."""
    from napari_apformer.io.dicom import read_dicom_series, scan_dicom

    start = time.perf_counter()
    scan = scan_dicom(folder)
    listed = time.perf_counter()
    (series,) = scan.volumes
    image = read_dicom_series(series)
    return listed - start, time.perf_counter() - listed, image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import torch

    from napari_apformer.engine.inference import Segmenter
    from napari_apformer.io.geometry import SLICE_AXES
    from napari_apformer.model import load_model
    from napari_apformer.weights import resolve_weights

    torch.set_num_threads(args.threads)
    model = load_model(resolve_weights(None))
    segmenter = Segmenter(model, device="cpu", batch_size=args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dicom-") as folder:
        folder = Path(folder)
        write_series(folder, synthetic_volume((args.slices, args.size, args.size)))
        read(folder)  # warm: imports, page cache
        for round_ in range(1, args.rounds + 1):
            listing, reading, image = read(folder)
            start = time.perf_counter()
            prepared = segmenter.prepare(
                image.data, axis=SLICE_AXES["axial"], spacing=image.spacing, source=folder
            )
            segmenter.start(prepared).finish()
            segmenting = time.perf_counter() - start
            rows.append((round_, listing, reading, segmenting))
    print(
        f"DICOM CT {args.slices} x {args.size} x {args.size}, "
        f"{describe()}, torch {torch.__version__}\n"
    )
    print("| round | listing s | reading s | segmenting s | reading / segmenting |")
    print("|---|---|---|---|---|")
    for round_, listing, reading, segmenting in rows:
        share = (listing + reading) / segmenting
        print(f"| {round_} | {listing:.2f} | {reading:.2f} | {segmenting:.1f} | {share:.1%} |")
    median = statistics.median((r[1] + r[2]) / r[3] for r in rows)
    print(f"\nmedian: reading adds {median:.1%} to segmenting (target: at most 20 %)")


if __name__ == "__main__":
    main()
