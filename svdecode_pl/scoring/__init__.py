"""Stage 5, log-likelihood scoring (plain torch): token ids of prompts and answers, one scoring job
(plain and steered log-probabilities from one forward pass), packing many continuations into one pass with
its attention function, and the batch entry point. May import stages 0-4."""
