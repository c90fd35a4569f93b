"""Stage 8, the parts that talk to other tools: the lm-evaluation-harness backend, the adapter +
steering artifact with its transformers ``custom_generate`` and Hub upload, and the serving
``logit_bias`` export. May import stages 0-7."""
