"""Devices and processes (docs/DESIGN.md section 12): the mesh and its shardings, and
joining a cluster. Imports nothing of tvq but its errors."""
