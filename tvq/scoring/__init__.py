"""Scoring files (docs/DESIGN.md section 8): the stream and its protocols, the
statistics of a scored text, many texts at once, comparison with a baseline, the
long-context curve."""
