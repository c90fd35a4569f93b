"""The ``svdecode`` command: a LightningCLI over SVDecodeModule and the task data modules."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from svdecode_pl.allocator import keep_freed_memory
from svdecode_pl.callbacks.progress import PhaseProgressBar
from svdecode_pl.callbacks.steering import SteeringVectorCallback
from svdecode_pl.data.base import TaskDataModule
from svdecode_pl.errors import DEBUG_ENV, user_error_message
from svdecode_pl.module import SVDecodeModule


class SVDecodeCLI(LightningCLI):
    """``svdecode fit|validate|test|predict --config FILE``; see ``svdecode fit --help``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data module tokenizes with the model's own tokenizer.
        parser.link_arguments("model.name_or_path", "data.init_args.tokenizer")
        # ``steering:`` is a top-level key of every subcommand: an ablation is a two-line delta that
        # never touches ``trainer.callbacks``; the callback is added to the trainer's callbacks.
        parser.add_lightning_class_args(SteeringVectorCallback, "steering")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """``test`` prints the project's own results table (plain, steered, the change, the mu
        curve), not Lightning's list of logged values as well."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand in ("test", "validate"):
            kwargs["verbose"] = False
        return kwargs

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        """The phase-named progress bar, unless the config brings its own or turns bars off."""
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in [*listed, *callbacks]
        ):
            callbacks = [*callbacks, PhaseProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def _quiet() -> None:
    """Silence warnings that say nothing actionable to a user of this CLI."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*`loftq_config` specified but will be ignored.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


class _DropInfo(logging.Filter):
    """Drops Lightning's lines that tell a user nothing to act on (hardware probes, logger tips)."""

    NOISE = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip", "Seed set to")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.NOISE)


def _console() -> None:
    """A console that shows the run's progress and results, and nothing a user cannot act on."""
    for message in (
        ".*The `srun` command is available.*",
        ".*`tensorboardX` has been removed as a dependency.*",
        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*Total length of `.*` across ranks is zero.*",
        ".*Checkpoint directory .* exists and is not empty.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            target.addFilter(_DropInfo())
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed then says nothing of a missing GPU
    except ImportError:  # pragma: no cover
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars


def run_cli(args: list[str] | None = None) -> SVDecodeCLI:
    """Parse ``args`` (default: the command line), run the subcommand, return the CLI object
    (None for ``sweep`` and ``report``, which are not Lightning subcommands)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["sweep"]:
        from svdecode_pl.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv[:1] == ["report"]:
        from svdecode_pl.report import main as report_main

        return report_main(argv[1:])
    _quiet()
    _console()
    return SVDecodeCLI(
        SVDecodeModule,
        TaskDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


DEBUG_HELP = (
    "Besides fit/validate/test/predict: `svdecode sweep SPEC` runs a grid of configs (see "
    "configs/sweeps/), `svdecode report RUNS_DIR` writes its tables and figures.\n"
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
        sys.exit(2)
    finally:
        release_process_group()


def release_process_group() -> None:
    """Destroy torch.distributed's process groups while the interpreter is still whole. Left to
    the interpreter's teardown, gloo's worker threads can abort a rank after a finished run
    ("terminate called without an active exception", pytorch/pytorch#190489), and under ``srun``
    one aborted task fails the whole job step. A local call: no rank waits for another."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
