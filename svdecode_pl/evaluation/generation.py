"""Deprecated path of :mod:`svdecode_pl.decoding.generation` (warns, then is that module)."""

from svdecode_pl._compat import moved_module

moved_module(__name__)
