"""Lossless compression with the model (docs/DESIGN.md section 16): `tvq compress`."""
