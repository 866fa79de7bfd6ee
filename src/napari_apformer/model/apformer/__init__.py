"""APFormer (Lin et al., IEEE TMI 2023): network, attention with adaptive pruning, FLOPs,
losses and the release's checkpoint format. Registered as the family "apformer"."""

from napari_apformer.model.apformer.network import APFormer, EncodedSlices, ModelOutput
from napari_apformer.model.base import register_family

register_family(APFormer)

__all__ = ["APFormer", "EncodedSlices", "ModelOutput"]
