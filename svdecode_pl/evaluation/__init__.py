"""Stage 5, evaluation (plain torch, no Lightning): items and records, the evaluator, scoring with its
packing and attention function, generation and dynamic decoding, judges. May import stages 0-4."""
