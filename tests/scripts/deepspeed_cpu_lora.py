"""TEST HELPER: train a tiny Qwen2 + PEFT-LoRA model with DeepSpeed ZeRO on 2 CPU processes.

Run by ``tests/test_deepspeed_cpu.py`` as a subprocess (Lightning's subprocess launcher then re-runs this file
for rank 1)::

    python tests/scripts/deepspeed_cpu_lora.py --stage 3 --base-dir BASE --out OUT

``BASE`` is a ``save_pretrained`` directory of a tiny ``Qwen2ForCausalLM`` (the test creates it). The script

1. fits ``LoRAModule`` (``configure_model`` loads the base model and wraps it with LoRA, so under ZeRO-3 both are
   created sharded inside Lightning's ``deepspeed.zero.Init``) for ``--steps`` steps,
2. gathers the adapter weights and saves them with ``peft_model.save_pretrained`` on rank 0,
3. runs a forward pass of the (still sharded) model on all ranks and saves rank 0's logits,
4. saves a Lightning/DeepSpeed checkpoint, resumes from it with ``ckpt_path`` for ``--resume-steps`` more steps,
and writes ``OUT/summary.json`` (rank 0) for the test to check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

T0 = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, for `svdecode_pl`

import deepspeed  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from svdecode_pl.recipes.strategies import CPUDeepSpeedStrategy  # noqa: E402, F401

torch.set_num_threads(1)  # 2 ranks on 2 cores
warnings.filterwarnings("error", message=".*LoRA tensor\\(s\\) have invalid shape.*")  # PEFT: saved ungathered shards

VOCAB, SEQ = 320, 16


def probe_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1234))


def adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def gathered_copy(params: dict[str, torch.nn.Parameter], zero3: bool) -> dict[str, torch.Tensor]:
    """Full copies of (possibly ZeRO-3-sharded) params. Collective under ZeRO-3: call on ALL ranks."""
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None, enabled=zero3):
        return {n: p.detach().clone() for n, p in params.items()}


class LoRAModule(pl.LightningModule):
    def __init__(self, base_dir: str, lr: float = 0.5, r: int = 4, strict_loading: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.strict_loading = strict_loading
        self.model: PeftModel | None = None
        self.losses: list[float] = []
        self.global_batches: list[torch.Tensor] = []
        self.init_adapter: dict[str, torch.Tensor] = {}
        self.info: dict = {}

    def configure_model(self) -> None:
        # Called inside `strategy.model_sharded_context()` (= deepspeed.zero.Init under ZeRO-3): params are
        # partitioned as each submodule is constructed. Guard: the hook may run more than once.
        if self.model is not None:
            return
        zero3 = getattr(self.trainer.strategy, "zero_stage_3", False)
        # `from_pretrained` only loads into ZeRO-3 shards when transformers knows ZeRO-3 is on (its own
        # zero.Init + rank-0 load + broadcast); HfDeepSpeedConfig must stay referenced while loading.
        hf_ds = HfDeepSpeedConfig(self.trainer.strategy.config) if zero3 else None
        base = Qwen2ForCausalLM.from_pretrained(self.hparams.base_dir)
        del hf_ds
        model = get_peft_model(base, LoraConfig(r=self.hparams.r, lora_alpha=2 * self.hparams.r, task_type="CAUSAL_LM"))
        # PEFT initialises LoRA in place (lora_B = 0). Under zero.Init the freshly created lora Linear layers are
        # already partitioned (empty `.data`), so that init is a no-op: redo it on the gathered params and let
        # rank 0's values be broadcast (modifier_rank=0).
        lora = list(adapter_params(model).values())
        with deepspeed.zero.GatheredParameters(lora, modifier_rank=0, enabled=zero3):
            for m in model.modules():
                if isinstance(m, LoraLayer):
                    m.reset_lora_parameters("default", True)
        self.model = model.train()  # from_pretrained returns the model in eval mode

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        self.losses.append(loss.item())
        self.global_batches.append(self.all_gather(batch).flatten(0, 1))  # both ranks' micro-batches, for the test
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Plain SGD (no momentum): the update is proportional to the gradient, so gradients summed over the ranks
        # instead of averaged give twice the step (AdamW's normalised update would hide that). Adapter params only.
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def on_fit_start(self) -> None:  # engine exists; checkpoint (if any) not restored yet
        zero3 = self.trainer.strategy.zero_stage_3
        named = dict(self.model.named_parameters())
        q = named["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
        self.info["base_param_local_numel"] = q.numel()
        self.info["base_param_partition_numel"] = int(q.ds_tensor.numel()) if hasattr(q, "ds_tensor") else None
        self.info["base_param_full_numel"] = int(getattr(q, "ds_numel", q.numel()))
        self.init_adapter = gathered_copy(adapter_params(self.model), zero3)

    def on_train_start(self) -> None:  # after checkpoint restore
        self.info["start_global_step"] = self.global_step
        self.info["start_adapter"] = gathered_copy(adapter_params(self.model), self.trainer.strategy.zero_stage_3)


def make_trainer(stage: int, out: Path, max_steps: int, exclude_frozen: bool = False) -> pl.Trainer:
    # exclude_frozen_parameters: DeepSpeed checkpoints hold only the adapter (+ optimizer) state; the frozen base
    # comes from `from_pretrained` in configure_model, so resuming then needs `strict_loading = False`.
    # tiny model: make ZeRO-3 really keep every parameter sharded (default keeps params < 1e5 elements whole)
    strategy = CPUDeepSpeedStrategy(
        stage=stage, exclude_frozen_parameters=exclude_frozen, param_persistence_threshold=0
    )
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        precision="32-true",
        max_steps=max_steps,
        default_root_dir=str(out),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--base-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--resume-steps", type=int, default=2)
    ap.add_argument("--exclude-frozen", action="store_true", help="checkpoint only trainable params")
    args = ap.parse_args()
    out = Path(args.out)
    times: dict[str, float] = {"imports": time.time() - T0}

    pl.seed_everything(0, verbose=False)
    data = torch.randint(0, VOCAB, (32, SEQ), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(data, batch_size=4)

    # ---- 1. fit -------------------------------------------------------------------------------------------
    t = time.time()
    trainer = make_trainer(args.stage, out, args.steps, args.exclude_frozen)
    module = LoRAModule(args.base_dir)
    trainer.fit(module, loader)
    times["fit"] = time.time() - t
    strategy = trainer.strategy
    zero3 = strategy.zero_stage_3
    rank = trainer.global_rank
    peft_model = module.model

    # ---- 2. gather the adapter and save it in PEFT format (collective under ZeRO-3) -----------------------
    t = time.time()
    adapter = adapter_params(peft_model)
    with deepspeed.zero.GatheredParameters(list(adapter.values()), modifier_rank=None, enabled=zero3):
        final_adapter = {n: p.detach().clone() for n, p in adapter.items()}
        if trainer.is_global_zero:
            peft_model.save_pretrained(out / "adapter")
    strategy.barrier()
    times["gather_save"] = time.time() - t

    # ---- 3. forward of the sharded model on all ranks (ZeRO-3 fetches each layer's params collectively) ---
    t = time.time()
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=probe_ids()).logits
    all_logits = strategy.all_gather(logits)  # [world, ...]: every rank used the same probe input
    times["forward"] = time.time() - t

    # ---- 4. Lightning checkpoint + resume -----------------------------------------------------------------
    t = time.time()
    ckpt = out / "last.ckpt"
    trainer.save_checkpoint(ckpt)  # all ranks: deepspeed_engine.save_checkpoint -> directory of shards
    trainer2 = make_trainer(args.stage, out, args.steps + args.resume_steps, args.exclude_frozen)
    module2 = LoRAModule(args.base_dir, strict_loading=not args.exclude_frozen)
    trainer2.fit(module2, loader, ckpt_path=str(ckpt))
    times["save_resume"] = time.time() - t

    if rank == 0:
        start = module2.info["start_adapter"]
        summary = {
            "stage": args.stage,
            "world_size": trainer.world_size,
            "zero3": zero3,
            "losses": module.losses,
            "global_step": trainer.global_step,
            "n_params": sum(int(getattr(p, "ds_numel", p.numel())) for p in peft_model.parameters()),
            "trainable": sorted(adapter),
            "frozen_with_lora_in_name": [
                n for n, p in peft_model.named_parameters() if "lora_" in n and not p.requires_grad
            ],
            "lora_B_init_absmax": max(v.abs().max().item() for n, v in module.init_adapter.items() if "lora_B" in n),
            "adapter_max_change": max((final_adapter[n] - module.init_adapter[n]).abs().max().item() for n in adapter),
            "ranks_logits_max_diff": (all_logits - all_logits[0]).abs().max().item(),
            "ckpt_is_dir": ckpt.is_dir(),
            "ckpt_bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
            "exclude_frozen": args.exclude_frozen,
            "resume_start_global_step": module2.info["start_global_step"],
            "resume_final_global_step": trainer2.global_step,
            "resume_adapter_max_diff": max((start[n] - final_adapter[n]).abs().max().item() for n in adapter),
            "resume_losses": module2.losses,
            "times": times,
        }
        summary["sharding"] = {k: v for k, v in module.info.items() if k.startswith("base_param")}
        torch.save({"probe_ids": probe_ids(), "logits": logits}, out / "probe_logits.pt")
        # for a single-process reference run of the same steps (global batch = both ranks' micro-batches)
        reference = {"batches": module.global_batches, "init_adapter": module.init_adapter, "lr": module.hparams.lr}
        torch.save(reference, out / "reference.pt")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps({k: summary[k] for k in ("losses", "adapter_max_change", "times")}), flush=True)
    strategy.barrier()
    # as ``svdecode`` does: a gloo group left to the interpreter's teardown can abort the process
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
