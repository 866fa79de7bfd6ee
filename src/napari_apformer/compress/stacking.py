"""Does compression stack with token pruning? Two `apformer sweep` CSVs, one of the base
weights and one of their compressed version, each over the same run-time settings, as one
figure: mean Dice against GFLOP per slice and against wall ms per slice (issue 15, item 3).

Every row is one of four kinds: the base weights with nothing pruned (the reference), token
pruning only (base weights, pruned settings), compression only (compressed weights, settings
that prune nothing) and both (compressed weights, pruned settings). "Prunes nothing" means
the row's settings equal `unpruned` (APFormer: token_threshold 1, whatever the gate: the
dependency gate removes no FLOPs). `docs/make_compression_plot.py` is the command.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from napari_apformer.errors import InputError

BASE_UNPRUNED = "base, nothing pruned"
TOKEN_PRUNING = "token pruning only"
COMPRESSION = "compression only"
BOTH = "compression and token pruning"
KINDS = (BASE_UNPRUNED, TOKEN_PRUNING, COMPRESSION, BOTH)
UNPRUNED = {"token_threshold": "1"}  # APFormer's settings under which nothing is skipped
COLUMNS = ("mean_foreground_dice", "gflops_per_slice", "wall_ms_per_slice")


@dataclass
class Point:
    kind: str
    weights: str  # which CSV: "base" or "compressed"
    settings: dict[str, str]
    dice: float
    gflops: float
    ms: float
    timing: str  # where the ms were measured


def _same_value(text: str, wanted: str) -> bool:
    """'1.0' equals '1'; per-layer values ('1/1') compare part by part."""
    parts, wanted_parts = text.split("/"), wanted.split("/")
    if len(wanted_parts) == 1:
        wanted_parts = wanted_parts * len(parts)
    if len(parts) != len(wanted_parts):
        return False
    for a, b in zip(parts, wanted_parts, strict=True):
        try:
            if float(a) != float(b):
                return False
        except ValueError:
            if a.strip() != b.strip():
                return False
    return True


def read_sweep(path: Path, compressed: bool, unpruned: Mapping[str, str] = UNPRUNED) -> list[Point]:
    """The rows of one sweep CSV as points; InputError naming the file if it is not one."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read this sweep CSV ({error})", path) from None
    if not rows:
        raise InputError("this sweep CSV has no rows", path)
    header = list(rows[0])
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        hint = " (written before sweeps timed their rows: run apformer sweep again)"
        raise InputError(
            f"not an apformer sweep CSV with timings: no column {', '.join(missing)}"
            + (hint if missing == ["wall_ms_per_slice"] else ""),
            path,
        )
    first_dice = next((i for i, c in enumerate(header) if c.startswith("dice_")), len(header))
    setting_names = header[:first_dice]
    absent = [name for name in unpruned if name not in setting_names]
    if absent:
        raise InputError(
            f"no setting {', '.join(absent)} in this sweep (its settings: "
            f"{', '.join(setting_names) or 'none'}), so it cannot tell pruned rows from "
            "unpruned ones",
            path,
        )
    points = []
    for number, row in enumerate(rows, start=2):
        try:
            dice, gflops, ms = (float(row[c]) for c in COLUMNS)
        except (TypeError, ValueError):
            raise InputError(f"line {number}: a value that is not a number", path) from None
        if not all(math.isfinite(v) for v in (dice, gflops, ms)):
            raise InputError(f"line {number}: a value that is not finite", path)
        settings = {name: row[name] for name in setting_names}
        plain = all(_same_value(settings[n], v) for n, v in unpruned.items())
        if compressed:
            kind = COMPRESSION if plain else BOTH
        else:
            kind = BASE_UNPRUNED if plain else TOKEN_PRUNING
        timing = (
            f"{row.get('machine') or '?'}, {row.get('threads') or '?'} torch threads, "
            f"{row.get('device') or '?'}"
        )
        points.append(
            Point(kind, "compressed" if compressed else "base", settings, dice, gflops, ms, timing)
        )
    return points


def classify(
    base: Path, compressed: Path, unpruned: Mapping[str, str] = UNPRUNED
) -> dict[str, list[Point]]:
    """Kind -> points, from the base weights' sweep and the compressed weights' sweep."""
    points = read_sweep(base, False, unpruned) + read_sweep(compressed, True, unpruned)
    grouped: dict[str, list[Point]] = {kind: [] for kind in KINDS}
    for point in points:
        grouped[point.kind].append(point)
    if not grouped[BASE_UNPRUNED]:
        names = ", ".join(f"{k} {v}" for k, v in unpruned.items())
        raise InputError(f"no row of the base weights' sweep has {names}: add it", base)
    return grouped


def table(grouped: Mapping[str, Sequence[Point]]) -> str:
    """Markdown: one line per point, kinds in order, against the base unpruned point."""
    reference = grouped[BASE_UNPRUNED][0]
    names = list(reference.settings)
    lines = [
        "| kind | " + " | ".join(names) + " | mean Dice | GFLOP per slice | ms per slice | "
        "GFLOP vs base | ms vs base |",
        "|---|" + "---|" * (len(names) + 5),
    ]
    for kind in KINDS:
        for p in sorted(grouped[kind], key=lambda p: -p.gflops):
            lines.append(
                f"| {kind} | "
                + " | ".join(p.settings.get(n, "") for n in names)
                + f" | {p.dice:.4f} | {p.gflops:.2f} | {p.ms:.0f} | "
                f"{100 * p.gflops / reference.gflops:.0f} % | "
                f"{100 * p.ms / reference.ms:.0f} % |"
            )
    timings = sorted({p.timing for points in grouped.values() for p in points})
    lines += ["", "ms per slice: wall time of `apformer sweep` on " + "; ".join(timings) + "."]
    if len(timings) > 1:
        lines.append("The two sweeps were timed on different set-ups: compare their ms with care.")
    return "\n".join(lines)


STYLE = {
    BASE_UNPRUNED: {"marker": "*", "s": 160, "color": "black"},
    TOKEN_PRUNING: {"marker": "o", "s": 36, "color": "tab:blue"},
    COMPRESSION: {"marker": "s", "s": 50, "color": "tab:orange"},
    BOTH: {"marker": "^", "s": 44, "color": "tab:green"},
}


def plot(grouped: Mapping[str, Sequence[Point]], path: Path, title: str = "") -> None:
    """Two panels: mean Dice against GFLOP per slice and against ms per slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    timings = sorted({p.timing for points in grouped.values() for p in points})
    for ax, attribute, label in (
        (axes[0], "gflops", "GFLOP per slice"),
        (axes[1], "ms", "ms per slice (wall time: " + "; ".join(timings) + ")"),
    ):
        for kind in KINDS:
            points = grouped.get(kind, [])
            if points:
                ax.scatter(
                    [getattr(p, attribute) for p in points],
                    [p.dice for p in points],
                    label=f"{kind} ({len(points)})",
                    zorder=3 if kind == BASE_UNPRUNED else 2,
                    **STYLE[kind],
                )
        ax.set_xlabel(label, fontsize=8 if attribute == "ms" else 10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice (foreground classes)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
