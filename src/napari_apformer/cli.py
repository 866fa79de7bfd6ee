"""apformer predict | info: the command line, wired to the same engine as the widget."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from napari_apformer import __version__, cohort
from napari_apformer.engine.precision import PRECISIONS
from napari_apformer.errors import InputError
from napari_apformer.io.files import compound_suffix, stem_of
from napari_apformer.io.formats import READABLE_SUFFIXES, is_readable_name
from napari_apformer.io.geometry import SLICE_AXES
from napari_apformer.train.command import add_sweep_parser, add_train_parser

OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".png", ".tif", ".tiff")
LABEL_STEM_SUFFIX = "_seg"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # recorded by train
    try:
        return args.run(args)
    except InputError as error:
        print(f"apformer: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("apformer: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: one line for the user, the traceback on request
        if args.debug:
            raise
        print(
            f"apformer: internal error ({type(error).__name__}: {error}); rerun with --debug "
            "for the traceback and please report it",
            file=sys.stderr,
        )
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apformer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"napari-apformer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    predict = commands.add_parser("predict", help="segment image files and folders")
    predict.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help=f"files ({', '.join(READABLE_SUFFIXES)}) or folders of them",
    )
    predict.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output folder, or a file name when there is one input file",
    )
    add_model_options(predict)
    predict.add_argument(
        "--token-threshold",
        type=float,
        default=None,
        help="tau_q in (0, 1]: prune tokens whose background probability is at "
        "least this; 1 keeps all (default: the weights' own)",
    )
    predict.add_argument(
        "--gate",
        type=parse_gate,
        default=None,
        help="dependency gate, one value or one per layer separated by commas "
        "(default: the weights' own)",
    )
    predict.add_argument("--batch-size", type=int, default=8, help="slices per batch (default 8)")
    predict.add_argument(
        "--axis",
        default="axial",
        help="slice direction of volumes: axial, coronal or sagittal (NIfTI, "
        "in RAS order), or an array axis 0, 1 or 2 (default axial; axis 0 "
        "for TIFF stacks)",
    )
    predict.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (default: skip them, so a rerun resumes)",
    )
    predict.add_argument(
        "--shard",
        type=cohort.parse_shard,
        default=None,
        metavar="I/N",
        help="take every N-th input file from the I-th (0-based), for parallel processes "
        "or cluster array jobs, e.g. --shard $SLURM_ARRAY_TASK_ID/16",
    )
    predict.add_argument(
        "--stats",
        type=Path,
        default=None,
        metavar="CSV",
        help="per-file statistics (default for folders and several inputs: "
        "OUTPUT/apformer-stats.csv, one per shard)",
    )
    predict.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    predict.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: float16 autocast on CUDA, float32 elsewhere",
    )
    predict.set_defaults(run=run_predict)

    add_train_parser(commands)
    add_sweep_parser(commands)

    info = commands.add_parser("info", help="weights, devices and versions")
    add_model_options(info)
    info.set_defaults(run=run_info)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        default=None,
        help="shipped weights name or a .safetensors/.pth file (default: the shipped default)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda[:N], mps"
    )


def parse_gate(text: str) -> float | list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or list of numbers: {text!r}") from None
    return values[0] if len(values) == 1 else values


def load_segmenter(args: argparse.Namespace, batch_size: int = 8):
    """Model and engine (imports torch, so only when a command needs them)."""
    from napari_apformer.engine.inference import Segmenter
    from napari_apformer.model import load_model
    from napari_apformer.weights import resolve_weights

    path = resolve_weights(args.weights)
    precision = getattr(args, "precision", "auto")
    segmenter = Segmenter(
        load_model(path), device=args.device, batch_size=batch_size, precision=precision
    )
    card = segmenter.card
    if card.placeholder:
        print(
            f"apformer: warning: '{card.name}' are randomly initialised placeholder weights; "
            "their labels mean nothing",
            file=sys.stderr,
        )
    return segmenter


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(
                p
                for p in item.iterdir()
                if p.is_file()
                and is_readable_name(p)
                and not p.name.startswith(".")
                and not stem_of(p).endswith(LABEL_STEM_SUFFIX)
            )
            if not found:
                raise InputError(f"no readable images ({', '.join(READABLE_SUFFIXES)})", item)
            files += found
        elif not item.exists():
            raise InputError("file not found", item)
        elif not is_readable_name(item):
            raise InputError(
                f"unsupported file type; expected {', '.join(READABLE_SUFFIXES)}", item
            )
        else:
            files.append(item)
    return files


def output_path_for(source: Path, output: Path, single: bool) -> Path:
    from napari_apformer.io.formats import label_suffix_for

    if single and compound_suffix(output) in OUTPUT_SUFFIXES:
        return output
    return output / f"{stem_of(source)}{LABEL_STEM_SUFFIX}{label_suffix_for(source)}"


def run_predict(args: argparse.Namespace) -> int:
    files = cohort.take_shard(collect_inputs(args.inputs), args.shard)
    single = len(files) == 1 and args.shard is None
    outputs = [output_path_for(f, args.output, single) for f in files]
    if len(set(outputs)) < len(outputs):
        raise InputError("two inputs would write the same output name; give them separate runs")
    many = args.shard is not None or len(args.inputs) > 1 or args.inputs[0].is_dir()
    table_path = args.stats or (
        cohort.default_table_path(args.output, args.shard) if many else None
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    segmenter = load_segmenter(args, args.batch_size)
    segmenter.check_settings(args.token_threshold, args.gate)  # once, not once per file
    table = cohort.StatisticsTable(segmenter.card.class_names)
    internal = False
    try:
        for source, target in zip(files, outputs, strict=True):
            if target.exists() and not args.overwrite:
                print(f"{target}: exists, skipped (--overwrite replaces it)", file=sys.stderr)
                table.add(
                    source, target, cohort.SKIPPED, "exists", cohort.stored_statistics(target)
                )
                continue
            try:
                statistics = predict_file(segmenter, source, target, args)
            except KeyboardInterrupt:
                table.add(source, target, cohort.FAILED, "interrupted")
                raise
            except Exception as error:  # one file's trouble never stops the others
                message, internal_error = failure_message(error, source, target)
                if internal_error and args.debug:
                    raise
                internal |= internal_error
                print(f"apformer: error: {message}", file=sys.stderr)
                table.add(source, target, cohort.FAILED, message)
            else:
                table.add(source, target, cohort.DONE, "", statistics)
    finally:
        if table_path is not None:
            try:
                table.write(table_path)
            except OSError as error:
                print(f"apformer: error: {table_path}: cannot write ({error})", file=sys.stderr)
    failed = table.count(cohort.FAILED)
    if len(files) > 1 or table_path is not None:
        print(
            f"apformer: {table.count(cohort.DONE)} done, {table.count(cohort.SKIPPED)} skipped "
            f"(existed), {failed} failed of {len(files)} files"
            + (f"; statistics in {table_path}" if table_path else ""),
            file=sys.stderr,
        )
        for row in table.rows:
            if row["status"] == cohort.FAILED:
                print(f"  failed: {row['message']}", file=sys.stderr)
    return 2 if internal else 1 if failed else 0


def failure_message(error: Exception, source: Path, target: Path) -> tuple[str, bool]:
    """A one-line message for a file that failed, and whether it was an internal error."""
    if isinstance(error, InputError):
        return str(error), False
    if isinstance(error, MemoryError):
        return f"{source}: not enough memory; try --batch-size 1", False
    if isinstance(error, OSError):  # writing failed; write_atomically left nothing behind
        return f"{target}: cannot write ({error.strerror or error})", False
    return (
        f"{source}: internal error ({type(error).__name__}: {error}); rerun with --debug "
        "for the traceback and please report it",
        True,
    )


def predict_file(segmenter, source: Path, target: Path, args: argparse.Namespace) -> dict:
    """Segment one file and write its labels and sidecar; returns its statistics."""
    from tqdm import tqdm

    from napari_apformer.io.formats import read_image_file, write_class_table, write_labels

    if compound_suffix(target) == ".png" and compound_suffix(source) in (".nii", ".nii.gz"):
        raise InputError(
            "NIfTI labels must be written as .nii or .nii.gz to keep their geometry", target
        )
    for stale in target.parent.glob(f".{target.name}.*.part*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    image_file = read_image_file(source)
    axis = slice_axis(args.axis, is_nifti=image_file.nifti is not None, source=source)
    image = segmenter.prepare(
        image_file.data, rgb=image_file.rgb, axis=axis, spacing=image_file.spacing, source=source
    )
    if image.is_volume and compound_suffix(target) == ".png":
        raise InputError("PNG holds 2D labels only; write volumes as .tif or .nii.gz", target)
    job = segmenter.start(image, token_threshold=args.token_threshold, gate=args.gate)
    progress_bar = tqdm(  # disable=None: only on a terminal
        total=job.total, desc=source.name, unit="slice", leave=False, file=sys.stderr, disable=None
    )
    with progress_bar as bar:
        for progress in job:
            bar.update(progress.done - bar.n)
    result = job.result
    for notice in result.notices:
        print(f"apformer: warning: {source}: {notice}", file=sys.stderr)
    voxel = cohort.voxel_volume_mm3(image_file.spacing, image_file.nifti is not None)
    statistics = cohort.statistics_of(result, segmenter.card.class_names, voxel)
    # The sidecar first: an output whose label file exists is complete, so a rerun skips it.
    write_class_table(target, {**class_table(segmenter, result), "statistics": statistics})
    write_labels(target, result.labels, image_file)
    print(f"{target}: {result.stats.summary()}")
    return statistics


def class_table(segmenter, result) -> dict:
    card = segmenter.card
    return {
        "labels": card.class_table(),
        "weights": card.name,
        "weights_sha256": card.sha256,
        "token_threshold": result.token_threshold,
        "gates": result.gates,
        "generator": f"napari-apformer {__version__}",
    }


def slice_axis(axis: str, is_nifti: bool, source: Path) -> int:
    if axis in SLICE_AXES:
        return SLICE_AXES[axis] if is_nifti else 0
    if axis in ("0", "1", "2"):
        return int(axis)
    raise InputError(f"--axis must be axial, coronal, sagittal, 0, 1 or 2, not {axis!r}", source)


def run_info(args: argparse.Namespace) -> int:
    import torch

    from napari_apformer.engine.device import available_devices, resolve_device
    from napari_apformer.weights import resolve_weights, shipped_weights

    segmenter = load_segmenter(args)
    card = segmenter.card
    print(
        f"napari-apformer {__version__}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )
    print(f"weights: {card.name} ({resolve_weights(args.weights)})")
    print(f"  classes: {', '.join(card.class_names)}; input channels: {card.in_channels}")
    print(
        f"  token threshold {card.token_threshold}, gates {card.gates}"
        + ("; PLACEHOLDER (random)" if card.placeholder else "")
    )
    print(f"shipped weights: {', '.join(shipped_weights()) or 'none'}")
    print(f"devices: {', '.join(available_devices())}; selected: {resolve_device(args.device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
