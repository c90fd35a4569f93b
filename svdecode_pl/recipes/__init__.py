"""Stage 11, the Lightning recipe that drives the plain-torch stages: the LightningModule (warm-start,
test, predict), its callbacks, the optimizer and the CPU DeepSpeed strategy. May import stages 0-10."""
