"""Files on disk (docs/DESIGN.md sections 10, 14): atomic writes, model directories,
reference checkpoints and warm-start files."""
