"""Reading images and writing labels, geometry kept (no torch, no Qt)."""
