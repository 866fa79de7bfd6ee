"""Loading and saving weights without ever running code from a file.

Ours: `<name>.safetensors` + `<name>.json` (the model card, with the file's SHA-256 and the
architecture). The authors': a plain state_dict in a `.pth`/`.pt`, read with
torch.load(weights_only=True); its family is recognised from its keys (each family says how)
and its sizes from the tensor shapes.
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

from napari_apformer.errors import InputError, first_line
from napari_apformer.model.base import SegmentationModel, build_model, families
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
) -> SegmentationModel:
    """A model in eval mode on `device`, with its model card as `model.card`.

    Accepts our `.safetensors` (the card is read from the `.json` beside it), a release's
    `.pth`/`.pt` state_dict, or a state_dict itself. The family and sizes come from the card,
    or else from the tensors. Raises InputError naming the source.
    """
    if isinstance(path_or_state_dict, Mapping):
        state, card, source = dict(path_or_state_dict), None, "state_dict"
    else:
        path = Path(path_or_state_dict)
        state, card = read_weights(path)
        source = path
    model = model_from_state_dict(state, source, card)
    if card is None:
        card = ModelCard.generic(str(source), model.in_channels, model.n_classes)
    card.architecture = model.architecture()
    check_card_fits(card, model, source)
    model.card = card
    model.set_defaults(model.resolve_settings(card.settings, source))
    return model.to(device).eval()


def grow_model(source: SegmentationModel, family: str, path: object) -> SegmentationModel:
    """`family` built with the sizes of `source` and holding every tensor of it: trained
    weights of a network that `family` extends (mobileutr's in mobileutr-ap); the tensors
    `family` adds keep their initialisation. InputError naming `path` if they do not fit."""
    architecture = source.architecture()
    try:
        model = build_model(
            family,
            source.in_channels,
            source.n_classes,
            architecture.get("variant"),
            architecture.get("sizes"),
        )
    except (TypeError, KeyError, ValueError, InputError) as error:
        raise InputError(
            f"a {family} model cannot take the sizes of these {source.family} weights "
            f"({first_line(error)})",
            path,
        ) from None
    target = model.state_dict()
    given = source.state_dict()
    misfit = [k for k, v in given.items() if k not in target or target[k].shape != v.shape]
    if misfit:
        raise InputError(
            f"these {source.family} weights do not fit a {family} model: {len(misfit)} of "
            f"their {len(given)} tensors have no place in it (e.g. {misfit[0]})",
            path,
        )
    model.load_state_dict(given, strict=False)
    return model


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
        first = first_line(error)
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


def model_from_state_dict(
    state: dict[str, torch.Tensor], source: object, card: ModelCard | None = None
) -> SegmentationModel:
    """Build the architecture the card records (else the one the tensors describe) and fill
    it strictly: every tensor present, of the right shape, finite."""
    architecture = _architecture(state, source, card)
    try:
        model = build_model(
            architecture["family"],
            int(architecture["in_channels"]),
            int(architecture["n_classes"]),
            architecture.get("variant"),
            architecture.get("sizes"),
        )
    except InputError as error:
        raise InputError(error.problem, source) from None
    state = model.to_our_names(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = (f"{len(missing)} missing (e.g. {missing[:2]})" if missing else "") + (
            f" {len(unexpected)} unexpected (e.g. {unexpected[:2]})" if unexpected else ""
        )
        raise InputError(f"not {model.family} weights of these sizes: {detail.strip()}", source)
    for key, tensor in state.items():
        if tensor.layout != torch.strided or tensor.device.type != "cpu":
            raise InputError(
                f"{key} is not a plain CPU tensor ({tensor.layout}, {tensor.device})", source
            )
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


def _architecture(state: dict[str, torch.Tensor], source: object, card: ModelCard | None) -> dict:
    """{family, in_channels, n_classes, variant, sizes}: from the card where it says, the
    rest from the tensors (asking each registered family whether it recognises them)."""
    recorded = dict(card.architecture) if card is not None else {}
    known = families()
    candidates = [known[recorded["family"]]] if recorded.get("family") in known else known.values()
    if recorded.get("family") and recorded["family"] not in known:
        raise InputError(
            f"the model card names family {recorded['family']!r}; known families: "
            f"{', '.join(sorted(known))}",
            source,
        )
    found = None
    for cls in candidates:
        found = cls.recognise(cls.to_our_names(state))
        if found is not None:
            found["family"] = cls.family
            break
    if found is None:
        raise InputError(
            f"the tensors are not weights of any known model family ({', '.join(sorted(known))})",
            source,
        )
    if recorded.get("sizes"):
        found["sizes"] = recorded["sizes"]
    if recorded.get("variant"):
        found["variant"] = recorded["variant"]
    return found


def check_card_fits(card: ModelCard, model: SegmentationModel, source: object) -> None:
    if card.in_channels != model.in_channels or card.n_classes != model.n_classes:
        raise InputError(
            f"model card says {card.in_channels} channels and {card.n_classes} classes, the "
            f"tensors have {model.in_channels} and {model.n_classes}",
            source,
        )


def save_weights(model: SegmentationModel, card: ModelCard, path: Path) -> None:
    """Write `<path>.safetensors` and its card `<path>.json`, recording the file's SHA-256,
    the architecture and the setting defaults: the card's where it has them, else the
    model's own (APFormer: its stored gates).

    Both are written to temporary names and renamed into place together, SIGINT/SIGTERM
    held back in between; an earlier pair is kept (as `.<name>.previous-PID.*`, a loadable
    pair) until both new files are in place, so that even a SIGKILL between the two renames
    does not lose it."""
    from napari_apformer.io.files import replace_together

    path = path.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    card.architecture = model.architecture()
    card.settings = {**model.defaults(), **card.settings}

    def write(temporaries: list[Path]) -> None:
        weights, card_file = temporaries
        save_file(state, str(weights))
        card.sha256 = sha256_of(weights)
        card_file.write_text(card.to_json(), encoding="utf-8")

    replace_together([path, path.with_suffix(".json")], write, keep_previous=True)
