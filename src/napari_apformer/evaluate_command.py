"""`apformer evaluate`: labels against reference labels, per class, as a table and a CSV.

Files, or folders whose files are paired by name (a prediction `case1_seg.nii.gz` with the
reference `case1.nii.gz` or `case1_seg.nii.gz`). The measures: napari_apformer.evaluate.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from napari_apformer.errors import InputError

DEFAULT_TOLERANCE_MM = 2.0


def add_evaluate_parser(commands) -> None:
    """Register `apformer evaluate` on the CLI's subparsers."""
    evaluate = commands.add_parser(
        "evaluate",
        help="compare labels with reference labels: Dice, HD95, surface Dice, volumes",
        description="Per class Dice, 95th percentile Hausdorff distance and surface Dice at a "
        "tolerance (mm, from the voxel spacing), and volumes in ml, computed with SimpleITK.",
    )
    evaluate.add_argument(
        "predictions",
        nargs="?",
        type=Path,
        default=None,
        metavar="PREDICTION",
        help="the labels to score: a file or a folder (or give --prediction)",
    )
    evaluate.add_argument(
        "-p", "--prediction", type=Path, default=None, help="the same as PREDICTION"
    )
    evaluate.add_argument(
        "-r",
        "--reference",
        type=Path,
        required=True,
        help="reference labels: a file, or a folder with files of the predictions' names",
    )
    evaluate.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE_MM,
        metavar="MM",
        help=f"surface Dice tolerance in mm (default {DEFAULT_TOLERANCE_MM:g})",
    )
    evaluate.add_argument(
        "-o", "--output", type=Path, default=None, metavar="CSV", help="also write a CSV"
    )
    evaluate.set_defaults(run=run_evaluate)


def label_files(folder: Path) -> list[Path]:
    """The readable label files of a folder (not probabilities, not hidden)."""
    from napari_apformer.io.files import stem_of
    from napari_apformer.io.formats import is_readable_name
    from napari_apformer.predict_io import PROBABILITY_STEM_SUFFIX

    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and is_readable_name(p)
        and not p.name.startswith(".")
        and not stem_of(p).endswith(PROBABILITY_STEM_SUFFIX)
    )


def case_name(path: Path) -> str:
    """'case1' for case1.nii.gz, case1_seg.nii.gz and case1_seg.seg.nrrd."""
    from napari_apformer.io.files import stem_of

    stem = stem_of(path)
    for ending in (".seg", "_seg"):
        if stem.endswith(ending) and len(stem) > len(ending):
            stem = stem[: -len(ending)]
    return stem


def pairs(reference: Path, prediction: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(reference, prediction) files to compare, and one line per file without a partner."""
    for path in (reference, prediction):
        if not path.exists():
            raise InputError("not found", path)
    if reference.is_dir() != prediction.is_dir():
        raise InputError(
            "give two files or two folders (files are paired by name)",
            f"{prediction} against {reference}",
        )
    if not reference.is_dir():
        return [(reference, prediction)], []
    references: dict[str, Path] = {}
    for path in label_files(reference):
        if case_name(path) in references:
            raise InputError(
                f"two references for case {case_name(path)!r}: "
                f"{references[case_name(path)].name} and {path.name}",
                reference,
            )
        references[case_name(path)] = path
    found, unpaired = [], []
    for path in label_files(prediction):
        partner = references.pop(case_name(path), None)
        if partner is None:
            unpaired.append(f"{path}: no reference of that name in {reference}")
        else:
            found.append((partner, path))
    unpaired += [
        f"{path}: no prediction of that name in {prediction}" for path in references.values()
    ]
    if not found:
        raise InputError(
            "no prediction has a reference of the same name (case1_seg.nii.gz pairs with "
            "case1.nii.gz or case1_seg.nii.gz)",
            f"{prediction} against {reference}",
        )
    return found, unpaired


def run_evaluate(args: argparse.Namespace) -> int:
    from napari_apformer.evaluate import csv_text, evaluate_pair
    from napari_apformer.io.files import write_atomically

    if (args.predictions is None) == (args.prediction is None):
        raise InputError("give the prediction once: as PREDICTION or as --prediction")
    prediction = args.prediction or args.predictions
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise InputError(f"--tolerance takes a distance in mm, 0 or more, not {args.tolerance}")
    found, unpaired = pairs(args.reference, prediction)
    for line in unpaired:
        print(f"apformer: warning: {line}", file=sys.stderr)
    rows, failed = [], []
    for reference_path, prediction_path in found:
        try:
            scores = evaluate_pair(reference_path, prediction_path, args.tolerance)
        except InputError as error:
            if len(found) == 1:
                raise
            print(f"apformer: error: {error}", file=sys.stderr)
            failed.append(str(error))
            continue
        rows += [s.row(reference_path, prediction_path, args.tolerance) for s in scores]
    print(table_text(rows, args.tolerance, several=len(found) > 1))
    if args.output is not None:
        text = csv_text(rows)
        try:
            write_atomically(args.output, lambda tmp: tmp.write_text(text, "utf-8"))
        except OSError as error:
            raise InputError(f"cannot write ({error.strerror or error})", args.output) from None
        print(f"{args.output}: {len(rows)} rows", file=sys.stderr)
    if failed:
        print(f"apformer: {len(failed)} of {len(found)} pairs failed", file=sys.stderr)
    return 1 if failed else 0


def table_text(rows: list[dict], tolerance: float, several: bool) -> str:
    """The scores as an aligned plain-text table (one line per class)."""
    head = ["class", "Dice", "HD95 mm", f"surface Dice @{tolerance:g} mm", "ref ml", "pred ml"]
    if several:
        head.insert(0, "prediction")
    lines = []
    for row in rows:
        cells = [
            f"{row['value']} {row['class']}",
            fixed(row["dice"], 4),
            fixed(row["hd95_mm"], 2),
            fixed(row["surface_dice"], 4),
            fixed(row["reference_ml"], 3),
            fixed(row["prediction_ml"], 3),
        ]
        if several:
            cells.insert(0, Path(row["prediction"]).name)
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(head, *lines, strict=False)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in [head, *lines]
    )


def fixed(value: object, digits: int) -> str:
    if value == "":
        return "-"
    if isinstance(value, float | int):
        return f"{value:.{digits}f}"
    return str(value)
