"""The runtime every job stands on (docs/DESIGN.md sections 7-9): the compiled fold
over blocks, the immutable Model, the compiled decoding loop, the scoring primitive
(`Context`, `score_ids`) and state files. Decoding, scoring, training and serving call
down into it, never across into each other."""
