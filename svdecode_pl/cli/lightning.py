"""The LightningCLI of ``svdecode``: SVDecodeModule with the task data modules, and a console
that shows a user what they can act on. :mod:`svdecode_pl.cli.entry` imports it only for the Lightning
subcommands, so ``svdecode report`` and ``svdecode sweep`` start without Lightning."""

from __future__ import annotations

import logging
import os
import warnings

from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from svdecode_pl.cli.checks import describe_parser_error
from svdecode_pl.cli.preflight import preflight
from svdecode_pl.cli.run_directory import check_given_checkpoint, claim_run_directory
from svdecode_pl.recipes.callbacks.progress import PhaseProgressBar
from svdecode_pl.recipes.callbacks.steering import SteeringVectorCallback
from svdecode_pl.recipes.module import SVDecodeModule
from svdecode_pl.tasks.base import TaskDataModule

# every task data module imported, so that LightningCLI knows them by their short names too
from svdecode_pl.tasks.commonsense import CommonsenseDataModule  # noqa: F401
from svdecode_pl.tasks.completion import PromptCompletionDataModule  # noqa: F401
from svdecode_pl.tasks.truthfulqa_gen import TruthfulQAGenerationDataModule  # noqa: F401
from svdecode_pl.tasks.truthfulqa_mc import TruthfulQADataModule  # noqa: F401
from svdecode_pl.utils.run_lock import release_run_locks


class SVDecodeParser(LightningArgumentParser):
    """A parser that raises its complaint instead of printing 70 lines of usage before it:
    :func:`build_cli` makes it one line and a hint. ``--help`` is unchanged."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["exit_on_error"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> None:
        try:
            super().error(message, ex)
        except ArgumentError as err:
            if getattr(err, "svdecode_parser", None) is None:
                err.svdecode_parser = getattr(ex, "subcommand_parser", None) or self
            raise


class SVDecodeCLI(LightningCLI):
    """``svdecode fit|validate|test|predict --config FILE``; see ``svdecode fit --help``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data module tokenizes with the model's own tokenizer.
        parser.link_arguments("model.name_or_path", "data.init_args.tokenizer")
        # ``steering:`` is a top-level key of every subcommand: an ablation is a two-line delta that
        # never touches ``trainer.callbacks``; the callback is added to the trainer's callbacks.
        parser.add_lightning_class_args(SteeringVectorCallback, "steering")

    def _parse_ckpt_path(self) -> None:
        """The checkpoint checked (kind, model, PEFT method) before Lightning reads its hyper-parameters."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_given_checkpoint(self.config[subcommand])
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Paths and option combinations checked before any class (so any model) is built; then the
        run directory claimed for this command (its lock, what it may hold, the checkpoint)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        preflight(config)
        claim_run_directory(config, self.subcommand)

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


class _DropHFNoise(logging.Filter):
    """Drops transformers' notice that ``past_key_values`` is renamed: the calls work, across the
    transformers versions we support, and a user can do nothing about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`past_key_values`/`cache_params` are deprecated" not in str(record.getMessage())


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
    hf_logging.get_logger()  # configures the library's handler, where the filter must sit
    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(_DropHFNoise())


def build_cli(args: list[str] | None = None) -> SVDecodeCLI:
    """Parse ``args`` (default: the command line) and run the Lightning subcommand."""
    _quiet()
    _console()
    try:
        return SVDecodeCLI(
            SVDecodeModule,
            TaskDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=SVDecodeParser,
            args=args,
        )
    except ArgumentError as err:
        raise describe_parser_error(str(err), _innermost_parser(err)) from err
    finally:
        release_run_locks()  # the run directory's lock, however the command ended


def _innermost_parser(error: BaseException) -> LightningArgumentParser | None:
    """The parser that raised first (a subcommand's, which knows the subcommand's options)."""
    parser = None
    while error is not None:
        parser = getattr(error, "svdecode_parser", None) or parser
        error = error.__cause__ or error.__context__
    return parser
