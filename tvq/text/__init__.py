"""Text in and out: tokenizers and samplers (docs/DESIGN.md sections 7-8). Imports
nothing of tvq but its errors."""
