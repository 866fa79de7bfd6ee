"""`apformer compress`: arguments and the run (torch loads lazily). The data options, their
checks and the reading of the data are `apformer train`'s (train.command: add_data_arguments,
check_data_arguments, load_data); the dimensions, their L1 weights and floors come from the
weights' family (`compress.capability.JointSearch`)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from napari_apformer.errors import InputError


def add_parser(subparsers) -> None:
    from napari_apformer.train.command import add_data_arguments

    parser = subparsers.add_parser(
        "compress",
        help="compress trained weights by a joint search over their searchable dimensions",
        description="From trained weights: train learnable L1 importance factors on the "
        "dimensions the family declares searchable together with the weights (one search "
        "run), keep units by one global threshold per dimension at a budget, and write a "
        "physically smaller network with the factors folded in (OUT.safetensors + OUT.json), "
        "optionally fine-tuned. Data options as for `apformer train` (use the data the "
        "weights were trained on). docs/compression.md describes the method.",
    )
    add_data_arguments(parser)
    parser.add_argument("--weights", default=None, help="shipped name or weights file (base)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="weights path without suffix")
    budget = parser.add_argument_group("budget (fractions in (0, 1])")
    budget.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="FRACTION",
        help="fraction of the units of each searched dimension kept (default 0.7 without a target)",
    )
    budget.add_argument(
        "--target-params",
        type=float,
        default=None,
        metavar="FRACTION",
        help="keep at most this fraction of the parameters (the largest common fraction of "
        "units that meets every target)",
    )
    budget.add_argument(
        "--target-flops",
        type=float,
        default=None,
        metavar="FRACTION",
        help="keep at most this fraction of the FLOPs of a pass with nothing pruned",
    )
    budget.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="DIMENSION=FRACTION",
        help="a fixed fraction for one dimension (repeatable)",
    )
    budget.add_argument(
        "--min-keep",
        action="append",
        default=[],
        metavar="DIMENSION=N",
        help="per-layer floor of one dimension (default: the family's; repeatable)",
    )
    budget.add_argument(
        "--round-to",
        type=int,
        default=1,
        help="round kept counts per layer up to a multiple of this",
    )
    search = parser.add_argument_group("search")
    search.add_argument(
        "--lambda",
        dest="lambdas",
        action="append",
        default=[],
        metavar="DIMENSION=WEIGHT",
        help="L1 weight of one dimension's factors (0: not searched; default: the family's, "
        "APFormer: head_channels 1e-4, mlp_hidden 1e-4, heads 0; MobileUtr: head_channels "
        "1e-4, mlp_hidden 1e-4; repeatable)",
    )
    search.add_argument("--search-steps", type=int, default=600)
    search.add_argument("--batch-size", type=int, default=4)
    search.add_argument("--lr", type=float, default=5e-4, help="learning rate (constant)")
    search.add_argument(
        "--factor-lr-mult", type=float, default=1.0, help="factor learning rate / weights'"
    )
    search.add_argument("--weight-decay", type=float, default=1e-5, help="weights only")
    search.add_argument("--ssa-every", type=int, default=6, help="APFormer's SSA term period")
    search.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop the search after this much time, then extract from where it got",
    )
    search.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="STATE",
        help="continue a search from its state file (OUT.search-state.pt, written as it "
        "goes), up to --search-steps in all; with all steps done, only extract (another "
        "budget or OUT)",
    )
    search.add_argument(
        "--pixel-head",
        action="store_true",
        help="add our pixel classification module (not the seed paper's design, which is "
        "unknown): a per-pixel 1x1-convolution head on the last decoder feature map whose "
        "logits are added to the network's, its last convolution at zero so the search "
        "starts from the base weights' output; trained in the search and fine-tuning, kept "
        "in the compressed network",
    )
    tune = parser.add_argument_group("fine-tuning of the extracted network")
    tune.add_argument("--finetune-steps", type=int, default=0, help="0: none")
    tune.add_argument("--finetune-steps-per-epoch", type=int, default=40)
    tune.add_argument("--finetune-lr", type=float, default=2e-4)
    tune.add_argument("--finetune-max-minutes", type=float, default=None)
    tune.add_argument("--ema", type=float, default=0.99, help="weight average when fine-tuning")
    parser.add_argument("--no-base-validation", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (0: every core)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def assignments(texts: list[str], flag: str, kind: type) -> dict:
    """['a=1', 'b=2'] -> {'a': kind('1'), ...}; InputError naming the flag."""
    out = {}
    for text in texts:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"{flag} takes NAME=VALUE, got {text!r}")
        if name in out:
            raise InputError(f"{flag}: {name} is given twice")
        try:
            out[name] = kind(value)
        except ValueError:
            raise InputError(f"{flag} {name}: not a number: {value!r}") from None
    return out


def run(args: argparse.Namespace) -> int:
    """`apformer compress`; freed memory stays in the process during the run only."""
    from napari_apformer.allocator import freed_memory_kept

    with freed_memory_kept():
        return _compress(args)


def _compress(args: argparse.Namespace) -> int:

    from napari_apformer.cli import apply_threads, check_device
    from napari_apformer.compress.budget import DEFAULT_KEEP, Budget, check_reachable
    from napari_apformer.compress.capability import joint_search
    from napari_apformer.compress.pipeline import CompressConfig, FinetuneConfig, compress
    from napari_apformer.compress.search import SearchConfig, searched_dimensions
    from napari_apformer.model.checkpoint import load_model, sha256_of
    from napari_apformer.train.command import (
        check_at_least,
        check_data_arguments,
        check_ema,
        load_data,
    )
    from napari_apformer.weights import resolve_weights

    check_data_arguments(args)
    check_device(args.device)
    apply_threads(args.threads)
    check_at_least(args, 0, "--search-steps", "--finetune-steps")
    check_at_least(args, 1, "--batch-size", "--ssa-every", "--finetune-steps-per-epoch")
    check_ema(args.ema)
    path = resolve_weights(args.weights)
    model = load_model(path)
    searchable = joint_search(model, path)
    if args.pixel_head and not hasattr(model, "add_pixel_head"):
        raise InputError(f"the {model.family} family has no pixel classification module", path)
    defaults = searchable.search_defaults()
    lambdas = {name: float(d.get("lambda", 0.0)) for name, d in defaults.items()}
    lambdas.update(assignments(args.lambdas, "--lambda", float))
    has_target = args.target_params is not None or args.target_flops is not None
    if args.budget is not None and has_target:
        raise InputError("give --budget or --target-params / --target-flops, not both")
    budget = Budget(
        keep=assignments(args.keep, "--keep", float),
        default_keep=DEFAULT_KEEP if args.budget is None else args.budget,
        max_params=args.target_params,
        max_flops=args.target_flops,
        min_keep=assignments(args.min_keep, "--min-keep", int),
        round_to=args.round_to,
    )
    budget.check(list(searchable.searchable_dimensions()))
    searched = searched_dimensions(model, lambdas)
    if not searched:
        raise InputError("nothing to search: every L1 weight is 0")
    check_reachable(model, searched, budget)  # before the data are read and the search runs
    card = model.card
    train_set, val_set, _, data_text, _ = load_data(
        args, card.normalisation, card.n_classes, model.input_rule
    )
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".search-log.csv")
    if args.resume is None and log.exists():
        log.unlink()
    base_sha = card.sha256 or sha256_of(path)
    command = "apformer " + " ".join(shlex.quote(str(a)) for a in getattr(args, "command_line", []))
    config = CompressConfig(
        out=out,
        search=SearchConfig(
            lambdas=lambdas,
            steps=args.search_steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            factor_lr_mult=args.factor_lr_mult,
            weight_decay=args.weight_decay,
            ssa_every=args.ssa_every,
            seed=args.seed,
            max_minutes=args.max_minutes,
            device=args.device,
            progress=not args.no_progress,
            log=log,
            state=out.with_suffix(".search-state.pt"),
            resume=args.resume,
            identity={
                "base weights": base_sha,
                "L1 weights": {k: v for k, v in lambdas.items() if v > 0},
                "data": data_text,
                "batch size": args.batch_size,
                "seed": args.seed,
                **({"pixel head": True} if args.pixel_head else {}),
            },
        ),
        budget=budget,
        finetune=FinetuneConfig(
            steps=args.finetune_steps,
            steps_per_epoch=args.finetune_steps_per_epoch,
            batch_size=args.batch_size,
            learning_rate=args.finetune_lr,
            ssa_every=args.ssa_every,
            ema=args.ema,
            max_minutes=args.finetune_max_minutes,
            seed=args.seed,
        ),
        evaluate_base=not args.no_base_validation,
        pixel_head=args.pixel_head,
        base_name=str(args.weights or path.stem),
        provenance={
            "command": command,
            "data": data_text,
            "training_slices": len(train_set),
            "validation_slices": len(val_set),
        },
    )
    print(f"searching on {len(train_set)} slices, validating on {len(val_set)}", flush=True)
    summary = compress(model, train_set, val_set, config)
    selection = summary.selection
    kept = ", ".join(f"{name} {selection.counts[name]}" for name in selection.keep)
    print(f"kept per layer: {kept}")
    print(
        f"parameters {selection.cost.params:,} of {selection.base.params:,} "
        f"({100 * selection.params_fraction:.1f} %), unpruned GFLOP "
        f"{selection.cost.flops / 1e9:.2f} of {selection.base.flops / 1e9:.2f} "
        f"({100 * selection.flops_fraction:.1f} %)"
    )
    dice = f"validation mean Dice: extracted {summary.extracted_dice:.4f}"
    if summary.base_dice is not None:
        dice += f", base {summary.base_dice:.4f}"
    if summary.finetuned_dice is not None:
        dice += f", fine-tuned {summary.finetuned_dice:.4f}"
    print(f"{dice}; weights in {summary.weights} ({summary.seconds / 60:.1f} min)")
    return 0
