"""Deprecated path of :mod:`svdecode_pl.integrations.artifact` (warns, then is that module)."""

from svdecode_pl._compat import moved_module

moved_module(__name__)
