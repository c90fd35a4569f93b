"""Stage 2, metrics: per-question scores (MC1/MC2/MC3, accuracy, BLEU/ROUGE, exact match) and the one
torchmetrics state that reduces them across processes. May import ``utils``, ``corpus``."""
