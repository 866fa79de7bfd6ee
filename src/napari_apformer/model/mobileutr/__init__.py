"""MobileUtr (Mobile U-ViT 2-D): network, blocks, FLOPs and the release's checkpoint format.
Registered as the family "mobileutr" (variants "default" and "L")."""

from napari_apformer.model.base import register_family
from napari_apformer.model.mobileutr.network import MobileUtr

register_family(MobileUtr)

__all__ = ["MobileUtr"]
