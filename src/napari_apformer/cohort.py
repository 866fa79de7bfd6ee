"""Many files in one run: shards for parallel or array jobs, per-file statistics, their CSV.

Each file's statistics also go into its label sidecar (`<name>_seg.json`, key "statistics"),
so a rerun that skips finished outputs still lists them in full. The sidecar also records the
SHA-256 of the label file it was written with (key "labels_file"), so that a rerun can tell a
finished output from labels that were replaced after their sidecar (an interrupted
`--overwrite` run, or labels edited by hand): `existing_output`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_apformer.io.files import write_atomically
from napari_apformer.io.formats import class_table_path

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
GENERATOR = "napari-apformer"  # the sidecar's "generator" begins with this
# Spreadsheets run a cell that begins with one of these as a formula (OWASP, CSV injection)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
MAX_SIDECAR_BYTES = 16 * 2**20  # a sidecar of ours is a few kB
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
        "gflops": None if stats.gflops is None else round(stats.gflops, 3),  # None: not counted
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def labels_record(labels_path: Path) -> dict:
    """What a sidecar records of the label file written with it (`labels_file`)."""
    return {"sha256": file_sha256(labels_path), "bytes": labels_path.stat().st_size}


def read_sidecar(labels_path: Path) -> tuple[dict | None, str]:
    """(the JSON object in the sidecar of `labels_path`, "") or (None, why not: "" when there
    is no sidecar). Never raises: bad JSON, nesting too deep, a file too big or not an object
    are reasons."""
    path = class_table_path(labels_path)
    try:
        if not path.is_file():
            return None, ""
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            return None, f"{path.stat().st_size} bytes, not a sidecar of ours"
        found = json.loads(path.read_text("utf-8"))
    except RecursionError:
        return None, "not readable JSON (nested too deeply)"
    except (OSError, ValueError) as error:
        return None, f"not readable JSON ({' '.join(str(error).split())[:120]})"
    if not isinstance(found, dict):
        return None, "not a JSON object"
    return found, ""


def is_ours(table: Mapping | None) -> bool:
    """Whether a sidecar was written by this program: `apformer predict` names itself in
    "generator"; the napari writer (and older versions) write a class table, a "labels" list
    of entries with a value, a name and a colour, which is what the napari reader reads."""
    if not isinstance(table, Mapping):
        return False
    generator = table.get("generator")
    if isinstance(generator, str):
        return generator.startswith(GENERATOR)
    entries = table.get("labels")
    return (
        isinstance(entries, list)
        and bool(entries)
        and all(isinstance(e, Mapping) and {"value", "name", "colour"} <= set(e) for e in entries)
    )


def sidecar_blocker(labels_path: Path) -> str | None:
    """Why the sidecar of `labels_path` must not be written: a file there that this program
    did not write (a BIDS sidecar, say) is never replaced, not even with --overwrite."""
    path = class_table_path(labels_path)
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        return f"{path}: exists and is not a file; choose another output name"
    table, _ = read_sidecar(labels_path)
    if is_ours(table):
        return None
    return (
        f"{path}: exists and was not written by apformer (a BIDS sidecar?); it is never "
        "replaced: choose another output name"
    )


@dataclass
class Existing:
    """An output that exists, as a rerun without --overwrite finds it."""

    statistics: dict | None  # from its sidecar, when the pair checks out
    problem: str  # "" unless its sidecar is unreadable or does not match it: why


def existing_output(labels_path: Path) -> Existing:
    """Check an existing label file against its sidecar. Labels without a sidecar of ours
    (a file of the user's, or one of an older version) have no statistics and no problem.
    Never raises."""
    table, problem = read_sidecar(labels_path)
    sidecar = class_table_path(labels_path)
    if table is None:
        return Existing(None, f"{sidecar}: {problem}" if problem else "")
    if not is_ours(table):
        return Existing(None, "")
    record = table.get("labels_file")
    if record is not None:
        try:
            matches = isinstance(record, Mapping) and record.get("sha256") == file_sha256(
                labels_path
            )
        except OSError as error:
            return Existing(None, f"cannot read it ({error.strerror or error})")
        if not matches:
            return Existing(
                None,
                f"it does not match its sidecar {sidecar.name} (an interrupted --overwrite "
                "run, or labels edited since)",
            )
    statistics = table.get("statistics")
    return Existing(statistics if isinstance(statistics, dict) else None, "")


def stored_statistics(labels_path: Path) -> dict | None:
    """The statistics in an existing output's sidecar, if it has them and matches it."""
    return existing_output(labels_path).statistics


def spreadsheet_safe(value: object) -> object:
    """A CSV cell that no spreadsheet runs as a formula: text that begins with =, +, -, @, a
    tab or a carriage return gets a leading apostrophe (as OWASP recommends); numbers stay."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _cell(value: object) -> object:
    """A value from a sidecar as a cell: numbers and text as they are, anything else empty."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int | float | str):
        return value
    return ""


def _mapping(value: object) -> Mapping:
    return value if isinstance(value, Mapping) else {}


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
        statistics = _mapping(statistics)  # read from a sidecar: any JSON at all
        row["slices"] = _cell(statistics.get("slices", ""))
        fractions = statistics.get("counters")
        for name in self.counters:
            column = counter_column(name)
            if isinstance(fractions, Mapping):
                fraction = fractions.get(name)
                row[column] = (
                    round(100 * fraction, 2)
                    if isinstance(fraction, int | float) and not isinstance(fraction, bool)
                    else ""
                )
            else:  # a sidecar written before the counters were named by the model
                row[column] = _cell(statistics.get(column, ""))
        row.update({key: _cell(statistics.get(key, "")) for key in COST_COLUMNS})
        volumes = _mapping(statistics.get("volumes_ml"))
        voxels = _mapping(statistics.get("voxels"))
        for name in self.class_names:
            row[f"{name} (ml)"] = _cell(volumes.get(name, ""))
            row[f"{name} (voxels)"] = _cell(voxels.get(name, ""))
        self.rows.append(row)

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)

    def write(self, path: Path) -> None:
        """The CSV, every text cell (file names, messages, class names in the header) safe
        to open in a spreadsheet."""
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        columns = self.columns
        writer.writerow([spreadsheet_safe(c) for c in columns])
        for row in self.rows:
            writer.writerow([spreadsheet_safe(row.get(c, "")) for c in columns])
        write_atomically(path, lambda tmp: tmp.write_text(text.getvalue(), "utf-8"))


def default_table_path(output: Path, shard: tuple[int, int] | None) -> Path:
    name = (
        "apformer-stats.csv"
        if shard is None
        else (f"apformer-stats.shard-{shard[0]}-of-{shard[1]}.csv")
    )
    return output / name
