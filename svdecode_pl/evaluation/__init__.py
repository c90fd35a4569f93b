"""Stage 7, evaluation (plain torch, no Lightning): items and records, the settings, the evaluator that
scores and decodes a batch plain and steered, and the judges. May import stages 0-6 (``scoring``, ``decoding``)."""
