"""``--seed_everything`` varies the adapter's initialisation and the warm-start order unless
``model.init_seed`` / ``data.seed`` are set; the splits stay the same (paired comparisons)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything

from svdecode_pl.tasks import TruthfulQADataModule
from svdecode_pl.utils.seeding import run_seed


def test_run_seed_prefers_explicit_then_global(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert run_seed(None) == 0
    seed_everything(7, verbose=False)
    assert run_seed(None) == 7
    assert run_seed(3) == 3


def warm_start_order(seed: int | None, global_seed: int) -> tuple[list[str], list]:
    seed_everything(global_seed, verbose=False)
    dm = TruthfulQADataModule(synthetic_questions=40, train_fraction=0.5, seed=seed, batch_size=4)
    batch = next(iter(dm.lm_dataloader("train", shuffle=True)))
    return [q.id for q in dm.split("test")], batch["input_ids"].tolist()  # (the primer is shared)


@pytest.mark.parametrize("explicit", [None, 5])
def test_global_seed_varies_order_not_splits(explicit):
    test_a, order_a = warm_start_order(explicit, 1)
    test_b, order_b = warm_start_order(explicit, 2)
    assert test_a == test_b
    assert (order_a != order_b) == (explicit is None)


def test_global_seed_varies_adapter_init():
    from svdecode_pl.recipes.module import SVDecodeModule

    def lora_a(global_seed: int, init_seed: int | None) -> torch.Tensor:
        from peft import LoraConfig

        seed_everything(global_seed, verbose=False)
        module = SVDecodeModule(peft=LoraConfig(r=2, target_modules=["q_proj"]), init_seed=init_seed)
        module.configure_model()
        return next(p for n, p in module.model.named_parameters() if "lora_A" in n).detach().clone()

    assert not torch.equal(lora_a(1, None), lora_a(2, None))
    assert torch.equal(lora_a(1, 4), lora_a(2, 4))
