"""`tvq serve` (docs/DESIGN.md section 13)."""
