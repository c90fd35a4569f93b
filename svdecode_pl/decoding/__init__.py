"""Stage 6, decoding (plain torch): the mapping onto HF ``generate`` (settings, static steering as a logits
processor, merged and compiled decoding) and the dynamic loop with its streams, mixed rows and beams.
May import stages 0-5."""
