"""The LightningModule: warm-start a PEFT adapter, then score with and without steering."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from peft import PeftConfig
from torch import nn

from svdecode_pl.evaluation.columns import record_row, table_columns
from svdecode_pl.evaluation.evaluator import Evaluator
from svdecode_pl.evaluation.items import Record
from svdecode_pl.evaluation.settings import EvaluationSettings, ScoringSettings
from svdecode_pl.metrics.per_question import QuestionTable
from svdecode_pl.models.adapters import (
    check_checkpoint_weights,
    initialize_adapter,
    load_checked_adapter,
    save_adapter,
)
from svdecode_pl.models.device_defaults import EvaluationDefaults, choose_evaluation_defaults, free_memory_of
from svdecode_pl.models.heads import hf_model, output_vocab_size, target_hidden_states
from svdecode_pl.models.loading import DType, load_causal_lm, load_tokenizer, tokenizer_fingerprint
from svdecode_pl.models.peft_methods import peft_method
from svdecode_pl.models.zero import hf_zero3_loading
from svdecode_pl.recipes.host import SteeringHost
from svdecode_pl.recipes.optimizer import OptimizerName, build_optimizer
from svdecode_pl.results.payload import (
    estimate_metrics,
    format_table,
    results_payload,
    table_metrics,
    test_curves,
    test_difference,
    write_results,
)
from svdecode_pl.steering.strength import Candidate
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.errors import OptionError
from svdecode_pl.utils.seeding import run_seed
from svdecode_pl.utils.validation import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, check_values

MODULE_RULES = {"learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE, "chunk_tokens": POSITIVE_INT,
                "score_batch_tokens": COUNT.or_none()}


class SVDecodeModule(LightningModule):
    """A causal LM with an optional PEFT adapter.

    ``fit`` trains the adapter with the causal LM loss on the answer tokens only; at its end the
    :class:`~svdecode_pl.callbacks.SteeringVectorCallback` (which ``svdecode`` always adds; a Trainer
    built by hand needs it, ``enabled=False`` for the adapter alone) extracts the vector on the
    training device and writes the adapter and the vector, through :meth:`steering_host`. ``test``
    scores every question plain and steered (when a vector is attached) and writes ``results.json``;
    ``predict`` returns per-question records.
    """

    def __init__(
        self,
        name_or_path: str = "svdecode-tiny",
        peft: PeftConfig | None = None,
        adapter_path: str | None = None,
        dtype: DType = "float32",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        chunk_tokens: int = 256,
        score_batch_tokens: int | None = None,
        attn_implementation: str | None = None,
        init_seed: int | None = None,
        optimizer: OptimizerName = "adamw",
    ) -> None:
        """
        Args:
            name_or_path: Hub id or local directory of any HF causal LM, or a built-in tiny
                model (``svdecode-tiny``, ``svdecode-tiny-llama``).
            peft: A PEFT config (``class_path: peft.LoraConfig``, ``peft.IA3Config``,
                ``peft.PromptTuningConfig``, ``peft.PrefixTuningConfig``); null: no adapter.
            adapter_path: A saved PEFT adapter to load instead of creating one from ``peft``.
            dtype: Weights' dtype; the steering math always runs in float32.
            learning_rate: Learning rate of the adapter.
            weight_decay: Decoupled (AdamW) weight decay; plain L2 for SGD.
            chunk_tokens: Positions whose logits are materialised at once (memory bound at
                large vocabularies).
            score_batch_tokens: None (default): chosen from the device (CPU 0, CUDA sized from free
                memory; see :func:`~svdecode_pl.models.device_defaults.choose_evaluation_defaults`,
                printed once and recorded in results.json). 0: the questions of a loader batch packed
                one after the other into long rows, each attending only to itself and the cached primer, so a question's
                scores do not depend on which questions share a pass and 1 and N processes agree bit
                for bit (on CPU). N > 0: length-sorted questions batched with padding up to N tokens
                (for GPUs, e.g. 16384; float32 rounding then varies with the batch, ~1e-8).
            attn_implementation: The model's attention (``sdpa``, ``eager``, ...); None: transformers'
                default (``sdpa`` where the model has it; packed scoring needs ``sdpa`` or ``eager``).
            init_seed: Seed of the adapter's initialisation: the same adapter under any
                strategy (DDP, ZeRO-2/3) and any number of processes. None: the global seed of
                ``--seed_everything`` (so seeds vary the adapter), 0 without one.
            optimizer: ``adamw``, or ``sgd`` (no momentum: the update is proportional to the
                gradient). Under ZeRO-Offload AdamW is DeepSpeed's CPU AdamW (DeepSpeed refuses
                a torch optimizer there), see :func:`svdecode_pl.recipes.optimizer.build_optimizer`.
        """
        super().__init__()
        check_values("--model.", {"learning_rate": learning_rate, "weight_decay": weight_decay,
                                  "chunk_tokens": chunk_tokens, "score_batch_tokens": score_batch_tokens},
                     MODULE_RULES)
        peft_method(peft)  # a method the project does not support: one line, before any work
        self.save_hyperparameters(ignore=["peft"])
        # the adapter config is recorded by LightningCLI's config.yaml and PEFT's adapter_config.json
        self.peft_config = peft
        self.model: nn.Module | None = None
        self.tokenizer = None
        #: The one owner of the evaluation settings, a value replaced (never written in place): scoring here,
        #: the task's decoding and judges at test/predict start, steering by the callback (attach_steering).
        self.evaluation = EvaluationSettings(ScoringSettings(chunk_tokens, score_batch_tokens or 0))
        self.evaluation_defaults: EvaluationDefaults | None = None  # the device's choice, once
        self.strict_loading = False  # checkpoints hold only the trainable (adapter) weights
        self.eval_table: QuestionTable | None = None
        self._evaluator: Evaluator | None = None
        self.completed_predictions: set[int] = set()  # uids a resumed prediction writer already holds

    # -- model ----------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Create the model (sharded when the strategy asks for it) and attach the adapter."""
        if self.model is not None:
            return
        trainer = self._trainer  # None when used outside a Trainer
        with hf_zero3_loading(trainer):
            model = load_causal_lm(self.hparams.name_or_path, self.hparams.dtype, self.hparams.attn_implementation)
        model.requires_grad_(False)
        if self.hparams.adapter_path:
            model = load_checked_adapter(model, self.hparams.adapter_path, self.hparams.name_or_path, trainer)
        elif self.peft_config is not None:
            from peft import get_peft_model

            config = copy.deepcopy(self.peft_config)
            config.task_type = config.task_type or "CAUSAL_LM"
            model = get_peft_model(model, config)
            initialize_adapter(model, run_seed(self.hparams.init_seed), trainer)
        self.model = model.train()  # from_pretrained returns eval mode; Lightning sets modes per stage

    def setup(self, stage: str) -> None:
        self.tokenizer = load_tokenizer(self.hparams.name_or_path)

    @property
    def steering_vector(self) -> SteeringVector | None:
        """The steering vector of the evaluation settings (None: plain only)."""
        return self.evaluation.steering.vector

    @steering_vector.setter
    def steering_vector(self, vector: SteeringVector | None) -> None:
        self.attach_steering(vector, self.evaluation.steering.curves, self.evaluation.steering.extra)

    @property
    def vocab_size(self) -> int:
        return output_vocab_size(self.model)

    def steering_metadata(self) -> dict[str, Any]:
        """What a steering vector records about the model it was extracted from."""
        return {
            "model": self.hparams.name_or_path,
            "adapter": None if self.peft_config is None else type(self.peft_config).__name__,
            "vocab_size": self.vocab_size,
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
        }

    def model_summary(self) -> dict[str, Any]:
        """What results.json records of the model: its name and the PEFT method's config class."""
        peft = self.peft_config
        if peft is None and hasattr(self.model, "active_peft_config"):
            peft = self.model.active_peft_config
        return {"name_or_path": self.hparams.name_or_path, "peft": None if peft is None else type(peft).__name__,
                "adapter_path": self.hparams.adapter_path}

    def save_adapter(self, directory: str | Path) -> None:
        """The adapter in PEFT's standard format (``PeftModel.from_pretrained`` loads it);
        every process calls this (collective under ZeRO-3), the first one writes."""
        save_adapter(self.model, directory, self._trainer, self.tokenizer)

    def steering_host(self) -> SteeringHost:
        """What the steering callback may use at the fit end (and at test/predict start): the model on
        the device it trained on, its vocabulary and tokenizer, the evaluation settings (unset options
        chosen for that device first), the vector's metadata and the adapter's writer. The callback
        writes the run's adapter and vector through it, once (``<root>/adapter``)."""
        self._choose_defaults()
        return SteeringHost(self.model, self.vocab_size, self.device, self.tokenizer, self.evaluation,
                            self.steering_metadata(), self.attach_steering, self.save_adapter)

    def attach_steering(self, vector: SteeringVector | None, curves: dict[str, list[float]] | None = None,
                        extra: list[Candidate] | None = None) -> None:
        """Evaluate steered by ``vector`` from now on (None: plain only): new settings replace the old."""
        self.evaluation = self.evaluation.with_steering(vector, curves, extra)

    # -- warm-start -----------------------------------------------------------------------

    def answer_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, targets, head = target_hidden_states(
            self.model, batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        )
        return F.cross_entropy(head(hidden).float(), targets)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.answer_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.answer_loss(batch), prog_bar=True, sync_dist=True,
                 batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params and self.trainer.max_steps == 0:
            return None  # extraction only (e.g. from a loaded adapter): nothing to optimise
        if not params:
            raise OptionError("nothing to train: the model has no adapter (set --model.peft, e.g. peft.LoraConfig)")
        hp = self.hparams
        return build_optimizer(params, hp.optimizer, hp.learning_rate, hp.weight_decay, self._trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # dropout masks after a resume are those of an uninterrupted run
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        # what the checkpoint belongs to, checked before a resume loads anything (cli/run_directory.py)
        checkpoint["svdecode_run"] = {"name_or_path": self.hparams.name_or_path,
                                      "peft": None if self.peft_config is None else type(self.peft_config).__name__}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:
            check_checkpoint_weights(self.model, checkpoint["state_dict"], self.trainer.ckpt_path)
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])

    # -- test / predict -------------------------------------------------------------------

    @property
    def datamodule(self):
        """The trainer's task data module (:class:`~svdecode_pl.tasks.base.TaskDataModule`)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise ValueError("evaluation needs a task data module (data.class_path in the config)")
        return datamodule

    def _choose_defaults(self) -> None:
        """Fill the unset evaluation options from the device, once, and say what was chosen."""
        if self.evaluation_defaults is not None or self.hparams.score_batch_tokens is not None:
            return
        dtype_bytes = next(self.model.parameters()).element_size()
        config = hf_model(self.model).config
        chosen = choose_evaluation_defaults(str(self.device), free_memory_of(self.device), config, dtype_bytes)
        # the attention actually in use (the user's, or transformers' default at load)
        self.evaluation_defaults = replace(chosen, attn_implementation=str(config._attn_implementation))
        scoring = replace(self.evaluation.scoring, score_batch_tokens=self.evaluation_defaults.score_batch_tokens)
        self.evaluation = replace(self.evaluation, scoring=scoring)
        rank_zero_info(self.evaluation_defaults.describe())

    def _start_evaluation(self) -> None:
        self._choose_defaults()
        datamodule = self.datamodule
        self.evaluation = replace(self.evaluation, generation=datamodule.generation_settings(),
                                  judges=datamodule.judge_settings())
        self._evaluator = Evaluator(self.model, self.tokenizer, self.evaluation)

    def evaluate(self, batch: list) -> list[Record]:
        """Records of a batch of evaluation items, plain and steered (then e.g. judged)."""
        return self._evaluator.evaluate(batch, self.device)

    def on_predict_start(self) -> None:
        self._start_evaluation()

    def on_test_start(self) -> None:
        self._start_evaluation()
        columns = table_columns(self.datamodule.metric_names, len(self.evaluation.steering.grid or []))
        self.eval_table = QuestionTable(columns, self.datamodule.eval_groups("test")).to(self.device)

    def test_step(self, batch: list, batch_idx: int) -> None:
        for record in self.evaluate(batch):
            self.eval_table.update(record.uid, record.group, record_row(record))

    def on_test_epoch_end(self) -> None:
        datamodule = self.datamodule
        ids, groups, values = self.eval_table.compute()
        # torchmetrics squeezes a one-element output to 0-d: one test question would index a 0-d mask
        ids, groups = ids.reshape(-1), groups.reshape(-1)
        table = self.eval_table
        metrics, per_group = table_metrics(datamodule.metric_names, table.columns, table.groups, groups, values)
        for name, by_variant in metrics.items():
            for variant, value in by_variant.items():
                if value is not None:
                    self.log(f"test/{name}_{variant}", value, rank_zero_only=True)
        names, columns, steering = datamodule.metric_names, table.columns, self.evaluation.steering
        payload = results_payload(
            datamodule.task_name, int(ids.numel()), self.steering_vector, metrics, self.trainer, per_group=per_group,
            model=self.model_summary(), estimates=estimate_metrics(names, columns, values, steering),
            curves=test_curves(names, columns, values, steering), difference=test_difference(names, columns, values))
        if self.evaluation_defaults is not None:
            payload["evaluation_defaults"] = self.evaluation_defaults.as_dict()
        self._write_results(payload)

    @rank_zero_only
    def _write_results(self, payload: dict[str, Any]) -> None:
        path = write_results(Path(self.trainer.default_root_dir) / "results.json", payload)
        print(format_table(payload))
        print(f"results written to {path}")

    def predict_step(self, batch: list, batch_idx: int) -> list[Record]:
        batch = [item for item in batch if item.uid not in self.completed_predictions]
        return self.evaluate(batch) if batch else []
