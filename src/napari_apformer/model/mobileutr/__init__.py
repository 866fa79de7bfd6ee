"""MobileUtr (Mobile U-ViT 2-D): network, blocks, FLOPs and the release's checkpoint format.
Registered as the family "mobileutr" (variants "default" and "L"), and "mobileutr-ap":
MobileUtr with APFormer's adaptive pruning in its transformer stage."""

from napari_apformer.model.base import register_family
from napari_apformer.model.mobileutr.network import MobileUtr
from napari_apformer.model.mobileutr.pruned_network import MobileUtrAP

register_family(MobileUtr)
register_family(MobileUtrAP)

__all__ = ["MobileUtr", "MobileUtrAP"]
