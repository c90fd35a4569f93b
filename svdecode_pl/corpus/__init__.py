"""Stage 1, text the package generates or ships: the QA primer, the MC question schema, the generated
TruthfulQA-like task and its worlds, and the tiny models' tokenizer corpus. Plain Python; may import ``utils``."""
