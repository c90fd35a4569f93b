"""Stage 9, the command line: the ``svdecode`` entry point, its LightningCLI (imported only for
fit/validate/test/predict) and ``svdecode sweep``. May import every stage."""

from svdecode_pl.cli.entry import main

__all__ = ["main"]
