"""Compatibility: ``svdecode_pl.strategies.*`` class paths now live in :mod:`svdecode_pl.recipes.strategies`."""

from svdecode_pl._compat import forwarder

__getattr__ = forwarder(__name__, {"CPUDeepSpeedStrategy": "svdecode_pl.recipes.strategies"})
