"""Scoring files (docs/DESIGN.md section 8): the job behind `tvq score` (`job.score_files`),
the stream and its protocols, the statistics of a scored text, many texts at once,
comparison with a baseline, the long-context curve."""
