"""Stage 3, model glue: loading HF causal LMs, the tiny models built in code, output-head helpers,
PEFT adapters (init, checked load, save) and ZeRO. May import ``utils``, ``corpus``, ``metrics``."""
