"""`apformer train` and `apformer sweep`: arguments, data set assembly and the model card
(torch loads lazily). The model family, its settings and its input size come from the
family's declarations (model.base); training slices are prepared at the model's input size."""

from __future__ import annotations

import argparse
import math
import shlex
import time
from pathlib import Path

from napari_apformer.errors import InputError
from napari_apformer.hardware import cpu_name

# Files `apformer train -o OUT` writes beside OUT (never replaced without --overwrite)
OUTPUT_SUFFIXES = (
    ".safetensors",
    ".json",
    ".train-state.pt",
    ".train-log.csv",
    ".train-curves.png",
)


def add_train_parser(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="train weights of a model family (writes safetensors + model card)",
        description="Train on one of: the MNI152 template in the nilearn wheel (--mni152), "
        "folders images/ + masks/ of PNG/TIFF (--images), NIfTI images/ + labels/ "
        "(--nifti), or the authors' release layout img/ labelcol/ MainPatient/ (--release). "
        "Several GPUs: torchrun --nproc-per-node N -m napari_apformer.cli train ...",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        required=True,
        help="weights path without suffix, e.g. weights/my-model",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the weights, card, log, plot and state of an earlier run at OUT "
        "(default: refuse; --resume OUT.train-state.pt continues that run)",
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="class names in label order, comma separated (default: from the "
        "data set, or 'background,class 1,...')",
    )
    parser.add_argument(
        "--family",
        default=None,
        help="model family to train (default: apformer, or that of --init)",
    )
    parser.add_argument("--variant", default=None, help="the family's variant (default: its first)")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a run-time setting the weights will carry, used in training and validation "
        "(repeatable; default: the family's, or those of --init)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--ssa-every",
        type=int,
        default=1,
        help="APFormer: compute the SSA loss every n-th step (1 = every step, the spec)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this much time, validate and keep the best weights",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (0: every core)"
    )
    parser.add_argument(
        "--learnable-gates",
        action="store_true",
        help="APFormer only, beyond the release: learn the dependency gates (straight-through)",
    )
    parser.add_argument(
        "--gate-sparsity",
        type=float,
        default=0.05,
        help="APFormer: weight of the kept-dependency penalty with --learnable-gates",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="validate and save an exponential moving average of the weights (e.g. 0.99; 0 = off)",
    )
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from these weights (their family, sizes and settings); with --family, "
        "a family that extends theirs takes all their tensors (mobileutr weights for "
        "mobileutr-ap)",
    )
    parser.add_argument("--resume", type=Path, default=None, help="a .train-state.pt file")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run_train)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data options of every command that reads a labelled data set (train, compress,
    sweep): everything `load_data` reads, defined here only, so that the names, help,
    defaults and the split (the same --seed gives the same split in each) cannot drift apart.
    `check_data_arguments` checks them."""
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--mni152",
        nargs="?",
        const="installed",
        metavar="WHEEL_OR_FOLDER",
        help="the MNI152 template: a nilearn wheel, its data folder, or (no "
        "value) an installed nilearn",
    )
    data.add_argument("--images", type=Path, metavar="DIR", help="images/ + masks/ (2D)")
    data.add_argument("--nifti", type=Path, metavar="DIR", help="images/ + labels/ (NIfTI)")
    data.add_argument("--release", type=Path, metavar="DIR", help="the authors' layout")
    parser.add_argument(
        "--axes",
        default="0,1,2",
        help="NIfTI slice axes in RAS order: 0 sagittal, 1 coronal, 2 axial",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="files held out for validation (--images, --nifti)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the validation split (--images, --nifti; the same seed gives the same "
        "split in train, compress and sweep) and of the run's other random choices",
    )


def check_data_arguments(args: argparse.Namespace) -> None:
    """One line for a data option (add_data_arguments) that cannot be used, before anything
    is read."""
    if not 0 < args.val_fraction < 1:
        raise InputError(
            f"--val-fraction takes a fraction between 0 and 1 (e.g. 0.2), not {args.val_fraction}"
        )
    data_axes(args.axes)
    check_seed(args.seed)


def data_axes(text: str) -> list[int]:
    """--axes '0,1,2' -> [0, 1, 2]; InputError for anything but distinct axes 0, 1 and 2."""
    parts = [part.strip() for part in text.split(",")]
    if any(part not in ("0", "1", "2") for part in parts) or len(set(parts)) < len(parts):
        raise InputError(
            "--axes takes distinct slice axes 0, 1 or 2 separated by commas (e.g. 2 or 0,1,2), "
            f"not {text!r}"
        )
    return [int(part) for part in parts]


def add_sweep_parser(commands) -> None:
    parser = commands.add_parser(
        "sweep",
        help="Dice, GFLOP and ms per slice over a grid of run-time settings on labelled data",
        description="Segment the validation slices of a labelled data set (the same split as "
        "`apformer train` makes) at every combination of the settings given; print a table "
        "and write OUT.csv, OUT.md and OUT.png (mean Dice against GFLOP per slice). "
        "Settings are those the weights' family declares (`apformer info` lists them); "
        "without any, the weights' own settings and those under which nothing is skipped.",
    )
    add_data_arguments(parser)
    parser.add_argument("--weights", default=None, help="shipped name or weights file")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=V1;V2;...",
        help="values of one setting, separated by semicolons (quote them); a per-layer "
        "value is one number or one per layer separated by commas, e.g. "
        "--set 'gate=-2;-2,-2,-1,0' (repeatable: the grid is every combination, the last "
        "setting varying fastest and labelling the plot's points)",
    )
    parser.add_argument(
        "--thresholds",
        default=None,
        metavar="T1,T2,...",
        help="the same as --set token_threshold=T1;T2;... (APFormer), e.g. 1.0,0.9,0.7,0.5",
    )
    parser.add_argument(
        "--gates",
        default=None,
        metavar="G1,G2,...",
        help="the same as --set gate=G1;G2;... (APFormer: each value for every layer), "
        "e.g. -4,-2,0,2",
    )
    parser.add_argument("--split", choices=("val", "train", "all"), default="val")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output path, no suffix")
    parser.add_argument("--threads", type=int, default=None)
    parser.set_defaults(run=run_sweep)


# Sweep flags users already know: each is a list of single values of one setting.
SWEEP_ALIASES = {"--gates": "gate", "--thresholds": "token_threshold"}


def sweep_axes(args: argparse.Namespace, model) -> dict[str, list[object]]:
    """Setting name -> the values to sweep, from --set and the alias flags (aliases last, the
    thresholds fastest); every grid point checked against the model."""
    from napari_apformer.cli import check_known_settings, parse_setting_value, split_assignment
    from napari_apformer.train.sweep import grid

    axes: dict[str, list[object]] = {}
    flags: dict[str, tuple[str, object]] = {}
    for text in args.settings:
        name, values = split_assignment(text)
        flags.setdefault(name, (f"--set {name}", None))
        if name in axes:
            raise InputError(f"setting {name} is given twice")
        axes[name] = [parse_setting_value(v) for v in values.split(";") if v.strip()]
    for flag, name in SWEEP_ALIASES.items():
        text = getattr(args, flag[2:])
        if text is None:
            continue
        if name in axes:
            raise InputError(f"setting {name} is given twice ({flags[name][0]} and {flag})")
        flags[name] = (flag, None)
        axes[name] = [v.strip() for v in text.split(",") if v.strip()]
    check_known_settings(model, flags)
    for name, values in axes.items():
        if not values:
            raise InputError(f"{flags[name][0]}: no values given")
    for point in grid(axes):
        model.resolve_settings(point)
    return axes


def run_sweep(args: argparse.Namespace) -> int:

    from napari_apformer.cli import apply_threads
    from napari_apformer.model.checkpoint import load_model
    from napari_apformer.train import sweep
    from napari_apformer.train.datasets import SliceSet
    from napari_apformer.weights import resolve_weights

    check_data_arguments(args)
    apply_threads(args.threads)
    model = load_model(resolve_weights(args.weights))
    axes = sweep_axes(args, model)
    if axes:
        points = sweep.grid(axes)
    else:  # the weights' own settings and unpruned; one row for a family without settings
        points = [{}, model.unpruned_settings()] if model.settings() else [{}]
    card = model.card
    train_set, val_set, _, data_text, _ = load_data(
        args, card.normalisation, card.n_classes, model.input_rule
    )
    data = {"val": val_set, "train": train_set, "all": SliceSet.join([train_set, val_set])}[
        args.split
    ]
    if len(data) == 0:
        raise InputError(f"no {args.split} slices to sweep")
    rows = sweep.sweep(model, data, points)
    names = [c.name for c in card.classes]
    text = sweep.table(rows, names, model)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sweep.write_csv(rows, names, args.out.with_suffix(".csv"))
    header = (
        f"Weights `{card.name}` ({model.family}), {len(data)} {args.split} slices of "
        f"{data_text}.\n\n"
        f"Command: `apformer {' '.join(str(a) for a in args.command_line)}`\n\n"
    )
    args.out.with_suffix(".md").write_text(header + text + "\n", "utf-8")
    sweep.plot(
        rows,
        args.out.with_suffix(".png"),
        f"{card.name}: {len(data)} {args.split} slices",
        list(axes),
    )
    return 0


def run_train(args: argparse.Namespace) -> int:
    """`apformer train`; freed memory stays in the process during the run only."""
    from napari_apformer.allocator import freed_memory_kept

    with freed_memory_kept():
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    import torch

    from napari_apformer.cli import apply_threads, check_device, given_settings
    from napari_apformer.model.card import DEFAULT_COLOURS, ClassInfo, ModelCard, Normalisation
    from napari_apformer.train.loop import TrainConfig, train

    check_train_arguments(args)
    check_device(args.device)
    check_outputs(args)
    if args.resume is not None:
        check_resume_file(args.resume)
    apply_threads(args.threads)
    normalisation = Normalisation()
    started = time.perf_counter()
    given = given_settings(args)
    family, rule = _family_and_rule(args, given)
    settings = {name: value for name, (_, value) in given.items()}
    declared = [n.strip() for n in args.classes.split(",")] if args.classes else None
    train_set, val_set, default_classes, data_text, licence = load_data(
        args, normalisation, len(declared) if declared else 256, rule
    )
    names = declared or [c["name"] for c in default_classes]
    top = int(max(train_set.masks.max(), val_set.masks.max())) if len(train_set) else 0
    if len(names) <= top:
        raise InputError(f"the masks hold label {top} but only {len(names)} class names were given")
    colours = {c["value"]: c["colour"] for c in default_classes}
    card = ModelCard(
        name=args.out.name,
        in_channels=int(train_set.images.shape[1]) if len(train_set) else 1,
        classes=[
            ClassInfo(k, n, colours.get(k, DEFAULT_COLOURS[k % len(DEFAULT_COLOURS)]))
            for k, n in enumerate(names)
        ],
        normalisation=normalisation,
        architecture={
            key: value
            for key, value in (("family", args.family), ("variant", args.variant))
            if value is not None
        },
        settings=settings,
        description=f"{family} weights trained with `apformer train` on {data_text}.",
        training={
            "command": "apformer " + " ".join(shlex.quote(str(a)) for a in args.command_line),
            "data": data_text,
            "training_slices": len(train_set),
            "validation_slices": len(val_set),
            "hardware": f"{cpu_name()}, {torch.get_num_threads()} torch threads, "
            f"device {args.device}"
            + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
            "torch": torch.__version__,
        },
        licence=licence,
        # the MNI152 template is a T1-weighted MR image; other data states nothing here
        made_for={"modality": "MR", "contrasts": ["T1w"]} if args.mni152 is not None else {},
    )
    print(f"training on {len(train_set)} slices, validating on {len(val_set)}", flush=True)
    config = TrainConfig(
        out=args.out,
        card=card,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        ssa_every=args.ssa_every,
        steps_per_epoch=args.steps_per_epoch,
        max_minutes=args.max_minutes,
        device=args.device,
        learnable_gates=args.learnable_gates,
        gate_sparsity=args.gate_sparsity,
        ema=args.ema,
        resume=args.resume,
        init=args.init,
        progress=not args.no_progress,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = train(train_set, val_set, config)
    except KeyboardInterrupt as error:
        error.report = _interrupted_report(error, args.out)
        raise
    _record_wall_time(args.out, time.perf_counter() - started, summary)
    weights = args.out.with_suffix(".safetensors")
    if summary.best is not None:
        pairs = zip(card.classes[1:], summary.best.dice[1:], strict=True)
        dice = ", ".join(f"{c.name} {d:.3f}" for c, d in pairs)
        print(f"best validation Dice: {dice}; weights in {weights}")
    else:
        print(f"no epoch of this run beat the best so far; the weights in {weights} stay")
    return 0


def check_at_least(args: argparse.Namespace, minimum: int, *options: str) -> None:
    """One line for the first of `options` (as typed: "--batch-size") below `minimum`;
    an option left unset (None) passes. The one check train, compress and finetune share."""
    for option in options:
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None and value < minimum:
            raise InputError(f"{option} must be at least {minimum}, not {value}")


def check_ema(ema: float) -> None:
    if not 0 <= ema < 1:  # NaN fails this too
        raise InputError(f"--ema takes a decay from 0 (off) up to, not including, 1, not {ema}")


def check_seed(seed: int) -> None:
    if seed < 0:
        raise InputError(f"--seed takes 0 or more, not {seed}")


def check_train_arguments(args: argparse.Namespace) -> None:
    """One line for each number that training cannot use, before anything is read."""
    check_at_least(args, 1, "--epochs", "--batch-size", "--ssa-every", "--steps-per-epoch")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr takes a learning rate above 0, such as 1e-3, not {args.lr}")
    check_ema(args.ema)
    if not (math.isfinite(args.gate_sparsity) and args.gate_sparsity >= 0):
        raise InputError(f"--gate-sparsity takes a weight of 0 or more, not {args.gate_sparsity}")
    if args.max_minutes is not None and not (
        math.isfinite(args.max_minutes) and args.max_minutes > 0
    ):
        raise InputError(f"--max-minutes takes a time above 0, not {args.max_minutes}")
    check_data_arguments(args)


def check_outputs(args: argparse.Namespace) -> None:
    """Never replace an earlier run's weights (or its card, log, plot, state) without
    --overwrite; --resume from OUT's own state continues that run and replaces them."""
    from napari_apformer.io.files import same_file

    if args.overwrite:
        return
    existing = [args.out.with_suffix(s) for s in OUTPUT_SUFFIXES]
    existing = [p for p in existing if p.exists()]
    state = args.out.with_suffix(".train-state.pt")
    if not existing or (args.resume is not None and same_file(args.resume, state)):
        return
    more = f" (and {len(existing) - 1} more file(s) of that run)" if len(existing) > 1 else ""
    resume = f", --resume {state} continues that run" if state.exists() else ""
    raise InputError(
        f"{existing[0]} exists{more}; --overwrite replaces it{resume}, or choose another -o"
    )


def check_resume_file(path: Path) -> dict:
    """The training state saved by `apformer train` (OUT.train-state.pt); InputError for
    anything else, weights included (those are for --init)."""
    from napari_apformer.train.loop import read_state

    return read_state(path)


def _interrupted_report(error: BaseException, out: Path) -> str:
    """What an interrupted training run left: files are replaced whole, and the weights and
    their card together, so what is there is the best epoch's pair so far."""
    from napari_apformer.cli import interruption

    weights, state = out.with_suffix(".safetensors"), out.with_suffix(".train-state.pt")
    left = []
    if weights.is_file():
        left.append(f"the weights in {weights} (with their card) are complete")
    if state.is_file():
        left.append(f"--resume {state} continues from the last finished epoch")
    return f"{interruption(error)} during training; " + (
        "; ".join(left) if left else "no weights were written"
    )


def refuse_shared_stems(folder: Path, suffixes: tuple[str, ...]) -> None:
    """InputError naming the files when two in `folder` have one name but for the suffix
    (case0.png and case0.tif): images and masks are paired by name, so one would be dropped."""
    from napari_apformer.io.files import compound_suffix, stem_of

    if not folder.is_dir():
        return  # folder_pairs says so
    by_stem: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and compound_suffix(path) in suffixes:
            by_stem.setdefault(stem_of(path), []).append(path.name)
    shared = [names for names in by_stem.values() if len(names) > 1]
    if shared:
        listed = "; ".join(" and ".join(names) for names in shared[:5])
        raise InputError(
            f"files of one name in {folder.name}/: {listed}; images and masks are paired by "
            "name, so keep one of each",
            folder.parent,
        )


def _family_and_rule(args: argparse.Namespace, given: dict):
    """The family to train and its input rule, before the data (whose slices take that size)
    are read: from --init's weights, or from the family's sizes (built here, then dropped).
    The settings given are checked against it."""
    from napari_apformer.cli import check_known_settings
    from napari_apformer.model.base import Trainable, build_model
    from napari_apformer.train.loop import DEFAULT_FAMILY

    if args.init is not None:
        from napari_apformer.model.checkpoint import grow_model, load_model

        model = load_model(args.init)
        if args.family is not None and args.family != model.family:
            model = grow_model(model, args.family, args.init)
        named = len(args.classes.split(",")) if args.classes else None
        if named is not None and named != model.n_classes:
            raise InputError(
                f"these weights have {model.n_classes} classes, --classes names {named}; "
                "fine-tuning keeps the classes of the weights it starts from",
                args.init,
            )
    elif args.resume is not None and (
        recorded := check_resume_file(args.resume).get("architecture")
    ):
        family = args.family or recorded["family"]
        sizes = recorded.get("sizes") if family == recorded["family"] else None
        model = build_model(family, 1, 2, args.variant or recorded.get("variant"), sizes)
    else:
        model = build_model(args.family or DEFAULT_FAMILY, 1, 2, args.variant)
    if not isinstance(model, Trainable):
        raise InputError(f"the {model.family} family declares no training losses")
    if args.learnable_gates and not hasattr(model, "set_learnable_gates"):
        raise InputError(f"--learnable-gates: the {model.family} family has no gates to learn")
    check_known_settings(model, given)
    model.resolve_settings({name: value for name, (_, value) in given.items()})
    return model.family, model.input_rule


def load_data(args: argparse.Namespace, normalisation, n_classes: int, rule=None):
    """(train, validation, default class table, data description, licence); slices are
    prepared for a model of input rule `rule` (datasets.training_rule)."""
    from napari_apformer.train import datasets, mni152

    if args.mni152 is not None:
        source = None if args.mni152 == "installed" else Path(args.mni152)
        train_set, val_set = mni152.dataset(source, normalisation, rule)
        return train_set, val_set, mni152.CLASSES, mni152.DATA_TEXT, mni152.LICENCE_TEXT
    axes = data_axes(args.axes)
    options = {
        "in_channels": 1,
        "normalisation": normalisation,
        "n_classes": n_classes,
        "rule": rule,
    }
    if args.release is not None:
        train_set = datasets.release_split(args.release, "train", **options)
        val_set = datasets.release_split(args.release, "val", **options)
        text = f"the authors' layout in {args.release.name}"
    else:
        root = args.images or args.nifti
        suffixes = datasets.IMAGE_SUFFIXES if args.images is not None else datasets.NIFTI_SUFFIXES
        for sub in ("images", "masks" if args.images is not None else "labels"):
            refuse_shared_stems(root / sub, suffixes)
        if args.images is not None:
            pairs = datasets.folder_pairs(root, "images", "masks", datasets.IMAGE_SUFFIXES)
        else:
            pairs = datasets.folder_pairs(root, "images", "labels", datasets.NIFTI_SUFFIXES)
        train_pairs, val_pairs = datasets.split_pairs(pairs, args.val_fraction, args.seed)
        load = {"axes": axes if args.nifti is not None else (0,), **options}
        train_set = datasets.load_pairs(train_pairs, **load)
        val_set = datasets.load_pairs(val_pairs, **load)
        text = f"{len(pairs)} image/mask pairs in {root.name}"
    top = max(int(s.masks.max()) if len(s) else 0 for s in (train_set, val_set))
    from napari_apformer.model.card import ModelCard

    classes = ModelCard.generic("", 1, top + 1).class_table()
    return train_set, val_set, classes, text, "the data set's own licence (not recorded)"


def _record_wall_time(out: Path, seconds: float, summary) -> None:
    """Put the whole run's wall time into the card of the best weights."""
    from napari_apformer.io.files import write_atomically
    from napari_apformer.model.card import ModelCard

    card_path = out.with_suffix(".json")
    if not card_path.is_file():
        return
    card = ModelCard.read(card_path)
    card.training["wall_seconds"] = round(seconds, 1)
    card.training["epochs_run"] = summary.epochs
    card.training["steps_run"] = summary.steps
    card.training["stopped_by_time_limit"] = summary.stopped_early
    text = card.to_json()
    write_atomically(card_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
