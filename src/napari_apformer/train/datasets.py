"""Training data as letterboxed slices of one size, prepared exactly as inference prepares them.

The size is the model's input size (its input rule); a model that takes any multiple of N
trains on TRAINING_SIZE x TRAINING_SIZE rounded up to that multiple, so that slices stack.

Sources: (a) folders `images/` + `masks/` of 2D PNG/TIFF with the same file names; (b) NIfTI
image/label pairs (`images/` + `labels/` with the same names) cut into slices along chosen
axes; (c) the authors' release layout (`img/`, `labelcol/`, `MainPatient/{train,val}.txt`);
(d) the MNI152 template (train.mni152). Every problem is found before training starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_apformer.engine.preprocess import Letterbox, PreparedImage, prepare_image
from napari_apformer.errors import InputError
from napari_apformer.io.files import compound_suffix, stem_of
from napari_apformer.io.formats import IMAGE_SUFFIXES, NIFTI_SUFFIXES, read_image_file
from napari_apformer.io.image_file import ImageFile
from napari_apformer.model.base import InputRule
from napari_apformer.model.card import Normalisation

MIN_FOREGROUND = 0.02  # slices with less foreground than this (of the slice) are skipped
TRAINING_SIZE = 256


def training_rule(rule: InputRule | None = None) -> InputRule:
    """The fixed size training slices get for a model of this input rule (None: the
    default size)."""
    if rule is None:
        return InputRule(size=TRAINING_SIZE)
    if rule.size is not None:
        return rule
    side = -(-TRAINING_SIZE // rule.multiple) * rule.multiple
    return InputRule(size=side, multiple=rule.multiple)


@dataclass
class SliceSet:
    """N model-ready slices: images (N, C, S, S) in [0, 1], masks (N, S, S) int64."""

    images: torch.Tensor
    masks: torch.Tensor
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    @staticmethod
    def empty(channels: int = 1, size: int = TRAINING_SIZE) -> SliceSet:
        return SliceSet(
            torch.zeros(0, channels, size, size), torch.zeros(0, size, size, dtype=torch.long)
        )

    @staticmethod
    def join(parts: Sequence[SliceSet]) -> SliceSet:
        nonempty = [p for p in parts if len(p)]
        if not nonempty:
            first = parts[0] if parts else SliceSet.empty()
            return SliceSet.empty(first.images.shape[1], first.images.shape[-1])
        parts = nonempty
        return SliceSet(
            torch.cat([p.images for p in parts]),
            torch.cat([p.masks for p in parts]),
            [n for p in parts for n in p.names],
        )


def letterbox_mask(mask: np.ndarray, box: Letterbox) -> torch.Tensor:
    """(H, W) labels to the model input's size, nearest neighbour on the same grid as the
    image."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    size = (box.inner_height, box.inner_width)
    if size != tuple(mask.shape):
        t = F.interpolate(t, size=size, mode="nearest-exact")
    bottom = box.model_height - box.top - box.inner_height
    right = box.model_width - box.left - box.inner_width
    return F.pad(t, (box.left, right, box.top, bottom))[0, 0].round().long()


def volume_slices(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    in_channels: int,
    normalisation: Normalisation,
    n_classes: int,
    axes: Iterable[int],
    spacing: tuple[float, ...] | None,
    name: str,
    keep: dict[int, Sequence[int]] | None = None,
    rule: InputRule | None = None,
) -> SliceSet:
    """Slices of a 2D image or 3D volume and its labels; `keep` limits the slices per axis;
    `rule`: the model's input rule (see training_rule)."""
    rule = training_rule(rule)
    check_labels(labels, n_classes, name)
    if labels.shape != image.shape[: labels.ndim]:
        raise InputError(f"image shape {image.shape} and label shape {labels.shape} differ", name)
    images, masks, names = [], [], []
    for axis in axes if labels.ndim == 3 else [0]:
        prepared = prepare_image(
            image,
            in_channels=in_channels,
            normalisation=normalisation,
            axis=axis,
            spacing=spacing,
            source=name,
            rgb=image.ndim == labels.ndim + 1,
            rule=rule,
        )
        chosen = range(prepared.n_slices) if keep is None else keep.get(axis, [])
        for index in chosen:
            mask = np.take(labels, index, axis=axis) if labels.ndim == 3 else labels
            if np.count_nonzero(mask) < MIN_FOREGROUND * mask.size:
                continue
            images.append(_model_input(prepared, index))
            masks.append(letterbox_mask(mask, prepared.letterbox))
            names.append(f"{name}[axis {axis}, slice {index}]" if labels.ndim == 3 else name)
    if not images:
        return SliceSet.empty(in_channels, rule.size)  # type: ignore[arg-type]
    return SliceSet(torch.stack(images), torch.stack(masks), names)


def _model_input(prepared: PreparedImage, index: int) -> torch.Tensor:
    pixels = torch.from_numpy(prepared.slice_input(index))[None]
    return prepared.letterbox.to_model(pixels)[0]


def check_labels(labels: np.ndarray, n_classes: int, name: str) -> None:
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise InputError("mask values must be whole numbers (class labels)", name)
    values = np.unique(labels)
    outside = [int(v) for v in values if not 0 <= v < n_classes]
    if outside:
        raise InputError(
            f"mask has labels {outside[:10]} outside the declared classes 0..{n_classes - 1}",
            name,
        )


def folder_pairs(root: Path, image_dir: str, mask_dir: str, suffixes: tuple[str, ...]):
    """(image, mask) paths with the same stem in two sub-folders; InputError listing gaps."""
    images_path, masks_path = root / image_dir, root / mask_dir
    for folder in (images_path, masks_path):
        if not folder.is_dir():
            raise InputError(f"expected a folder '{folder.name}/' here", root)
    images = {stem_of(p): p for p in sorted(images_path.iterdir()) if _suffix_in(p, suffixes)}
    masks = {stem_of(p): p for p in sorted(masks_path.iterdir()) if _suffix_in(p, suffixes)}
    missing = sorted(set(images) - set(masks))
    extra = sorted(set(masks) - set(images))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no mask for {', '.join(missing[:5])}")
        if extra:
            parts.append(f"no image for mask(s) {', '.join(extra[:5])}")
        raise InputError("; ".join(parts), root)
    if not images:
        raise InputError(f"no images in {image_dir}/", root)
    return [(images[k], masks[k]) for k in sorted(images)]


def split_pairs(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """Files for training and validation (at least one each), chosen with `seed`."""
    if len(pairs) < 2:
        raise InputError(f"need at least 2 image/mask pairs to hold one out, found {len(pairs)}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = max(1, round(fraction * len(pairs)))
    val = sorted(order[:held].tolist())
    return [p for i, p in enumerate(pairs) if i not in val], [pairs[i] for i in val]


def _suffix_in(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.is_file() and compound_suffix(path) in suffixes


def read_pair(image_path: Path, mask_path: Path) -> tuple[ImageFile, np.ndarray]:
    image = read_image_file(image_path)
    mask = read_image_file(mask_path)
    labels = mask.data
    if mask.rgb:  # a colour mask: one channel holds the labels if all agree
        if not (np.array_equal(labels[..., 0], labels[..., 1])):
            raise InputError(
                "colour masks are not supported; store class labels as grey", mask_path
            )
        labels = labels[..., 0]
    spatial = image.data.shape[: image.data.ndim - int(image.rgb)]
    if labels.shape != spatial:
        raise InputError(
            f"mask of shape {labels.shape} does not match its image {image_path.name} of "
            f"shape {spatial}",
            mask_path,
        )
    return image, labels


def load_pairs(
    pairs: Sequence[tuple[Path, Path]],
    *,
    in_channels: int,
    normalisation: Normalisation,
    n_classes: int,
    axes: Iterable[int] = (0, 1, 2),
    rule: InputRule | None = None,
) -> SliceSet:
    """Read every pair; binary masks stored as 0/255 are read as 0/1."""
    parts = []
    for image_path, mask_path in pairs:
        image, labels = read_pair(image_path, mask_path)
        if set(np.unique(labels).tolist()) <= {0, 255}:
            labels = (labels > 0).astype(np.uint8)
        parts.append(
            volume_slices(
                image.data,
                labels,
                in_channels=in_channels,
                normalisation=normalisation,
                n_classes=n_classes,
                axes=axes,
                spacing=image.spacing,
                name=str(image_path),
                rule=rule,
            )
        )
    if not parts:
        size = training_rule(rule).size
        return SliceSet.empty(in_channels, size)  # type: ignore[arg-type]
    return SliceSet.join(parts)


def image_folder(root: Path, **options) -> SliceSet:
    """(a) `images/` + `masks/` of 2D PNG/TIFF."""
    return load_pairs(folder_pairs(root, "images", "masks", IMAGE_SUFFIXES), axes=(0,), **options)


def nifti_folder(root: Path, axes: Iterable[int], **options) -> SliceSet:
    """(b) `images/` + `labels/` of NIfTI volumes, cut along `axes` (RAS: 0 sagittal, 1
    coronal, 2 axial)."""
    return load_pairs(folder_pairs(root, "images", "labels", NIFTI_SUFFIXES), axes=axes, **options)


def release_split(root: Path, split: str, **options) -> SliceSet:
    """(c) The authors' layout: ids in `MainPatient/<split>.txt` name `img/<id>.*` and
    `labelcol/<id>.*` (binary masks stored as 0/255 are read as 0/1)."""
    listing = root / "MainPatient" / f"{split}.txt"
    if not listing.is_file():
        raise InputError(f"missing MainPatient/{split}.txt", root)
    ids = [Path(line.split()[0]).name for line in listing.read_text().splitlines() if line.strip()]
    found = {stem_of(p): p for p in (root / "img").glob("*") if p.is_file()}
    masks = {stem_of(p): p for p in (root / "labelcol").glob("*") if p.is_file()}
    names = [stem_of(Path(i)) for i in ids]
    missing = [n for n in names if n not in found or n not in masks]
    if missing:
        raise InputError(
            f"{len(missing)} id(s) of {listing.name} lack img/ or labelcol/ files: "
            f"{', '.join(missing[:5])}",
            root,
        )
    return load_pairs([(found[n], masks[n]) for n in names], axes=(0,), **options)
