"""apformer predict | info | evaluate: the command line, wired to the same engine as the widget.

Run-time settings come from what the weights' model family declares (`apformer info` lists
them): `--set NAME=VALUE`, with the flags users already know (`--token-threshold`, `--gate`)
as aliases of the settings of those names.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from napari_apformer import __version__, cohort
from napari_apformer.compress.command import add_parser as add_compress_parser
from napari_apformer.engine.precision import PRECISIONS
from napari_apformer.errors import InputError
from napari_apformer.evaluate_command import add_evaluate_parser
from napari_apformer.io import acquisition
from napari_apformer.io.files import (
    Interrupted,
    compound_suffix,
    handle_signals,
    remove_stale_temporaries,
    replace_together,
    stem_of,
)
from napari_apformer.io.formats import READABLE_SUFFIXES
from napari_apformer.io.geometry import SLICE_AXES
from napari_apformer.predict_io import (
    LABEL_STEM_SUFFIX,
    OUTPUT_FORMATS,
    OUTPUT_SUFFIXES,
    Source,
    check_output_format,
    collect_sources,
    output_path_for,
    probabilities_path,
    take_shard,
)
from napari_apformer.train.command import add_sweep_parser, add_train_parser
from napari_apformer.train.finetune_command import add_finetune_parser

__all__ = ["LABEL_STEM_SUFFIX", "OUTPUT_SUFFIXES", "main"]
PROBABILITY_TYPES = ("uint8", "uint16", "float32")  # io.nifti.PROBABILITY_TYPES
# Flags users already know: each is `--set NAME=VALUE` for the setting NAME, and an error for
# weights whose family has no setting of that name.
SETTING_ALIASES = {"--token-threshold": "token_threshold", "--gate": "gate"}
# Options whose value may begin with a minus sign ("--gate -2,-2,-1,0"): argparse would take
# such a value for an option of its own.
NUMBER_OPTIONS = ("--set", "--token-threshold", "--gate", "--thresholds", "--gates")
_NEGATIVE = re.compile(r"-[0-9.]")
DEVICE_NAMES = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
# Without a terminal (a log file, SLURM): a line per file, and one per PROGRESS_SECONDS within
# a file, on stderr (on a terminal: tqdm's bar).
PROGRESS_SECONDS = 30.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(join_negative_values(given))
    args.command_line = given  # recorded by train
    try:
        with handle_signals():  # SIGTERM (timeout, kill, SLURM) cleans up as Ctrl-C does
            return args.run(args)
    except InputError as error:
        print(f"apformer: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        report = getattr(error, "report", None)
        print(f"apformer: {report or interruption(error)}", file=sys.stderr)
        return error.exit_code if isinstance(error, Interrupted) else 130
    except BrokenPipeError:  # the reader went away (`apformer info | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as error:  # a bug: one line for the user, the traceback on request
        if args.debug:
            raise
        print(
            f"apformer: internal error ({type(error).__name__}: {error}); rerun with --debug "
            "for the traceback and please report it",
            file=sys.stderr,
        )
        return 2


def interruption(error: BaseException) -> str:
    """'interrupted by Ctrl-C (SIGINT)' or 'terminated by SIGTERM'."""
    if isinstance(error, Interrupted) and error.signum != 2:
        return f"terminated by {error}"
    return "interrupted by Ctrl-C (SIGINT)"


def check_device(name: str) -> str:
    """`--device` as the engine takes it; InputError for anything else (torch would accept
    'meta', which has no data, and fail later)."""
    if not DEVICE_NAMES.fullmatch(str(name)):
        raise InputError(f"--device: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return name


def apply_threads(threads: int | None) -> None:
    """`--threads N`: N torch threads; 0 means every core this process may use; a negative
    count is an InputError."""
    if threads is None:
        return
    if threads < 0:
        raise InputError(
            f"--threads takes a number of CPU threads, 1 or more (0: every core), not {threads}"
        )
    import torch

    torch.set_num_threads(threads or usable_cores())


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
        help=f"files ({', '.join(READABLE_SUFFIXES)}), folders of them, or DICOM folders "
        "or DICOMDIRs (each volume series segmented separately)",
    )
    predict.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output folder, or a file name when there is one input (its suffix picks the "
        "label format: .nii.gz, .nii, .seg.nrrd, .nrrd, .mha, .dcm (DICOM SEG), .png, .tif)",
    )
    predict.add_argument(
        "--format",
        dest="output_format",
        choices=list(OUTPUT_FORMATS),
        default=None,
        help="label format of the outputs in a folder (default: the input's own; NIfTI "
        "for DICOM); seg.nrrd carries 3D Slicer segment names and colours, dcm is DICOM SEG "
        "(DICOM inputs only)",
    )
    predict.add_argument(
        "--save-probabilities",
        nargs="?",
        const="uint8",
        default=None,
        choices=PROBABILITY_TYPES,
        metavar="TYPE",
        help="also write per-class probabilities, <name>_prob.nii.gz (4D NIfTI, classes on "
        "the 4th axis, in the source geometry), stored as uint8 (default, step 1/255), uint16 "
        "(step 1/65535) or float32; the scale slope in the header gives probabilities",
    )
    add_model_options(predict)
    add_setting_options(predict)
    predict.add_argument("--batch-size", type=int, default=8, help="slices per batch (default 8)")
    predict.add_argument(
        "--axis",
        default="axial",
        help="slice direction of volumes: axial, coronal or sagittal (NIfTI, "
        "in RAS order), or an array axis 0, 1 or 2 (default axial; axis 0 "
        "for TIFF stacks)",
    )
    predict.add_argument(
        "--volume",
        type=int,
        default=None,
        metavar="I",
        help="of a 4D NIfTI file, segment volume I only (0-based); default: every volume, "
        "each written as <name>_vol<I>_seg (3D files are segmented as they are)",
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
    predict.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (0: every core this process may use; default: torch's)",
    )
    predict.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: float16 autocast on CUDA, float32 elsewhere",
    )
    predict.set_defaults(run=run_predict)

    add_train_parser(commands)
    add_sweep_parser(commands)
    add_finetune_parser(commands)
    add_compress_parser(commands)
    add_evaluate_parser(commands)

    info = commands.add_parser(
        "info",
        help="what weights hold (family, sizes, settings, maps, counters), devices, versions",
    )
    info.add_argument(
        "weights_file",
        nargs="?",
        default=None,
        metavar="WEIGHTS",
        help="shipped weights name or a .safetensors/.pth file (default: the shipped default)",
    )
    add_model_options(info)
    info.set_defaults(run=run_info)
    return parser


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """`--gate -2,-1` as `--gate=-2,-1`, so that argparse reads the value as one."""
    out: list[str] = []
    k = 0
    while k < len(argv):
        item = argv[k]
        if item == "--":
            return out + list(argv[k:])
        following = argv[k + 1] if k + 1 < len(argv) else None
        if item in NUMBER_OPTIONS and following is not None and _NEGATIVE.match(following):
            out.append(f"{item}={following}")
            k += 2
            continue
        out.append(item)
        k += 1
    return out


def add_setting_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a run-time setting of the model (repeatable; `apformer info` lists each "
        "setting, its range and default): one number, or for a per-layer setting one per "
        "layer separated by commas, e.g. --set gate=-2,-2,-1,0 (default: the weights' own)",
    )
    parser.add_argument(
        "--token-threshold",
        default=None,
        metavar="TAU",
        help="the same as --set token_threshold=TAU (APFormer: prune tokens whose "
        "background probability is at least TAU, in (0, 1]; 1 keeps all)",
    )
    parser.add_argument(
        "--gate",
        default=None,
        metavar="G[,G...]",
        help="the same as --set gate=G (APFormer: the dependency gate, one value for all "
        "layers or one per layer separated by commas)",
    )


def parse_setting_value(text: str) -> str | list[str]:
    """'0.5' or '-2,-2,-1,0': one value, or one per layer (checked by the model's Setting)."""
    parts = [part.strip() for part in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


def split_assignment(text: str, flag: str = "--set") -> tuple[str, str]:
    """'NAME=VALUE' as (NAME, VALUE); InputError if it is not of that form."""
    name, equals, value = text.partition("=")
    if not equals or not name.strip() or not value.strip():
        raise InputError(f"{flag} takes NAME=VALUE (e.g. {flag} gate=-2,-2,-1,0), got {text!r}")
    return name.strip(), value.strip()


def given_settings(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """Setting name -> (the flag that gave it, its value as text) from `--set` and the alias
    flags; InputError for a malformed `--set` or a setting given twice."""
    given: dict[str, tuple[str, object]] = {}

    def add(name: str, flag: str, value: object) -> None:
        if name in given:
            raise InputError(f"setting {name} is given twice ({given[name][0]} and {flag})")
        given[name] = (flag, value)

    for text in getattr(args, "settings", None) or []:
        name, value = split_assignment(text)
        add(name, f"--set {name}", parse_setting_value(value))
    for flag, name in SETTING_ALIASES.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            add(name, flag, parse_setting_value(str(value)))
    return given


def check_known_settings(model, given: Mapping[str, tuple[str, object]]) -> None:
    """InputError naming the flag when the model declares no setting of a given name, with
    the settings it has."""
    declared = [s.name for s in model.settings()]
    for name, (flag, _) in given.items():
        if name not in declared:
            raise InputError(
                f"{flag}: {model.family} weights have no setting {name!r}; their settings: "
                f"{', '.join(declared) or 'none'}"
            )


def settings_from_arguments(args: argparse.Namespace, segmenter) -> dict:
    """Every setting's value for this run, checked once (before any file is read)."""
    given = given_settings(args)
    check_known_settings(segmenter.model, given)
    return segmenter.check_settings({name: value for name, (_, value) in given.items()})


def format_value(value: object) -> str:
    """A setting's value as the command line takes it: 0.9, or -2,-2,-1,0 per layer."""
    if isinstance(value, list | tuple):
        return ",".join(format_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        default=None,
        help="shipped weights name or a .safetensors/.pth file (default: the shipped default)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda[:N], mps"
    )


def load_segmenter(args: argparse.Namespace, batch_size: int = 8):
    """Model and engine (imports torch, so only when a command needs them)."""
    from napari_apformer.engine.inference import Segmenter
    from napari_apformer.model import load_model
    from napari_apformer.weights import resolve_weights

    check_device(args.device)
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


def check_not_inputs(inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
    """InputError if an output (labels, sidecar, statistics) is one of the input files, by
    resolved path or by device and inode (hard and symbolic links): --overwrite never writes
    onto an input."""
    by_path: dict[Path, Path] = {}
    by_inode: dict[tuple[int, int], Path] = {}
    for source in inputs:
        by_path.setdefault(source.resolve(), source)
        with contextlib.suppress(OSError):
            status = source.stat()
            by_inode.setdefault((status.st_dev, status.st_ino), source)
    for output in outputs:
        source = by_path.get(output.resolve())
        if source is None:
            try:
                status = output.stat()
            except OSError:
                continue
            source = by_inode.get((status.st_dev, status.st_ino))
        if source is not None:
            which = "" if str(output) == str(source) else f" (the same file as {source})"
            raise InputError(
                f"{output} is an input of this run{which}; refusing to write onto an "
                "input: choose another output name or folder"
            )


def run_predict(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    check_device(args.device)
    if args.volume is not None and args.volume < 0:
        raise InputError(f"--volume takes a volume number from 0, not {args.volume}")
    found = collect_sources(args.inputs, args.volume)
    files = take_shard(found.sources, args.shard)
    single = len(files) == 1 and args.shard is None
    output_format = getattr(args, "output_format", None)
    outputs = [output_path_for(f, args.output, single, output_format) for f in files]
    if len(set(outputs)) < len(outputs):
        raise InputError("two inputs would write the same output name; give them separate runs")
    for source, target in zip(files, outputs, strict=True):
        check_output_format(source, target)  # before the model loads: nothing is written
    many = args.shard is not None or len(args.inputs) > 1 or args.inputs[0].is_dir()
    table_path = args.stats or (
        cohort.default_table_path(args.output, args.shard) if many else None
    )
    probabilities = getattr(args, "save_probabilities", None) is not None
    written = [p for o in outputs for p in output_files(o, probabilities)]
    check_not_inputs(found.files, [*written, *([table_path] if table_path else [])])
    for what, why in found.left_out:
        print(f"apformer: warning: {what}: left out: {why}", file=sys.stderr)
    if not files:
        raise InputError(f"nothing to segment ({len(found.left_out)} series or files left out)")
    segmenter = load_segmenter(args, args.batch_size)
    args.setting_values = settings_from_arguments(args, segmenter)  # once, not once per file
    for folder in {o.parent for o in outputs}:  # what killed runs of this host left, not live
        remove_stale_temporaries(folder)
    table = cohort.StatisticsTable(
        segmenter.card.class_names, [c.name for c in segmenter.model.counter_specs()]
    )
    listed = 0  # series and files left out, in the table once (not by every shard)
    if args.shard is None or args.shard[0] == 0:
        for what, why in found.left_out:
            table.add(what, "", cohort.SKIPPED, f"left out: {why}")
            listed += 1
    internal = stats_failed = False
    log_lines = not sys.stderr.isatty()
    try:
        for number, (source, target) in enumerate(zip(files, outputs, strict=True), 1):
            if log_lines and len(files) > 1:
                print(f"apformer: [{number}/{len(files)}] {source}", file=sys.stderr, flush=True)
            if target.exists() and not args.overwrite:
                try:
                    skip_existing(source, target, table)
                except Exception as error:  # never stop the others (skip_existing should not)
                    message = f"{target}: exists; cannot check it ({type(error).__name__})"
                    print(f"apformer: warning: {message}", file=sys.stderr)
                    table.add(source, target, cohort.SKIPPED, message)
                continue
            before = file_identity(target)
            try:
                statistics = predict_file(segmenter, source, target, args)
            except KeyboardInterrupt as error:
                error.report = interrupted_report(
                    error, source, target, before, table, len(files), table_path
                )
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
                stats_failed = True
                print(
                    f"apformer: error: {table_path}: cannot write the statistics "
                    f"({error.strerror or error})",
                    file=sys.stderr,
                )
    failed = table.count(cohort.FAILED)
    if len(files) > 1 or table_path is not None:
        existed = table.count(cohort.SKIPPED) - listed
        series = any(f.series is not None for f in files)
        print(
            f"apformer: {table.count(cohort.DONE)} done, {existed} skipped (existed), "
            + (f"{listed} left out, " if listed else "")
            + f"{failed} failed of {len(files)} {'inputs' if series else 'files'}"
            + (f"; statistics in {table_path}" if table_path and not stats_failed else ""),
            file=sys.stderr,
        )
        for row in table.rows:
            if row["status"] == cohort.FAILED:
                print(f"  failed: {row['message']}", file=sys.stderr)
    return 2 if internal else 1 if failed or stats_failed else 0


def skip_existing(source: Path, target: Path, table: cohort.StatisticsTable) -> None:
    """An existing output without --overwrite: skipped, its statistics from its sidecar when
    the two belong together; otherwise one line says why they are not reported."""
    found = cohort.existing_output(target)
    if found.problem:
        print(
            f"apformer: warning: {target}: exists, skipped, but {found.problem}; its "
            "statistics are not reported (--overwrite redoes it)",
            file=sys.stderr,
        )
        table.add(source, target, cohort.SKIPPED, f"exists; {found.problem}")
    else:
        print(f"{target}: exists, skipped (--overwrite replaces it)", file=sys.stderr)
        table.add(source, target, cohort.SKIPPED, "exists", found.statistics)


def file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


def interrupted_report(
    error: BaseException,
    source: Path,
    target: Path,
    before: tuple[int, int, int] | None,
    table: cohort.StatisticsTable,
    total: int,
    table_path: Path | None,
) -> str:
    """What an interruption during `source` left, truthfully: outputs are renamed into place
    whole (labels, then sidecar, with signals held back in between), so the file in progress
    is either complete or not written at all; its earlier output stays as it was."""
    completed = file_identity(target) != before and not cohort.existing_output(target).problem
    if completed:
        table.add(source, target, cohort.DONE, "", cohort.stored_statistics(target))
        what = f"its output {target} was completed just before"
    else:
        table.add(source, target, cohort.FAILED, "interrupted")
        what = "its output was not written" + (
            f" ({target} from before is unchanged)" if before is not None else ""
        )
    done = table.count(cohort.DONE) - completed
    return (
        f"{interruption(error)} during {source}: {what}, and no temporary file is left; "
        f"{done} of {total} files were done before it"
        + (f"; statistics so far in {table_path}" if table_path else "")
    )


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


def output_files(target: Path, probabilities: bool = False) -> list[Path]:
    """Every file written for one input, in the order they are renamed into place:
    probabilities (on request), descriptions for other viewers (ITK-SNAP beside NIfTI), the
    JSON sidecar that records the labels' SHA-256, and last the labels, whose presence is
    what a rerun takes for "done": a run killed before that rename is redone."""
    from napari_apformer.io.formats import class_table_path, label_description_paths

    return [
        *([probabilities_path(target)] if probabilities else []),
        *label_description_paths(target),
        class_table_path(target),
        target,
    ]


def predict_file(segmenter, source: Source | Path, target: Path, args: argparse.Namespace) -> dict:
    """Segment one file or DICOM series and write its labels and sidecar (and probabilities
    on request); returns its statistics."""
    from tqdm import tqdm

    if not isinstance(source, Source):
        source = Source(Path(source), stem_of(Path(source)))
    check_output_format(source, target)
    blocker = cohort.sidecar_blocker(target)
    if blocker:
        raise InputError(blocker)
    image_file = source.read()
    other_kind = acquisition.mismatch(acquisition.of_image(image_file), segmenter.card.made_for)
    for note in (*image_file.notes, *([other_kind] if other_kind else [])):
        print(f"apformer: warning: {source}: {note}", file=sys.stderr)
    axis = slice_axis(args.axis, is_nifti=image_file.nifti is not None, source=source)
    image = segmenter.prepare(
        image_file.data,
        rgb=image_file.rgb,
        axis=axis,
        spacing=image_file.spacing,
        source=str(source),
    )
    if image.is_volume and compound_suffix(target) == ".png":
        raise InputError("PNG holds 2D labels only; write volumes as .tif or .nii.gz", target)
    stored = getattr(args, "save_probabilities", None)
    job = segmenter.start(image, probabilities=stored is not None, **args.setting_values)
    progress_bar = tqdm(  # disable=None: only on a terminal
        total=job.total, desc=source.name, unit="slice", leave=False, file=sys.stderr, disable=None
    )
    lines = None if sys.stderr.isatty() else ProgressLines(source, job.total)
    with progress_bar as bar:
        for progress in job:
            bar.update(progress.done - bar.n)
            if lines is not None:
                lines.update(progress.done)
    result = job.result
    for notice in result.notices:
        print(f"apformer: warning: {source}: {notice}", file=sys.stderr)
    voxel = cohort.voxel_volume_mm3(image_file.spacing, image_file.nifti is not None)
    statistics = cohort.statistics_of(result, segmenter.card.class_names, voxel)
    table = class_table(segmenter, result)
    if source.series is not None:
        table["source_series"] = series_record(source.series)
    if source.volume is not None:
        table["source_volume"] = source.volume  # of the 4D file, 0-based
    probabilities = (result.probabilities, stored) if stored is not None else None
    write_outputs(target, result.labels, image_file, table, statistics, probabilities)
    print(f"{target}: {result.stats.summary()}")
    return statistics


def series_record(series) -> dict:
    """What the sidecar records of a DICOM source series."""
    return {
        "series_instance_uid": series.uid,
        "study_instance_uid": series.study_uid,
        "series_number": series.number,
        "series_description": series.description,
        "modality": series.modality,
        "slices": series.slices,
    }


def write_outputs(
    target: Path,
    labels,
    image_file,
    table: dict,
    statistics: dict,
    probabilities: tuple | None = None,
) -> None:
    """Labels (in the format of `target`'s suffix: NIfTI, NRRD with 3D Slicer's segment
    fields, MetaImage, DICOM SEG, PNG, TIFF), probabilities (`(array, stored type)`, on
    request), the ITK-SNAP label description beside NIfTI labels, and the sidecar, written to
    temporary names and renamed into place in the order of `output_files` (the labels last),
    with SIGINT/SIGTERM held back in between: an interrupted run leaves all or none. After a
    SIGKILL between the renames a first run has left no labels (a rerun redoes the file),
    and an --overwrite run the old labels beside the new sidecar (a rerun says they do not
    match)."""
    import json

    from napari_apformer.io.formats import write_labels
    from napari_apformer.io.label_files import write_dicom_seg, write_itksnap_labels
    from napari_apformer.io.nifti import write_nifti_probabilities

    paths = output_files(target, probabilities is not None)
    classes = table["labels"]

    def write(temporaries: list[Path]) -> None:
        *others, sidecar_tmp, labels_tmp = temporaries
        if compound_suffix(target) == ".dcm":
            write_dicom_seg(labels_tmp, labels, image_file.nifti, classes, image_file.source)
        else:
            write_labels(labels_tmp, labels, image_file, classes)
        record = dict(table)
        if probabilities is not None:
            values, stored = probabilities
            write_nifti_probabilities(
                others.pop(0), values, image_file.nifti, image_file.spacing, stored
            )
            record["probabilities_file"] = {
                "name": paths[0].name,
                "stored_as": stored,
                "classes_axis": 4,
                "classes": [c["name"] for c in classes],
            }
        for description_tmp in others:
            write_itksnap_labels(description_tmp, classes, labels)
        sidecar = {
            **record,
            "labels_file": {"name": target.name, **cohort.labels_record(labels_tmp)},
            "statistics": statistics,
        }
        sidecar_tmp.write_text(json.dumps(finite_json(sidecar), indent=2) + "\n", "utf-8")

    replace_together(paths, write)


class ProgressLines:
    """Progress as plain lines on stderr when it is not a terminal: at most one per
    PROGRESS_SECONDS, never for a file done sooner."""

    def __init__(self, source: Source | Path, total: int) -> None:
        self.source, self.total = source, total
        self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last >= PROGRESS_SECONDS:
            self.last = now
            print(
                f"apformer: {self.source.name}: {done} of {self.total} slices",
                file=sys.stderr,
                flush=True,
            )


def class_table(segmenter, result) -> dict:
    card = segmenter.card
    return {
        "labels": card.class_table(),
        "weights": card.name,
        "weights_sha256": card.sha256,
        "family": segmenter.model.family,
        "variant": segmenter.model.variant,
        "settings": dict(result.settings),
        "generator": f"napari-apformer {__version__}",
    }


def finite_json(value: object) -> object:
    """`value` with every NaN or infinite number replaced by None (JSON has neither)."""
    if isinstance(value, dict):
        return {key: finite_json(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def slice_axis(axis: str, is_nifti: bool, source: object) -> int:
    if axis in SLICE_AXES:
        return SLICE_AXES[axis] if is_nifti else 0
    if axis in ("0", "1", "2"):
        return int(axis)
    raise InputError(f"--axis must be axial, coronal, sagittal, 0, 1 or 2, not {axis!r}", source)


def run_info(args: argparse.Namespace) -> int:
    import torch

    from napari_apformer.engine.device import available_devices, resolve_device
    from napari_apformer.weights import resolve_weights, shipped_weights

    if args.weights_file is not None:
        if args.weights is not None and args.weights != args.weights_file:
            raise InputError(f"two weights given: {args.weights_file} and --weights {args.weights}")
        args.weights = args.weights_file
    segmenter = load_segmenter(args)
    card = segmenter.card
    print(
        f"napari-apformer {__version__}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )
    print(
        f"weights: {card.name} ({resolve_weights(args.weights)})"
        + ("; PLACEHOLDER (random weights: their labels mean nothing)" if card.placeholder else "")
    )
    for line in describe_model(segmenter.model, card):
        print(f"  {line}")
    print(f"shipped weights: {', '.join(shipped_weights()) or 'none'}")
    print(f"devices: {', '.join(available_devices())}; selected: {resolve_device(args.device)}")
    return 0


def describe_model(model, card) -> list[str]:
    """What `apformer info` says about a model: everything here comes from what its family
    declares and what its card records."""
    from napari_apformer.model.base import CachedSplit, QueryAttention, Searchable, Trainable

    channels = f"{model.in_channels} channel{'s' if model.in_channels != 1 else ''}"
    lines = [
        f"family: {model.family} (variant {model.variant})",
        f"sizes: {compact_sizes(model.sizes())}",
        f"input: {model.input_rule.describe()}, {channels}",
        "classes: " + ", ".join(f"{c.value} {c.name}" for c in card.classes),
    ]
    settings = model.settings()
    lines.append("settings (--set NAME=VALUE):" if settings else "settings: none")
    for s in settings:
        lower = "(" if s.low_open else "["
        kind = f"one per layer ({s.per_layer})" if s.per_layer else "one value"
        lines.append(
            f"  {s.name}: {s.label}, {kind}, default {format_value(s.default)}, range "
            f"{lower}{s.low:g}, {s.high:g}]"
        )
        lines += textwrap.wrap(s.help, 88, initial_indent="    ", subsequent_indent="    ")
    maps = model.map_specs()
    lines.append("maps: none" if not maps else "maps:")
    for m in maps:
        where = f"{m.stride} x {m.stride} pixel cells" if m.stride > 1 else "pixels"
        detail = f"; {m.help}" if m.help else ""
        lines += textwrap.wrap(
            f"{m.name}: {m.label} ({m.kind}, on {where}){detail}",
            88,
            initial_indent="  ",
            subsequent_indent="    ",
        )
    counters = model.counter_specs()
    lines.append("counters: " + (", ".join(f"{c.name} ({c.label})" for c in counters) or "none"))
    capabilities = [
        text
        for protocol, text in (
            (CachedSplit, "cached encode/decode split"),
            (QueryAttention, "attention of a query point"),
            (Trainable, "training (apformer train)"),
            (Searchable, "searchable dimensions (compression)"),
        )
        if isinstance(model, protocol)
    ]
    lines += textwrap.wrap(
        f"capabilities: {', '.join(capabilities) or 'none'}", 88, subsequent_indent="    "
    )
    normalisation = card.normalisation
    lines.append(
        f"normalisation: {normalisation.method} {normalisation.low:g} to {normalisation.high:g}"
    )
    for label, text in (
        ("description", card.description),
        ("trained on", card.training.get("data", "")),
        ("licence", card.licence),
    ):
        if text:
            lines += textwrap.wrap(
                f"{label}: {text}", 88, subsequent_indent="    ", break_on_hyphens=False
            )
    if card.made_for:
        wanted = acquisition.made_for_text(card.made_for)
        lines.append(f"made for: {wanted} scans (others get a warning)")
    if card.limits:
        lines.append("limits:")
        for limit in card.limits:
            lines += textwrap.wrap(
                limit, 88, initial_indent="  - ", subsequent_indent="    ", break_on_hyphens=False
            )
    return lines


def compact_sizes(sizes: Mapping[str, object]) -> str:
    """{'widths': [16, 32], 'layers': [{...}] * 4} as 'widths 16, 32; layers 4 x (...)'."""

    def text(value: object) -> str:
        if isinstance(value, Mapping):
            return "(" + ", ".join(f"{k} {text(v)}" for k, v in value.items()) + ")"
        if isinstance(value, list | tuple):
            if len(value) > 1 and all(v == value[0] for v in value):
                return f"{len(value)} x {text(value[0])}"
            separator = " " if any(isinstance(v, Mapping) for v in value) else ", "
            return separator.join(text(v) for v in value)
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return "; ".join(f"{key} {text(value)}" for key, value in sizes.items())


if __name__ == "__main__":
    sys.exit(main())
