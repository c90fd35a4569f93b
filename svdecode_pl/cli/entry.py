"""The ``svdecode`` command: a LightningCLI over SVDecodeModule and the task data modules
(:mod:`svdecode_pl.cli.lightning`), and the ``sweep`` and ``report`` subcommands, which start
without importing Lightning."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from svdecode_pl.utils.allocator import keep_freed_memory
from svdecode_pl.utils.errors import DEBUG_ENV, OptionError, user_error_hint, user_error_message

if TYPE_CHECKING:
    from svdecode_pl.cli.lightning import SVDecodeCLI


def run_cli(args: list[str] | None = None) -> SVDecodeCLI:
    """Parse ``args`` (default: the command line), run the subcommand, return the CLI object
    (None for ``sweep`` and ``report``, which are not Lightning subcommands)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["sweep"]:
        from svdecode_pl.cli.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv[:1] == ["report"]:
        from svdecode_pl.cli.report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["lm-eval"]:
        return lm_eval_main(argv[1:])
    if argv[:1] == ["logit-bias"]:
        from svdecode_pl.cli.logit_bias import main as logit_bias_main

        return logit_bias_main(argv[1:])
    if argv[:1] == ["push"]:
        from svdecode_pl.cli.push import main as push_main

        return push_main(argv[1:])
    from svdecode_pl.cli.checks import check_config_files

    check_config_files(argv)  # before Lightning's 6 s import: a missing or broken file is one line now
    from svdecode_pl.cli.lightning import build_cli

    return build_cli(args)


def lm_eval_main(args: list[str]) -> None:
    """``svdecode lm-eval``: lm-eval's own ``run`` command with the steered model class registered;
    lm-eval is an optional extra, so its absence is one line, not a traceback."""
    try:
        from svdecode_pl.cli.lm_eval import main as cli_main
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "lm_eval":
            raise
        raise OptionError("svdecode lm-eval: lm-evaluation-harness is not installed "
                          "(pip install 'svdecode-pl[lm-eval]')") from None
    cli_main(args)


DEBUG_HELP = (
    "Besides fit/validate/test/predict: `svdecode sweep SPEC` runs a grid of configs (see "
    "configs/sweeps/), `svdecode report RUNS_DIR` writes its tables and figures, "
    "`svdecode lm-eval --model_args pretrained=...,peft=...,steering=... --tasks ...` evaluates a steered "
    "model on lm-eval tasks (lm-eval's own options), `svdecode logit-bias STEERING_DIR` exports static "
    "steering as a server's logit_bias, `svdecode push RUN_DIR REPO_ID` uploads a run's adapter + steering "
    "vector as one Hub repo.\n"
    f"Errors in your input (data files, steering artifacts, adapters, model paths, option values) are "
    f"reported as one line and exit status 2; add --debug (or set {DEBUG_ENV}=1) to see their traceback."
)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``svdecode`` console script: a user's mistake becomes one line on stderr
    and exit status 2 (its traceback with ``--debug`` or ``SVDECODE_DEBUG=1``); a bug keeps its
    traceback. ``--debug`` is passed on as the environment variable, which the processes that
    Lightning's launcher starts for the other ranks inherit."""
    argv = sys.argv[1:] if args is None else list(args)
    if "--debug" in argv:
        os.environ[DEBUG_ENV] = "1"
        argv = [arg for arg in argv if arg != "--debug"]
        if args is None:
            sys.argv[1:] = argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(DEBUG_HELP)
    keep_freed_memory()
    try:
        run_cli(None if args is None else argv)
    except Exception as error:
        message = user_error_message(error)
        if message is None or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no"):
            raise
        print(f"svdecode: error: {message}", file=sys.stderr, flush=True)
        hint = user_error_hint(error)
        if hint:
            print(f"svdecode: hint: {hint}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        release_process_group()


def release_process_group() -> None:
    """Destroy torch.distributed's process groups while the interpreter is still whole. Left to
    the interpreter's teardown, gloo's worker threads can abort a rank after a finished run
    ("terminate called without an active exception", pytorch/pytorch#190489), and under ``srun``
    one aborted task fails the whole job step. A local call: no rank waits for another. Nothing
    to do (and no torch import) when the run never loaded torch.distributed (``report``, ``sweep``)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
