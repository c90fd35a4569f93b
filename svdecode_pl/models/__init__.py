"""Stage 3, model glue: loading HF causal LMs, the tiny models built in code, output-head helpers,
PEFT adapters (init, checked load, save), ZeRO, and the
evaluation defaults a device and a model's shapes imply. May import ``utils``, ``corpus``, ``metrics``."""
