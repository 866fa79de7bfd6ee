"""Loading and saving weights without ever running code from a file.

Ours: `<name>.safetensors` + `<name>.json` (the model card, with the file's SHA-256).
The authors': a plain state_dict in a `.pth`/`.pt`, read with torch.load(weights_only=True).
Both use the release's parameter names, so one model class serves both.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from napari_apformer.errors import InputError
from napari_apformer.model.apformer import APFormer
from napari_apformer.model.card import ModelCard

WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt")
TORCH_PREFIXES = ("module.", "model.")  # DataParallel and wrapper prefixes


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor], device: str | torch.device = "cpu"
) -> APFormer:
    """An APFormer in eval mode on `device`, with its model card as `model.card`.

    Accepts our `.safetensors` (the card is read from the `.json` beside it), an authors'
    `.pth`/`.pt` state_dict, or a state_dict itself. Raises InputError naming the source.
    """
    if isinstance(path_or_state_dict, Mapping):
        state, card, source = dict(path_or_state_dict), None, "state_dict"
    else:
        path = Path(path_or_state_dict)
        state, card = read_weights(path)
        source = path
    model = model_from_state_dict(state, source)
    if card is None:
        card = ModelCard.generic(str(source), model.in_channels, model.n_classes)
    check_card_fits(card, model, source)
    model.card = card
    model.default_token_threshold = card.token_threshold
    for layer, gate in zip(model.trans4.attention_layers, card.gates, strict=True):
        layer.gate.data.fill_(gate)
    return model.to(device).eval()


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], ModelCard | None]:
    if not path.is_file():
        raise InputError("weights file not found", path)
    if path.suffix == ".safetensors":
        card = ModelCard.read(path.with_suffix(".json"))
        if card.sha256 is not None and sha256_of(path) != card.sha256:
            raise InputError(
                "SHA-256 differs from the model card: the file is corrupt or was replaced", path
            )
        try:
            return load_file(str(path)), card
        except (SafetensorError, OSError, ValueError) as error:
            raise InputError(f"not a readable safetensors file ({error})", path) from None
    if path.suffix in (".pth", ".pt"):
        return read_torch_state_dict(path), None
    raise InputError(f"unknown weights format; expected one of {', '.join(WEIGHTS_SUFFIXES)}", path)


def read_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(
            f"refused: the file holds more than tensors, and loading it could run code ({first})",
            path,
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise InputError(f"not a readable PyTorch checkpoint ({error})", path) from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise InputError("does not hold a state_dict of tensors", path)
    state = {}
    for key, value in loaded.items():
        for prefix in TORCH_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def model_from_state_dict(state: dict[str, torch.Tensor], source: object) -> APFormer:
    """Build the architecture the tensors describe (input channels and classes) and fill it."""
    try:
        in_channels = state["inc.double_conv.0.weight"].shape[1]
        n_classes = state["outc.conv.weight"].shape[0]
    except (KeyError, IndexError):
        raise InputError(
            "not APFormer weights: the first or last convolution is missing", source
        ) from None
    model = APFormer(in_channels, n_classes)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = (f"{len(missing)} missing (e.g. {missing[:2]})" if missing else "") + (
            f" {len(unexpected)} unexpected (e.g. {unexpected[:2]})" if unexpected else ""
        )
        raise InputError(f"not APFormer weights: {detail.strip()}", source)
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise InputError(
                f"wrong shape for {key}: {tuple(tensor.shape)}, expected "
                f"{tuple(expected[key].shape)}",
                source,
            )
        if not (tensor.is_floating_point() or key.endswith("num_batches_tracked")):
            raise InputError(f"wrong dtype for {key}: {tensor.dtype}", source)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"non-finite values in {key}", source)
    model.load_state_dict(state)
    return model


def check_card_fits(card: ModelCard, model: APFormer, source: object) -> None:
    if card.in_channels != model.in_channels or card.n_classes != model.n_classes:
        raise InputError(
            f"model card says {card.in_channels} channels and {card.n_classes} classes, the "
            f"tensors have {model.in_channels} and {model.n_classes}",
            source,
        )
    if len(card.gates) != model.depth:
        raise InputError(
            f"model card has {len(card.gates)} gates, the model {model.depth} layers", source
        )


def save_weights(model: APFormer, card: ModelCard, path: Path) -> None:
    """Write `<path>.safetensors` and its card `<path>.json`, recording the file's SHA-256."""
    path = path.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    card.sha256 = sha256_of(path)
    path.with_suffix(".json").write_text(card.to_json(), encoding="utf-8")
