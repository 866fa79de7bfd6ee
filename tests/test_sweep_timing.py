"""`apformer sweep` times each row: wall ms per slice of the model's passes, with where it
was measured (threads, device, CPU) in the CSV and under the Markdown table."""

from __future__ import annotations

import csv

import pytest
import torch

from napari_apformer.compress.stacking import BASE_UNPRUNED, KINDS, classify
from napari_apformer.model.base import build_model
from napari_apformer.train import sweep
from napari_apformer.train.datasets import SliceSet

TINY = {
    "input_size": 64,
    "widths": [4, 8, 8, 16],
    "layers": [{"heads": 2, "dim_head": 8, "mlp": 16, "scale": 0.25}],
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_row_has_positive_ms_per_slice(tmp_path):
    torch.manual_seed(0)
    model = build_model("apformer", 1, 3, sizes=TINY)
    g = torch.Generator().manual_seed(0)
    data = SliceSet(
        torch.rand(3, 1, 64, 64, generator=g),
        torch.randint(0, 3, (3, 64, 64), generator=g),
        ["a", "b", "c"],
    )
    points = sweep.grid({"token_threshold": [1.0, 0.5], "gate": [-2.0]})
    rows = sweep.sweep(model, data, points, batch=2)
    assert len(rows) == 2
    for row in rows:
        assert row.ms_per_slice > 0
        assert row.timing is not None and row.timing.threads == 1
        assert row.timing.device == "cpu" and row.timing.machine
    names = ["background", "one", "two"]
    sweep.write_csv(rows, names, tmp_path / "s.csv")
    with (tmp_path / "s.csv").open(newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 2
    for line in written:
        assert float(line["wall_ms_per_slice"]) > 0
        assert line["threads"] == "1" and line["device"] == "cpu" and line["machine"]
    # The stacking figure reads what the sweep wrote (the same CSV as both weights here).
    grouped = classify(tmp_path / "s.csv", tmp_path / "s.csv")
    assert [len(grouped[kind]) for kind in KINDS] == [1, 1, 1, 1]
    assert grouped[BASE_UNPRUNED][0].settings["token_threshold"] == "1"
    text = sweep.table(rows, names, model)
    assert text.splitlines()[0].endswith("| GFLOP per slice | ms per slice |")
    assert "ms per slice: wall time on " in text and "1 torch threads, cpu" in text
    sweep.plot(rows, tmp_path / "s.png", "tiny", ["token_threshold"])
    assert (tmp_path / "s.png").stat().st_size > 0
