"""Many files in one run: shards for parallel or array jobs, per-file statistics, their CSV.

Each file's statistics also go into its label sidecar (`<name>_seg.json`, key "statistics"),
so a rerun that skips finished outputs still lists them in full.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_apformer.io.files import write_atomically
from napari_apformer.io.formats import class_table_path

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
# Per file, before the model's counters (one column NAME_percent each) and after them; the
# classes' sizes follow.
LEADING_COLUMNS = ("input", "output", "status", "message", "slices")
COST_COLUMNS = ("gflops", "gflops_unpruned", "seconds", "ms_per_slice", "device")


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' with 0 <= i < n: this process takes files i, i + n, i + 2n, ... (sorted)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n such as 0/4, not {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {text}: need 0 <= i < n (0-based)")
    return index, count


def take_shard(files: Sequence[Path], shard: tuple[int, int] | None) -> list[Path]:
    if shard is None:
        return list(files)
    index, count = shard
    return sorted(files)[index::count]


def statistics_of(result, class_names: Sequence[str], voxel_mm3: float | None) -> dict:
    """What a run did to one file, JSON-ready: the model's counters as fractions under their
    names (None where nothing was counted), cost, time and per-class sizes."""
    stats = result.stats
    counts = np.bincount(result.labels.ravel(), minlength=len(class_names))
    voxels = {name: int(counts[k]) for k, name in enumerate(class_names)}
    return {
        "slices": stats.slices,
        "counters": {name: counter_fraction(stats, name) for name in stats.labels},
        "gflops": round(stats.gflops, 3),
        "gflops_unpruned": round(stats.gflops_unpruned, 3),
        "seconds": round(stats.seconds, 3),
        "ms_per_slice": round(stats.ms_per_slice, 1),
        "device": stats.device,
        "voxels": voxels,
        "volumes_ml": (
            {name: round(n * voxel_mm3 / 1000, 3) for name, n in voxels.items()}
            if voxel_mm3
            else None
        ),
    }


def counter_fraction(stats, name: str) -> float | None:
    """count / out of, summed over the run's slices; None when it is out of nothing."""
    count, total = stats.counters.get(name, (0, 0))
    return round(count / total, 6) if total else None


def counter_column(name: str) -> str:
    return f"{name}_percent"


def voxel_volume_mm3(spacing: Sequence[float] | None, is_nifti: bool) -> float | None:
    """Only NIfTI spacings are trusted to be millimetres."""
    if not is_nifti or not spacing:
        return None
    volume = math.prod(abs(float(s)) for s in spacing)
    return volume if math.isfinite(volume) and volume > 0 else None


def stored_statistics(labels_path: Path) -> dict | None:
    """The statistics in an existing output's sidecar, if it has them."""
    try:
        found = json.loads(class_table_path(labels_path).read_text("utf-8")).get("statistics")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, dict) else None


class StatisticsTable:
    """One row per input file; written as CSV (atomically) when the run ends. The columns
    after `slices` come from the counters the model declares (`counters`: their names), as
    percentages."""

    def __init__(self, class_names: Sequence[str], counters: Sequence[str] = ()) -> None:
        self.class_names = list(class_names)
        self.counters = list(counters)
        self.rows: list[dict] = []

    @property
    def columns(self) -> list[str]:
        return [
            *LEADING_COLUMNS,
            *(counter_column(name) for name in self.counters),
            *COST_COLUMNS,
            *(f"{name} ({unit})" for name in self.class_names for unit in ("ml", "voxels")),
        ]

    def add(
        self,
        source: Path,
        target: Path,
        status: str,
        message: str = "",
        statistics: dict | None = None,
    ) -> None:
        row: dict = {"input": str(source), "output": str(target), "status": status}
        row["message"] = message
        statistics = statistics or {}
        row["slices"] = statistics.get("slices", "")
        fractions = statistics.get("counters")
        for name in self.counters:
            column = counter_column(name)
            if isinstance(fractions, dict):
                fraction = fractions.get(name)
                row[column] = "" if fraction is None else round(100 * fraction, 2)
            else:  # a sidecar written before the counters were named by the model
                row[column] = statistics.get(column, "")
        row.update({key: statistics.get(key, "") for key in COST_COLUMNS})
        volumes = statistics.get("volumes_ml") or {}
        voxels = statistics.get("voxels") or {}
        for name in self.class_names:
            row[f"{name} (ml)"] = volumes.get(name, "")
            row[f"{name} (voxels)"] = voxels.get(name, "")
        self.rows.append(row)

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)

    def write(self, path: Path) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomically(path, lambda tmp: tmp.write_text(text.getvalue(), "utf-8"))


def default_table_path(output: Path, shard: tuple[int, int] | None) -> Path:
    name = (
        "apformer-stats.csv"
        if shard is None
        else (f"apformer-stats.shard-{shard[0]}-of-{shard[1]}.csv")
    )
    return output / name
