"""``svdecode lm-eval``: lm-eval's own ``run`` command with the steered model class registered
(:mod:`svdecode_pl.integrations.lm_eval_backend`)."""

from __future__ import annotations

import sys

from svdecode_pl.integrations.lm_eval_backend import lm_eval_argv
from svdecode_pl.utils.errors import OptionError


def main(args: list[str]) -> None:
    """``svdecode lm-eval [lm-eval run options]``: lm-eval's own CLI (so ``--output_path``,
    ``--log_samples``, ``--limit`` write lm-eval's own files) with this class registered."""
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, lm_eval_argv(args)
    try:
        cli_evaluate()
    except ValueError as error:
        if str(error).startswith("Tasks not found"):
            raise OptionError(f"--tasks: {error} (`lm-eval ls tasks` lists them; --include_path DIR adds "
                              "local task YAMLs)") from error
        raise
    finally:
        sys.argv = saved
