"""Compatibility: ``svdecode_pl.callbacks.*`` class paths now live in :mod:`svdecode_pl.recipes.callbacks`."""

from svdecode_pl._compat import forwarder

__getattr__ = forwarder(__name__, {
    name: "svdecode_pl.recipes.callbacks"
    for name in ("RunCheckpoint", "JSONLPredictionWriter", "PhaseProgressBar", "SteeringVectorCallback")
})
