"""`apformer finetune`: adapt weights to one scan from a few corrected slices (torch loads
lazily). Everything is checked before training starts, and the weights and their card are
written together, atomically, only when training has finished."""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
import time
from pathlib import Path

from napari_apformer.errors import InputError
from napari_apformer.train.command import check_at_least, check_seed

OUTPUT_SUFFIXES = (".safetensors", ".json")
MAX_SLICES = 100_000  # a range longer than this is a typing error


def add_finetune_parser(commands) -> None:
    parser = commands.add_parser(
        "finetune",
        help="adapt weights to one scan from a few corrected slices (writes safetensors + card)",
        description="Fine-tune weights on the slices of a scan whose labels you corrected "
        "(the labels of other slices are ignored). Slices are prepared as inference prepares "
        "them and augmented as in training; with 3 or more corrected slices one is held out "
        "and its Dice before and after is printed and recorded in the card.",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="shipped weights name or a .safetensors/.pth file to start from "
        "(default: the shipped default)",
    )
    parser.add_argument("--image", type=Path, required=True, help="the scan (any readable image)")
    parser.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="a label file on the scan's grid (same shape and geometry) holding the corrections",
    )
    parser.add_argument(
        "--slices",
        required=True,
        metavar="AXIS:I,J,...",
        help="the corrected slices: an axis (axial, coronal, sagittal for NIfTI, in RAS order; "
        "or an array axis 0, 1, 2) and slice indices or ranges, e.g. axial:40,52,60-63",
    )
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        required=True,
        help="weights path without suffix, e.g. weights/my-scan (writes .safetensors and .json)",
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--batch-size", type=int, default=4, help="slices per step (default 4)")
    parser.add_argument("--lr", type=float, default=5e-5, help="learning rate (default 5e-5)")
    parser.add_argument(
        "--ssa-every",
        type=int,
        default=6,
        help="APFormer: compute the SSA loss every n-th step (default 6)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this much time and keep what was learnt so far",
    )
    parser.add_argument(
        "--no-hold-out",
        action="store_true",
        help="train on every corrected slice (default: hold one out for a before/after Dice "
        "when there are 3 or more)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda[:N], mps"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (0: every core)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace weights and card at OUT (default: refuse)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run_finetune)


def parse_slices(text: str) -> tuple[str | None, list[int]]:
    """'axial:40,52,60-63' as ('axial', [40, 52, 60, 61, 62, 63]); '0,1' (no axis) as
    (None, [0, 1]). InputError for anything else."""
    axis, _, listed = text.rpartition(":")
    indices: list[int] = []
    for item in listed.split(","):
        item = item.strip()
        if not item:
            continue
        low, dash, high = item.partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise InputError(
                f"--slices takes AXIS:I,J,... with whole slice numbers or ranges "
                f"(e.g. axial:40,52,60-63), not {text!r}"
            ) from None
        if last < first:
            raise InputError(f"--slices: the range {item} runs backwards")
        if last - first > MAX_SLICES:
            raise InputError(f"--slices: the range {item} is longer than any volume")
        indices.extend(range(first, last + 1))
    return (axis.strip() or None), indices


def check_arguments(args: argparse.Namespace) -> None:
    """One line for each number fine-tuning cannot use, before anything is read."""
    check_at_least(args, 1, "--steps", "--batch-size", "--ssa-every")
    check_seed(args.seed)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr takes a learning rate above 0, such as 5e-5, not {args.lr}")
    if args.max_minutes is not None and not (
        math.isfinite(args.max_minutes) and args.max_minutes > 0
    ):
        raise InputError(f"--max-minutes takes a time above 0, not {args.max_minutes}")


def check_outputs(args: argparse.Namespace, inputs: list[Path]) -> list[Path]:
    """The two outputs; InputError if one exists (without --overwrite) or is an input."""
    from napari_apformer.io.files import same_file

    outputs = [args.out.with_suffix(s) for s in OUTPUT_SUFFIXES]
    for output in outputs:
        for source in inputs:
            if same_file(output, source):
                raise InputError(f"{output} is an input of this run; choose another -o")
    existing = [p for p in outputs if p.exists()]
    if existing and not args.overwrite:
        raise InputError(f"{existing[0]} exists; --overwrite replaces it, or choose another -o")
    return outputs


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (a DICOM series: relative names and
    contents, in name order)."""
    from napari_apformer.model.checkpoint import sha256_of

    if not path.is_dir():
        return sha256_of(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode("utf-8", "surrogateescape") + b"\0")
        digest.update(bytes.fromhex(sha256_of(item)))
    return digest.hexdigest()


def read_scan(path: Path, what: str):
    """An ImageFile of one 2D image or 3D volume; InputError for a series of volumes."""
    from napari_apformer.io.formats import read_image_file

    if not path.exists():
        raise InputError(f"{what} not found", path)
    image = read_image_file(path)
    if image.series:
        raise InputError(
            f"the {what} is a series of volumes (4D); give one volume (fine-tuning takes "
            "one 3D volume or 2D image)",
            path,
        )
    return image


def label_array(labels, path: Path):
    """The label file's values: grey, or a colour file whose channels all agree."""
    import numpy as np

    data = labels.data
    if labels.rgb:
        if not all(np.array_equal(data[..., 0], data[..., k]) for k in range(1, data.shape[-1])):
            raise InputError("colour label files are not supported; store class labels", path)
        data = data[..., 0]
    return data


def check_geometry(image, labels, label_data, image_path: Path, label_path: Path) -> None:
    """The labels lie on the image's voxels: same shape, and the same affine where both
    files carry one (NIfTI, NRRD, MetaImage, DICOM)."""
    import numpy as np

    spatial = image.data.shape[: image.data.ndim - int(image.rgb)]
    if tuple(label_data.shape) != tuple(spatial):
        raise InputError(
            f"labels of shape {tuple(label_data.shape)} do not match the image "
            f"{image_path.name} of shape {tuple(spatial)}",
            label_path,
        )
    if (image.nifti is None) != (labels.nifti is None):
        which = (
            "the image carries scanner geometry and the labels do not"
            if image.nifti is not None
            else "the labels carry scanner geometry and the image does not"
        )
        raise InputError(
            f"{which}, so their voxels cannot be matched; save the labels in the image's "
            "format (e.g. NIfTI for a NIfTI scan)",
            label_path,
        )
    if image.nifti is not None and labels.nifti is not None:
        same_shape = tuple(image.nifti.source_shape) == tuple(labels.nifti.source_shape)
        if not same_shape or not np.allclose(image.nifti.affine, labels.nifti.affine, atol=1e-3):
            raise InputError(
                f"the labels' geometry (voxel-to-scanner affine) differs from that of "
                f"{image_path.name}: they do not lie on the same voxels",
                label_path,
            )


def run_finetune(args: argparse.Namespace) -> int:
    """`apformer finetune`; freed memory stays in the process during the run only."""
    from napari_apformer.allocator import freed_memory_kept

    with freed_memory_kept():
        return _finetune(args)


def _finetune(args: argparse.Namespace) -> int:
    import torch

    from napari_apformer.cli import apply_threads, check_device, slice_axis
    from napari_apformer.io.files import remove_stale_temporaries
    from napari_apformer.model.base import Trainable
    from napari_apformer.model.checkpoint import load_model, save_weights
    from napari_apformer.train.finetune import (
        AXIS_NAMES,
        FinetuneOptions,
        finetune,
        finetuned_card,
    )
    from napari_apformer.weights import resolve_weights

    started = time.perf_counter()
    check_arguments(args)
    check_device(args.device)
    axis_word, indices = parse_slices(args.slices)
    weights = resolve_weights(args.weights)
    check_outputs(args, [weights, weights.with_suffix(".json"), args.image, args.labels])
    apply_threads(args.threads)
    model = load_model(weights)
    if not isinstance(model, Trainable):
        raise InputError(f"the {model.family} family declares no training losses", weights)
    image = read_scan(args.image, "image")
    labels = read_scan(args.labels, "label file")
    label_data = label_array(labels, args.labels)
    check_geometry(image, labels, label_data, args.image, args.labels)
    volume = image.data.ndim - int(image.rgb) == 3
    nifti = image.nifti is not None
    if axis_word is None:
        if volume:
            raise InputError(
                f"--slices: give the axis of the slices, e.g. axial:{','.join(map(str, indices))}",
                args.image,
            )
        axis = 0
    else:
        axis = slice_axis(axis_word, is_nifti=nifti, source=args.image) if volume else 0
    axis_name = AXIS_NAMES[axis] if volume and nifti else f"axis {axis}"
    options = FinetuneOptions(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        max_minutes=args.max_minutes,
        ssa_every=args.ssa_every,
        seed=args.seed,
        device=args.device,
        hold_out=not args.no_hold_out,
    )
    bar = _progress_bar(args.steps, not args.no_progress)
    try:
        result = finetune(
            model,
            image.data,
            label_data,
            axis,
            indices,
            spacing=image.spacing,
            rgb=image.rgb,
            options=options,
            progress=bar,
            image_source=args.image,
            label_source=args.labels,
        )
    except KeyboardInterrupt as error:
        from napari_apformer.cli import interruption

        error.report = f"{interruption(error)} during fine-tuning; nothing was written"  # type: ignore[attr-defined]
        raise
    finally:
        if bar is not None:
            bar.close()
    report = result.report
    card = finetuned_card(
        model.card,
        report,
        options,
        name=args.out.name,
        axis_name=axis_name,
        base_weights=model.card.name or weights.name,
        base_sha256=model.card.sha256 or file_sha256(weights),
        image_name=args.image.name,
        image_sha256=file_sha256(args.image),
        labels_name=args.labels.name,
        labels_sha256=file_sha256(args.labels),
        command="apformer "
        + " ".join(shlex.quote(str(a)) for a in getattr(args, "command_line", [])),
        extra={"torch": torch.__version__},
    )
    card.training["wall_seconds"] = round(time.perf_counter() - started, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(args.out.parent)
    save_weights(result.model, card, args.out.with_suffix(".safetensors"))
    print(f"{report.summary()}; weights in {args.out.with_suffix('.safetensors')}", flush=True)
    if report.dice_before is not None and report.dice_after is not None:
        for name, before in report.dice_before.per_class.items():
            after = report.dice_after.per_class[name]
            print(f"  {name}: Dice {before:.3f} -> {after:.3f}")
    return 0


class _Bar:
    """tqdm's bar on a terminal; a line every 10 steps (and the last) elsewhere."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.total = total
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="fine-tuning", unit="step") if self.terminal else None

    def __call__(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}")
            self.bar.update(1)
        elif step % 10 == 0 or step == self.total:
            print(f"step {step}/{self.total}: loss {loss:.4f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_bar(total: int, enabled: bool) -> _Bar | None:
    return _Bar(total) if enabled else None
