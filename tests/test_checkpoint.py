"""Weights load from our safetensors and from the authors' .pth, and nothing runs code."""

import json
import pickle

import pytest
import torch

from napari_apformer.errors import InputError
from napari_apformer.model import ModelCard, load_model, save_weights
from napari_apformer.weights import DEFAULT_WEIGHTS, resolve_weights


def logits_of(model, x):
    with torch.inference_mode():
        return model(x, token_threshold=0.9, gate=-2.0).logits


@pytest.mark.slow
def test_authors_pth_loads_unchanged(tmp_path, official, official_state_dict, official_model):
    path = tmp_path / "best.pth"
    torch.save(official_state_dict, path)
    model = load_model(path)
    assert (model.in_channels, model.n_classes) == (1, 9)
    x = torch.from_numpy(official["input"][:1])
    assert torch.equal(logits_of(model, x), logits_of(official_model, x))
    assert model.card.class_names[0] == "background"


def test_data_parallel_prefix_is_accepted(tmp_path, official_state_dict):
    path = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in official_state_dict.items()}, path)
    assert load_model(path).n_classes == 9


@pytest.mark.slow
def test_safetensors_round_trip_with_card(tmp_path, official, official_model):
    card = ModelCard.generic("mine", 1, 9)
    card.settings = {"token_threshold": 0.8, "gate": [0.0, -1.0, -2.0, -3.0]}
    save_weights(official_model, card, tmp_path / "mine")
    loaded = load_model(tmp_path / "mine.safetensors")
    assert loaded.card.sha256 and loaded.card.settings["token_threshold"] == 0.8
    assert loaded.card.architecture == official_model.architecture()
    assert loaded.trans4.stored_gates() == [0.0, -1.0, -2.0, -3.0]
    x = torch.from_numpy(official["input"][:1])
    assert torch.equal(logits_of(loaded, x), logits_of(official_model, x))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"inc.double_conv.0.weight": Exploit()}, f)
    with pytest.raises(InputError, match="could run code"):
        load_model(path)
    assert not marker.exists()


def test_changed_file_fails_checksum(tmp_path, official_model):
    save_weights(official_model, ModelCard.generic("m", 1, 9), tmp_path / "m")
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "m.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256"):
        load_model(tmp_path / "m.safetensors")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("outc.conv.bias"), "missing"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected"),
        (lambda sd: sd.update({"conv4.weight": torch.zeros(64, 128, 3, 3)}), "wrong shape"),
        (lambda sd: sd["up2.conv.double_conv.0.weight"].fill_(float("nan")), "non-finite"),
        (
            lambda sd: sd.update({"conv4.weight": torch.zeros(64, 128, 1, 1, dtype=torch.int32)}),
            "wrong dtype",
        ),
        (lambda sd: sd.pop("inc.double_conv.0.weight"), "not weights of any known .*apformer"),
    ],
)
def test_wrong_tensors_are_refused(official_state_dict, change, message):
    state = {k: v.clone() for k, v in official_state_dict.items()}
    change(state)
    with pytest.raises(InputError, match=message):
        load_model(state)


def test_card_must_fit_tensors(tmp_path, official_model):
    save_weights(official_model, ModelCard.generic("m", 1, 9), tmp_path / "m")
    card = json.loads((tmp_path / "m.json").read_text())
    card["classes"] = card["classes"][:4]
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="4 classes"):
        load_model(tmp_path / "m.safetensors")
    (tmp_path / "m.json").unlink()
    with pytest.raises(InputError, match="model card"):
        load_model(tmp_path / "m.safetensors")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04broken zip"])
def test_corrupt_files_are_refused(tmp_path, content):
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        path.with_suffix(".json").write_text(ModelCard.generic("bad", 1, 9).to_json())
        with pytest.raises(InputError, match="bad"):
            load_model(path)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "nothing.pth")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(InputError, match="unknown weights format"):
        load_model(tmp_path / "w.onnx")


def test_shipped_default_weights_load_and_are_marked():
    path = resolve_weights(None)
    assert path.name == f"{DEFAULT_WEIGHTS}.safetensors" and path.is_file()
    model = load_model(path)
    assert not model.card.placeholder and model.card.metrics["validation_dice"]
    assert [c.name for c in model.card.classes] == [
        "background",
        "CSF",
        "grey matter",
        "white matter",
    ]
    assert model.settings()[0].default == model.card.settings["token_threshold"]


def test_a_sparse_tensor_is_refused_naming_the_source(official_state_dict):
    state = dict(official_state_dict)
    state["conv4.weight"] = state["conv4.weight"].to_sparse()
    with pytest.raises(InputError, match=r"^state_dict: conv4.weight is not a plain CPU tensor"):
        load_model(state)


@pytest.mark.parametrize("limits", ["T1 only", [1, 2], {}])
def test_a_card_whose_limits_are_not_lines_of_text_is_refused(limits):
    raw = json.loads(ModelCard.generic("w", 1, 2).to_json())
    with pytest.raises(InputError, match="limits must be a list of strings"):
        ModelCard.from_json(json.dumps({**raw, "limits": limits}), "w.json")
    good = json.dumps({**raw, "limits": ["T1 only"]})
    assert ModelCard.from_json(good, "w.json").limits == ["T1 only"]
