"""The stacking figure (docs/make_compression_plot.py): rows of two sweeps sorted into base
unpruned, token pruning only, compression only and both; bad CSVs named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from napari_apformer.compress.stacking import (
    BASE_UNPRUNED,
    BOTH,
    COMPRESSION,
    TOKEN_PRUNING,
    classify,
    table,
)
from napari_apformer.errors import InputError

HEADER = (
    "token_threshold,gate,dice_background,dice_a,mean_foreground_dice,kept_tokens,"
    "gflops_per_slice,wall_ms_per_slice,threads,device,machine\n"
)


def write(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text(header + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def sweeps(tmp_path):
    base = write(
        tmp_path / "base.csv",
        [
            "1,-2,0.99,0.90,0.90,1.0,21.3,300.0,2,cpu,Test CPU",
            "0.9,-2,0.99,0.91,0.91,0.4,12.5,210.0,2,cpu,Test CPU",
            "0.5,-2,0.99,0.89,0.89,0.3,11.0,190.0,2,cpu,Test CPU",
        ],
    )
    slim = write(
        tmp_path / "slim.csv",
        [
            "1.0,-2,0.99,0.895,0.895,1.0,14.9,240.0,2,cpu,Test CPU",
            "0.9,-2/-2,0.99,0.90,0.90,0.4,9.0,170.0,2,cpu,Test CPU",
        ],
    )
    return base, slim


def test_rows_are_sorted_into_the_four_kinds(sweeps):
    grouped = classify(*sweeps)
    summary = {
        k: sorted((p.settings["token_threshold"], p.gflops) for p in v) for k, v in grouped.items()
    }
    assert summary == {
        BASE_UNPRUNED: [("1", 21.3)],
        TOKEN_PRUNING: [("0.5", 11.0), ("0.9", 12.5)],
        COMPRESSION: [("1.0", 14.9)],  # 1.0 and 1 both prune nothing
        BOTH: [("0.9", 9.0)],
    }
    assert {p.weights for p in grouped[BOTH]} == {"compressed"}
    text = table(grouped)
    assert "| compression only | 1.0 | -2 | 0.8950 | 14.90 | 240 | 70 % | 80 % |" in text
    assert "wall time of `apformer sweep` on Test CPU, 2 torch threads, cpu." in text


def test_another_unpruned_rule(sweeps):
    grouped = classify(*sweeps, unpruned={"token_threshold": "0.9", "gate": "-2"})
    assert [p.gflops for p in grouped[BASE_UNPRUNED]] == [12.5]
    assert [p.gflops for p in grouped[COMPRESSION]] == [9.0]  # per-layer -2/-2 equals -2


def test_bad_sweeps_are_named(tmp_path, sweeps):
    base, slim = sweeps
    old = write(
        tmp_path / "old.csv", ["1,-2,0.99,0.9,0.9,1.0,21.3"], HEADER.split(",wall")[0] + "\n"
    )
    with pytest.raises(
        InputError, match=r"old\.csv.*no column wall_ms_per_slice.*run apformer sweep"
    ):
        classify(old, slim)
    no_base_point = write(tmp_path / "pruned.csv", ["0.9,-2,0.99,0.9,0.9,0.4,12.5,200,2,cpu,X"])
    with pytest.raises(InputError, match=r"pruned\.csv: no row .* token_threshold 1"):
        classify(no_base_point, slim)
    with pytest.raises(InputError, match="no setting dropout"):
        classify(base, slim, unpruned={"dropout": "0"})
    broken = write(tmp_path / "nan.csv", ["1,-2,0.99,0.9,x,1.0,21.3,300,2,cpu,X"])
    with pytest.raises(InputError, match=r"nan\.csv: line 2: a value that is not a number"):
        classify(base, broken)
    with pytest.raises(InputError, match=r"missing\.csv: cannot read"):
        classify(tmp_path / "missing.csv", slim)


def test_the_script_writes_the_figure_and_table(tmp_path, sweeps, capsys):
    script = Path(__file__).parents[1] / "docs" / "make_compression_plot.py"
    spec = importlib.util.spec_from_file_location("make_compression_plot", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fig" / "stack.png"
    assert module.main([*map(str, sweeps), "-o", str(out)]) == 0
    assert out.stat().st_size > 0
    assert "| token pruning only | 0.9 |" in out.with_suffix(".md").read_text()
    assert "| base, nothing pruned | 1 |" in capsys.readouterr().out
    assert module.main([str(tmp_path / "none.csv"), str(sweeps[1]), "-o", str(out)]) == 1
    assert "none.csv: cannot read" in capsys.readouterr().err
