"""The recipe's callbacks: steering vector extraction and attachment, the JSONL prediction writer,
run checkpoints and the phase-named progress bar."""

from svdecode_pl.recipes.callbacks.checkpoint import RunCheckpoint
from svdecode_pl.recipes.callbacks.prediction_writer import JSONLPredictionWriter
from svdecode_pl.recipes.callbacks.progress import PhaseProgressBar
from svdecode_pl.recipes.callbacks.steering import SteeringVectorCallback

__all__ = ["JSONLPredictionWriter", "PhaseProgressBar", "RunCheckpoint", "SteeringVectorCallback"]
