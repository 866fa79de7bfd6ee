"""Training: data checks before training, a few steps on tiny images, resume, the release
layout, augmentation, learnable gates and torchrun (not for quality); the loop asks the model
for its losses and parameter groups, so a family defined in a test trains too."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from napari_apformer.cli import main
from napari_apformer.model import APFormer, load_model
from napari_apformer.model.apformer.losses import training_loss
from napari_apformer.model.card import Normalisation
from napari_apformer.train import datasets
from napari_apformer.train.augment import Augmentation
from test_cli import ToyNet


class TrainableToy(ToyNet):
    """The toy family of test_cli with training losses and parameter groups."""

    family = "toy"
    seen_options: ClassVar[dict] = {}

    def training_losses(self, x, target, step, **options):
        TrainableToy.seen_options = dict(options)
        logits = self.predict(x, **{k: options[k] for k in ("bias", "scale")}).logits
        loss = torch.nn.functional.cross_entropy(logits, target)
        return {"total": loss, "cross_entropy": loss}

    def parameter_groups(self, learning_rate, **options):
        return [{"params": list(self.parameters()), "lr": learning_rate}]


def tiny_folder(root, count=4, size=(40, 48), label=2):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(count):
        mask = np.zeros(size, np.uint8)
        y, x = rng.integers(4, 20, 2)
        mask[y : y + 14, x : x + 16] = label
        mask[y + 4 : y + 8, x + 4 : x + 8] = 1
        image = (mask * 60 + rng.integers(0, 30, size)).astype(np.uint8)
        iio.imwrite(root / "images" / f"case{k}.png", image)
        iio.imwrite(root / "masks" / f"case{k}.png", mask)
    return root


def run_cli(*args):
    return main(["train", *map(str, args), "--no-progress", "--threads", "2"])


@pytest.mark.slow
def test_a_few_steps_write_weights_card_log_and_plot_and_resume(
    tmp_path, capsys, small_apformer_weights
):
    data = tiny_folder(tmp_path / "data")
    out = tmp_path / "w" / "tiny"
    common = ["--images", data, "-o", out, "--steps-per-epoch", 1, "--batch-size", 2]
    classes = ["--classes", "background,core,rim", "--init", small_apformer_weights]
    assert run_cli(*common, "--epochs", 1, *classes, "--set", "token_threshold=0.8") == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert [c["name"] for c in card["classes"]] == ["background", "core", "rim"]
    assert set(card["metrics"]["validation_dice"]) == {"background", "core", "rim"}
    assert set(card["metrics"]["validation_dice_unpruned"]) == {"background", "core", "rim"}
    assert 0 < card["metrics"]["validation_kept_tokens"] <= 1
    assert 0 < card["metrics"]["validation_kept_dependencies"] <= 1
    assert card["training"]["steps_run"] == 1 and "apformer train" in card["training"]["command"]
    assert not card["placeholder"] and card["card_version"] == 2
    assert card["architecture"]["family"] == "apformer"
    assert card["architecture"]["sizes"]["widths"] == [16, 32, 64, 128]
    assert [layer["heads"] for layer in card["architecture"]["sizes"]["layers"]] == [1] * 4
    assert card["settings"] == {"token_threshold": 0.8, "gate": [-2.0] * 4}
    model = load_model(out.with_suffix(".safetensors"))  # SHA-256 checked
    assert model.n_classes == 3 and model.defaults() == card["settings"]
    for suffix in (".train-log.csv", ".train-curves.png", ".train-state.pt"):
        assert out.with_suffix(suffix).is_file()
    state = out.with_suffix(".train-state.pt")
    assert run_cli(*common, "--epochs", 2, "--resume", state) == 0
    rows = out.with_suffix(".train-log.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[-1].startswith("2,2,")  # epoch 2 continued at step 2
    assert rows[0].endswith(",mean_foreground_dice,kept_tokens,kept_dependencies")
    assert "best validation Dice" in capsys.readouterr().out

    sweep_out = tmp_path / "sweep" / "tiny"
    args = ["sweep", "--images", data, "--weights", out.with_suffix(".safetensors"), "-o"]
    assert main([*map(str, args), str(sweep_out), "--thresholds", "1.0,0.3", "--gates", "-2"]) == 0
    table = without_timing(capsys.readouterr().out)
    assert table.startswith(  # the resumed run was given no class names
        "| token threshold | dependency gate | Dice class 1 | Dice class 2 | mean Dice | "
        "kept tokens | kept dependencies | GFLOP per slice |\n"
    )
    assert table.count("\n| 1 | -2 |") == 1 and "| 0.3 | -2 |" in table
    rows = without_timing(sweep_out.with_suffix(".csv").read_text()).splitlines()
    assert rows[0] == (
        "token_threshold,gate,dice_background,dice_class 1,dice_class 2,mean_foreground_dice,"
        "kept_tokens,kept_dependencies,gflops_per_slice"
    )
    assert len(rows) == 3 and rows[1].split(",")[-3] == "1.00000"  # all tokens kept at 1.0
    assert float(rows[2].split(",")[-1]) <= float(rows[1].split(",")[-1])
    assert sweep_out.with_suffix(".png").is_file() and sweep_out.with_suffix(".md").is_file()
    # The same grid with --set (values separated by semicolons, per-layer values by commas)
    grid = ["--set", "gate=-2,-2,-2,-2", "--set", "token_threshold=1.0;0.3"]
    assert main([*map(str, args), str(sweep_out), *grid]) == 0
    assert without_timing(capsys.readouterr().out) == table
    assert without_timing(sweep_out.with_suffix(".csv").read_text()).splitlines() == rows
    assert main([*map(str, args), str(sweep_out), "--set", "gate=-2;-1,-1,0,0"]) == 0
    table = capsys.readouterr().out
    assert table.count("\n| 0.9 | -2 |") == 1 and table.count("\n| 0.9 | -1/-1/0/0 |") == 1
    assert main([*map(str, args), str(sweep_out), "--set", "tau=0.5"]) == 1
    assert "their settings: token_threshold, gate" in capsys.readouterr().err
    assert main([*map(str, args), str(sweep_out), "--gates", "-2", "--set", "gate=0"]) == 1
    assert "given twice" in capsys.readouterr().err
    assert main([*map(str, args), str(sweep_out), "--thresholds", "0.5,nan"]) == 1
    assert "token_threshold must be in (0, 1], got nan" in capsys.readouterr().err


def without_timing(text: str) -> str:
    """A sweep's table or CSV without its wall-time columns and note (they vary per run;
    tests/test_sweep_timing.py checks them)."""
    if text.startswith("|"):
        lines = [line for line in text.split("\n") if line.startswith("|")]
        cut = [line[: line.rstrip("|").rindex("|") + 1] for line in lines]
        return "\n".join(cut) + "\n"
    return "\n".join(",".join(row[:-4]) for row in csv.reader(text.splitlines()))


@pytest.mark.slow
def test_weight_average_is_saved_and_resumed(tmp_path, small_apformer_weights):
    data = tiny_folder(tmp_path / "data")
    out = tmp_path / "w" / "ema"
    common = ["--images", data, "-o", out, "--steps-per-epoch", 2, "--batch-size", 2]
    common += ["--init", small_apformer_weights]
    assert run_cli(*common, "--epochs", 1, "--ema", 0.5) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["metrics"]["batch_norm_statistics"].startswith("re-estimated on all 3 clean")
    state = torch.load(out.with_suffix(".train-state.pt"), weights_only=True)
    saved = load_model(out.with_suffix(".safetensors")).state_dict()
    name = "trans4.transformer.layers.0.0.fn.to_qkv.weight"
    assert torch.equal(saved[name], state["average"][name])
    assert not torch.equal(state["average"][name], state["model"][name])  # averaged, not raw
    assert (
        run_cli(
            *common, "--epochs", 2, "--ema", 0.5, "--resume", out.with_suffix(".train-state.pt")
        )
        == 0
    )
    assert main(["train", "--images", str(data), "-o", str(out), "--ema", "1"]) == 1


def test_validation_names_the_counters_by_their_labels():
    from napari_apformer.train.loop import Validation

    validation = Validation(
        [1.0, 0.5, 0.7],
        [1.0, 0.6, 0.8],
        {"kept_tokens": 0.391, "kept_dependencies": 0.5},
        {"kept_tokens": "kept tokens"},
    )
    assert validation.mean_foreground == pytest.approx(0.6)
    assert validation.counters_text() == "kept tokens 39 %, kept_dependencies 50 %"


def test_weight_average_update_follows_its_decay():
    from napari_apformer.train.loop import WeightAverage

    torch.manual_seed(0)
    model = APFormer(1, 2)
    average = WeightAverage(model, decay=0.9)
    before = next(average.model.parameters()).clone()
    first = next(model.parameters())
    with torch.no_grad():
        first.add_(1.0)
    average.update(model, step=1000)  # past the warm-up: decay 0.9
    torch.testing.assert_close(next(average.model.parameters()), 0.9 * before + 0.1 * first)
    previous = next(average.model.parameters()).clone()
    average.update(model, step=0)  # warm-up: decay 1/10
    torch.testing.assert_close(next(average.model.parameters()), 0.1 * previous + 0.9 * first)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing mask", "no mask for case1"),
        ("label outside", "outside the declared classes"),
        ("size mismatch", "does not match its image"),
        ("empty", "no images in images/"),
        ("one pair", "at least 2 image/mask pairs"),
    ],
)
def test_bad_data_is_reported_before_training(tmp_path, capsys, problem, message):
    data = tiny_folder(tmp_path / "data", count=1 if problem == "one pair" else 4)
    if problem == "missing mask":
        (data / "masks" / "case1.png").unlink()
    elif problem == "label outside":
        iio.imwrite(data / "masks" / "case2.png", np.full((40, 48), 7, np.uint8))
    elif problem == "size mismatch":
        iio.imwrite(data / "masks" / "case2.png", np.zeros((30, 30), np.uint8))
    elif problem == "empty":
        for f in [*(data / "images").iterdir(), *(data / "masks").iterdir()]:
            f.unlink()
    classes = ["--classes", "background,core,rim"]
    assert run_cli("--images", data, "-o", tmp_path / "w", *classes) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.slow
def test_a_family_defined_in_a_test_trains_through_its_own_losses(tmp_path, monkeypatch):
    from napari_apformer.model import base

    monkeypatch.setitem(base._FAMILIES, "toy", TrainableToy)
    data = tiny_folder(tmp_path / "data")
    out = tmp_path / "w" / "toy"
    common = ["--images", data, "-o", out, "--steps-per-epoch", 2, "--batch-size", 2]
    assert run_cli(*common, "--family", "toy", "--set", "scale=0.5,1.5") == 0
    assert TrainableToy.seen_options == {
        "bias": 0.0,
        "scale": [0.5, 1.5],
        "ssa_every": 1,
        "gate_sparsity": 0.05,
    }
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["architecture"] == {"family": "toy", "variant": "small", "sizes": {"hidden": 4}}
    assert card["settings"] == {"bias": 0.0, "scale": [0.5, 1.5]}
    assert set(card["metrics"]) >= {"validation_dice", "validation_bright_cells"}
    model = load_model(out.with_suffix(".safetensors"))
    assert model.family == "toy" and model.defaults() == card["settings"]
    # Fine-tuning keeps the family, sizes and settings of the weights it starts from
    again = tmp_path / "w" / "again"
    init = ["--init", out.with_suffix(".safetensors")]
    assert run_cli("--images", data, "-o", again, "--steps-per-epoch", 1, *init) == 0
    card = json.loads(again.with_suffix(".json").read_text())
    assert card["architecture"]["family"] == "toy" and card["settings"]["scale"] == [0.5, 1.5]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--family", "nope"], "unknown model family 'nope'; known families: apformer"),
        (["--family", "plain"], "the toy family declares no training losses"),
        (["--family", "toy", "--learnable-gates"], "the toy family has no gates to learn"),
        (["--set", "tau=0.5"], "apformer weights have no setting 'tau'"),
        (["--set", "gate=-20"], "gate must be in [-10, 10], got -20"),
    ],
)
def test_bad_model_options_are_reported_before_the_data_is_read(
    tmp_path, capsys, monkeypatch, flags, message
):
    from napari_apformer.model import base

    monkeypatch.setitem(base._FAMILIES, "toy", TrainableToy)
    if "plain" in flags:
        monkeypatch.setitem(base._FAMILIES, "toy", ToyNet)
        flags = ["--family", "toy"]
    assert run_cli("--images", tmp_path / "missing", "-o", tmp_path / "w", *flags) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "missing" not in err


def test_release_layout_reads_binary_masks(tmp_path):
    root = tmp_path / "release"
    (root / "img").mkdir(parents=True)
    (root / "labelcol").mkdir()
    (root / "MainPatient").mkdir()
    for k in range(3):
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 255
        iio.imwrite(root / "img" / f"{k:04d}.png", (mask // 2 + 20).astype(np.uint8))
        iio.imwrite(root / "labelcol" / f"{k:04d}.png", mask)
    (root / "MainPatient" / "train.txt").write_text("0000\n0001\n")
    (root / "MainPatient" / "val.txt").write_text("0002\n")
    options = {"in_channels": 1, "normalisation": Normalisation(), "n_classes": 256}
    train_set = datasets.release_split(root, "train", **options)
    assert len(train_set) == 2 and set(train_set.masks.unique().tolist()) == {0, 1}
    (root / "MainPatient" / "val.txt").write_text("0009\n")
    with pytest.raises(Exception, match="lack img/ or labelcol/"):
        datasets.release_split(root, "val", **options)


def test_augmentation_is_deterministic_and_keeps_labels_valid():
    images = torch.rand(3, 1, 256, 256)
    masks = torch.randint(0, 4, (3, 256, 256))
    augment = Augmentation()
    a = augment(images, masks, torch.Generator().manual_seed(5))
    b = augment(images, masks, torch.Generator().manual_seed(5))
    c = augment(images, masks, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].min() >= 0 and a[0].max() <= 1 and set(a[1].unique().tolist()) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_learnable_gates_get_gradients_only_when_asked():
    torch.manual_seed(0)  # a 16 x 16 token grid: the same code at a sixteenth of the memory
    x, y = torch.rand(1, 1, 128, 128), torch.randint(0, 3, (1, 128, 128))
    for learnable in (False, True):
        model = APFormer(1, 3, input_size=128).train()
        model.set_learnable_gates(learnable)
        out = model(x, 1.0)
        loss = training_loss(out, y, with_ssa=False)["total"]
        if learnable:
            loss = loss + model.soft_kept_dependencies(out)
        loss.backward()
        gate = model.trans4.attention_layers[0].gate
        assert (gate.grad is not None and gate.grad.abs() > 0) == learnable
        ratio = model.trans4.attention_layers[1].thresh_for_kv.weight.grad
        assert (ratio is not None and ratio.abs().sum() > 0) == learnable


@pytest.mark.slow
def test_torchrun_runs_distributed_data_parallel(tmp_path):
    data = tiny_folder(tmp_path / "data")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29617",
            "-m",
            "napari_apformer.cli",
            "train",
            "--images",
            str(data),
            "-o",
            str(out),
            "--epochs",
            "1",
            "--steps-per-epoch",
            "1",
            "--batch-size",
            "1",
            "--ssa-every",
            "2",
            "--no-progress",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.with_suffix(".safetensors").is_file()


# Issue 12: outputs, interruptions and arguments (items 10, 13 and 17) ------------------------


@pytest.mark.slow
def test_train_never_replaces_earlier_weights_without_overwrite(tmp_path, capsys, monkeypatch):
    from napari_apformer.model import base

    monkeypatch.setitem(base._FAMILIES, "toy", TrainableToy)
    data = tiny_folder(tmp_path / "data")
    out = tmp_path / "w" / "toy"
    out.parent.mkdir()
    out.with_suffix(".safetensors").write_bytes(b"earlier weights")
    common = ["--images", data, "-o", out, "--family", "toy", "--steps-per-epoch", 1]
    assert run_cli(*common) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"apformer: error: {out}.safetensors exists; --overwrite replaces it, or choose another -o"
    ]
    assert "training on" not in captured.out  # refused before the data is read
    assert out.with_suffix(".safetensors").read_bytes() == b"earlier weights"
    assert run_cli(*common, "--overwrite") == 0
    assert load_model(out.with_suffix(".safetensors")).family == "toy"
    # an earlier run is continued by resuming from its own state, and only so
    assert run_cli(*common, "--epochs", 2) == 1
    assert "--resume" in capsys.readouterr().err
    assert run_cli(*common, "--epochs", 2, "--resume", out.with_suffix(".train-state.pt")) == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "nan"], "--lr takes a learning rate above 0, such as 1e-3, not nan"),
        (["--lr", "-1"], "--lr takes a learning rate above 0"),
        (["--steps-per-epoch", "-5"], "--steps-per-epoch must be at least 1, not -5"),
        (["--steps-per-epoch", "0"], "--steps-per-epoch must be at least 1, not 0"),
        (["--max-minutes", "nan"], "--max-minutes takes a time above 0"),
        (["--val-fraction", "1.5"], "--val-fraction takes a fraction between 0 and 1"),
        (["--axes", "x"], "--axes takes distinct slice axes 0, 1 or 2 separated by commas"),
        (["--gate-sparsity", "inf"], "--gate-sparsity takes a weight of 0 or more"),
        (["--device", "meta"], "--device: unknown device 'meta'"),
        (["--resume", "{weights}"], "not a training state (the OUT.train-state.pt that"),
        (["--resume", "{pth}"], "to start from weights, use --init"),
        (["--resume", "{missing}"], "training state not found"),
        (
            ["--init", "{weights}", "--classes", "background,core,rim"],
            "these weights have 2 classes, --classes names 3",
        ),
    ],
)
def test_training_arguments_are_checked_in_one_line_before_the_data(
    tmp_path, capsys, monkeypatch, flags, message
):
    from napari_apformer.model import ModelCard, base, save_weights

    monkeypatch.setitem(base._FAMILIES, "toy", TrainableToy)
    weights = tmp_path / "toy2.safetensors"
    save_weights(TrainableToy(1, 2), ModelCard.generic("toy", 1, 2), weights)
    torch.save(TrainableToy(1, 2).state_dict(), tmp_path / "toy2.pth")
    paths = {
        "{weights}": weights,
        "{pth}": tmp_path / "toy2.pth",
        "{missing}": tmp_path / "missing.train-state.pt",
    }
    flags = [str(paths.get(flag, flag)) for flag in flags]
    data = tiny_folder(tmp_path / "data")
    assert run_cli("--images", data, "-o", tmp_path / "w" / "m", "--family", "toy", *flags) == 1
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line.startswith("apformer: error: ") and message in line and "Traceback" not in line
    assert "training on" not in captured.out
    assert not (tmp_path / "w").exists()


def test_init_with_another_class_count_is_one_line(tmp_path, capsys, monkeypatch):
    from napari_apformer.model import ModelCard, base, save_weights

    monkeypatch.setitem(base._FAMILIES, "toy", TrainableToy)
    weights = tmp_path / "toy2.safetensors"
    save_weights(TrainableToy(1, 2), ModelCard.generic("toy", 1, 2), weights)
    data = tiny_folder(tmp_path / "data")  # labels 0, 1 and 2: three classes
    assert run_cli("--images", data, "-o", tmp_path / "m", "--init", weights) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "the weights take 1 channel(s) and 2 classes; the data has 1 and 3" in line


@pytest.mark.slow
def test_init_from_mobileutr_weights_trains_mobileutr_ap(tmp_path, capsys, small_apformer_weights):
    from napari_apformer.model import ModelCard, build_model, save_weights

    torch.manual_seed(0)
    plain = build_model("mobileutr", 1, 3, sizes={"depths": [1, 1, 1, 1, 1]})
    weights = tmp_path / "plain.safetensors"
    save_weights(plain, ModelCard.generic("plain", 1, 3), weights)
    data = tiny_folder(tmp_path / "data")
    out = tmp_path / "w" / "grafted"
    common = ["--images", data, "-o", out, "--steps-per-epoch", 1, "--batch-size", 2]
    assert run_cli(*common, "--init", weights, "--family", "mobileutr-ap") == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["architecture"] == {**plain.architecture(), "family": "mobileutr-ap"}
    assert set(card["settings"]) == {"token_threshold", "gate"}
    assert load_model(out.with_suffix(".safetensors")).family == "mobileutr-ap"
    capsys.readouterr()
    other = ["--init", small_apformer_weights, "--family", "mobileutr-ap"]
    assert run_cli("--images", tmp_path / "missing", "-o", tmp_path / "x", *other) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "small-apformer.safetensors" in line and "mobileutr-ap" in line
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("kind", ["images", "masks"])
def test_two_training_files_of_one_name_are_refused(tmp_path, capsys, kind):
    data = tiny_folder(tmp_path / "data")
    iio.imwrite(data / kind / "case1.tif", iio.imread(data / kind / "case1.png"))
    assert run_cli("--images", data, "-o", tmp_path / "w") == 1
    [line] = capsys.readouterr().err.splitlines()
    assert f"files of one name in {kind}/: case1.png and case1.tif" in line
    assert not (tmp_path / "w.safetensors").exists()


KILLED_SAVE = """
import contextlib, os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from test_cli import ToyNet
from napari_apformer.io import files
from napari_apformer.model import ModelCard, checkpoint
where, signame, path = sys.argv[1], sys.argv[2], Path(sys.argv[3])
signum = getattr(signal, signame)
if where == "weights written":
    real_save = checkpoint.save_file
    def save_file(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signum)
    checkpoint.save_file = save_file
else:  # between the two renames
    real_replace, calls = os.replace, []
    def replace(*args, **kwargs):
        real_replace(*args, **kwargs)
        calls.append(args)
        if len(calls) == 1:
            os.kill(os.getpid(), signum)
    os.replace = replace
torch.manual_seed(1)
try:
    with getattr(files, "handle_signals", contextlib.nullcontext)():
        checkpoint.save_weights(ToyNet(1, 2), ModelCard.generic("toy", 1, 2), path)
except files.Interrupted as error:
    sys.exit(error.exit_code)
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["weights written", "between the renames"])
@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_a_kill_while_saving_weights_never_loses_the_old_pair(
    tmp_path, monkeypatch, where, signame
):
    from napari_apformer.model import ModelCard, base, save_weights
    from test_cli import ToyNet

    monkeypatch.setitem(base._FAMILIES, "toy", ToyNet)
    path = tmp_path / "toy.safetensors"
    torch.manual_seed(0)
    old = ToyNet(1, 2)
    save_weights(old, ModelCard.generic("toy", 1, 2), path)
    script = KILLED_SAVE.format(tests=str(Path(__file__).parent))
    done = subprocess.run(
        [sys.executable, "-c", script, where, signame, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    expected = {"SIGKILL": -9, "SIGTERM": 143}[signame]
    assert done.returncode == expected, done.stderr[-2000:]

    def weights(p):
        return load_model(p).state_dict()["first.weight"]

    if signame == "SIGTERM":  # held back until the pair is in place, or raised before it
        new_pair = where == "between the renames"
        assert torch.equal(weights(path), old.first.weight) != new_pair
        assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.json", "toy.safetensors"]
        return
    try:
        kept = weights(path)
    except Exception:  # new weights beside the old card: the old pair is kept beside them
        [previous] = tmp_path.glob(".toy.previous-*.safetensors")
        kept = weights(previous)
    assert torch.equal(kept, old.first.weight.detach())


@pytest.mark.slow
def test_a_sweep_of_a_family_without_settings_gives_one_row(tmp_path, capsys):
    from napari_apformer.model import ModelCard, save_weights
    from napari_apformer.model.base import build_model

    data = tiny_folder(tmp_path / "data", count=3)
    weights = tmp_path / "mobileutr.safetensors"
    torch.manual_seed(0)
    save_weights(build_model("mobileutr", 1, 3, "default"), ModelCard.generic("m", 1, 3), weights)
    out = tmp_path / "sweep" / "m"
    assert main(["sweep", "--images", str(data), "--weights", str(weights), "-o", str(out)]) == 0
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("dice_background,")  # no setting columns
    table = capsys.readouterr().out
    assert table.count("\n|") == 2  # the separator and one row


def test_train_compress_and_finetune_check_shared_numbers_in_the_same_words(tmp_path):
    """--batch-size, --ssa-every, --ema and --seed are checked by one helper each
    (train.command), so the three commands refuse them in the same words."""
    from napari_apformer.cli import build_parser
    from napari_apformer.errors import InputError

    parser = build_parser()
    common = {
        "train": ["train", "--images", str(tmp_path), "-o", str(tmp_path / "w")],
        "compress": ["compress", "--images", str(tmp_path), "-o", str(tmp_path / "w")],
        "finetune": [
            "finetune",
            "--weights",
            "w",
            "--image",
            "i.nii.gz",
            "--labels",
            "l.nii.gz",
            "--slices",
            "2:1",
            "-o",
            str(tmp_path / "w"),
        ],
    }
    cases = [
        (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
        (["--ssa-every", "-2"], "--ssa-every must be at least 1, not -2"),
        (["--ema", "1"], "--ema takes a decay from 0 (off) up to, not including, 1, not 1.0"),
        (["--seed", "-1"], "--seed takes 0 or more, not -1"),
    ]
    for command, head in common.items():
        for bad, message in cases:
            try:
                args = parser.parse_args([*head, *bad])
            except SystemExit:  # an option this command does not have (finetune: --ema)
                assert command == "finetune" and bad[0] == "--ema"
                continue
            with pytest.raises(InputError) as refused:
                args.run(args)
            assert str(refused.value) == message, (command, bad)
