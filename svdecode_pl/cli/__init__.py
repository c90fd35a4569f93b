"""Stage 12, the command line: the ``svdecode`` entry point, its LightningCLI (imported only for
fit/validate/test/predict) and every other subcommand's arguments (sweep, report, lm-eval, logit-bias, push).
May import every stage."""

from svdecode_pl.cli.entry import main

__all__ = ["main"]
