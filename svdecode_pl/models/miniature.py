"""``svdecode-mini``: a tiny Qwen2 *pre-trained in code* on text where misconceptions dominate.

Why it exists. SVDecode's premise (Hu et al., NeurIPS 2025) is a *pre-trained* model whose output
distribution differs from the task's; a short warm-start moves part of the way; the KL gradient
between the warm-started and the pre-trained distribution is the task direction, and steering along
it extrapolates. A random-init model (``svdecode-tiny``) has no meaningful pre-trained distribution,
so the premise cannot hold there. This model is pre-trained on ``svdecode_pl.corpus.miniature``
(the task's world; myth answers are misconceptions with p = 0.75, facts always true), so the
premise holds by construction. The random-init models stay for tests that need speed.

Design (fixed before any steering measurement; nothing here was tuned on steering results):

* Shape: svdecode-tiny's (hidden 64, 2 layers, 4 heads / 2 KV heads, intermediate 256, tied
  embeddings) and the project's BPE tokenizer unchanged (same fingerprint as ``svdecode-tiny``).
  Two layers allow the induction-style copy of "{action} {thing}" into answers; 128 x 4 was ~4x
  slower per token, over the build budget on 2 cores.
* Steps: pre-train to convergence on the prior, judged only by :func:`prior_diagnostic` (no
  steering): P(truthful class) on myth questions near the corpus's 0.25, fact accuracy 1.
  300 AdamW steps x 16 documents, lr 1e-2, 20 warm-up steps, cosine to 10 %, wd 0.01, clip 1.0.
  History: 150 x 32 at lr 3e-3 failed the diagnostic (P(truthful) 0.13, facts 0.05), so the step
  count was doubled at the same compute and the lr raised; this passed (0.214, 1.0).
* Determinism: seeded torch and one seeded document stream; the cache directory's name is a hash
  of the recipe and the corpus tables. Floats may differ in the last bits across CPU thread counts
  (matmul reduction order); the recipe is the same.
* Build: on first use, into ``$SVDECODE_CACHE`` (default ``~/.cache/svdecode_pl``), atomically;
  in a child process when a process group is up (``save_pretrained`` writes on rank 0 only).

This module is the one code path of the whole family of miniatures (pre-training, recipe key,
prior diagnostic); ``svdecode-mini`` is its first member. The family, its other members and which
of them is kept out of tuning: :mod:`svdecode_pl.models.family`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from svdecode_pl.corpus.miniature import CORPUS_RECIPE, corpus_tables, document, document_stream, recipe_world
from svdecode_pl.corpus.primer import QA_PRIMER, mc_prompt
from svdecode_pl.models.tiny import build_tokenizer, save_model_dir

NAME = "svdecode-mini"
#: A prior diagnostic passes when P(truthful class) on myth questions lies within this of
#: 1 - misconception_share and fact accuracy is at least FACT_ACCURACY_FLOOR (fixed before any
#: member but svdecode-mini was built; svdecode-mini's 0.214 vs 0.25 and 1.0 pass).
P_TRUTHFUL_TOLERANCE = 0.1
FACT_ACCURACY_FLOOR = 0.9

RECIPE: dict = dict(
    CORPUS_RECIPE,
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    steps=300, batch=16, lr=1e-2, warmup=20, final_lr_fraction=0.1, weight_decay=0.01, seed=0,
)

Log = Callable[[str], None] | None


def _batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded ids + EOS, loss on every real token (as in pre-training)."""
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    length = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def _model(tokenizer, recipe: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h = recipe["hidden_size"]
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=h, intermediate_size=4 * h,
        num_hidden_layers=recipe["num_layers"], num_attention_heads=recipe["num_heads"],
        num_key_value_heads=recipe["num_kv_heads"], max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def lr_factor(step: int, recipe: dict) -> float:
    """Linear warm-up, then cosine down to ``final_lr_fraction``."""
    steps, warmup, floor = recipe["steps"], recipe["warmup"], recipe["final_lr_fraction"]
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model, recipe: dict) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe["lr"], betas=(0.9, 0.95))


def pretrain(recipe: dict = RECIPE, log: Log = print, log_every: int = 50, name: str = NAME):
    """(model, tokenizer) pre-trained by the recipe in plain torch; the global RNG is left as found.
    The tokenizer is trained on the recipe's world (for ``superstitions``: the tiny models' own)."""
    tokenizer = build_tokenizer(words=recipe_world(recipe).corpus_words())
    state = torch.random.get_rng_state()
    torch.manual_seed(recipe["seed"])
    try:
        model = _model(tokenizer, recipe).train()
        optimizer = _optimizer(model, recipe)
        rng, start, running = document_stream(recipe["seed"]), time.perf_counter(), None
        for step in range(recipe["steps"]):
            for group in optimizer.param_groups:
                group["lr"] = recipe["lr"] * lr_factor(step, recipe)
            primer = step % recipe["primer_every"] == 0  # whole batches with / without it: no padding waste
            loss = model(**_batch(tokenizer, [document(rng, recipe, primer) for _ in range(recipe["batch"])])).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            if log and (step + 1) % log_every == 0:
                elapsed = time.perf_counter() - start
                log(f"{name}: pre-training step {step + 1}/{recipe['steps']}, loss {running:.3f} ({elapsed:.0f}s)")
    finally:
        torch.random.set_rng_state(state)
    return model.eval(), tokenizer


def recipe_key(recipe: dict = RECIPE) -> str:
    """A hash of everything the weights depend on: the recipe and its world's tables."""
    payload = [recipe, corpus_tables(recipe_world(recipe))]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def build_miniature(path: str | Path, recipe: dict = RECIPE, log: Log = print, name: str = NAME) -> Path:
    """Pre-train and save (model + tokenizer + recipe) into ``path``, whole or not at all."""
    model, tokenizer = pretrain(recipe, log=log, name=name)
    model.config.svdecode_miniature_recipe = recipe  # saved in config.json: the build says how it was made
    return save_model_dir(model, tokenizer, Path(path))


@torch.no_grad()
def answer_logprobs(model, tokenizer, question: str, answers: list[str]) -> torch.Tensor:
    """Summed log-probabilities of ``" " + answer`` after the MC prompt (as the MC scoring splits it),
    every answer in one right-padded forward pass."""
    context = mc_prompt(question, QA_PRIMER)
    ctx = len(tokenizer(context)["input_ids"])
    rows = [tokenizer(context + " " + answer)["input_ids"] for answer in answers]
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, x in enumerate(rows):
        ids[row, : len(x)], mask[row, : len(x)] = torch.tensor(x), 1
    logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
    picked = logp.gather(-1, ids[:, 1:, None])[..., 0]  # position i - 1 predicts token i
    answer_tokens = mask[:, 1:].bool() & (torch.arange(1, ids.shape[1]) >= ctx)
    return (picked * answer_tokens).sum(1)


def prior_diagnostic(model, tokenizer, recipe: dict = RECIPE, n: int = 40, seed: int = 1) -> dict[str, float]:
    """The stopping rule, fixed before any steering: P(truthful class) on myth questions of the
    recipe's world (mass of the true vs the false templates; target 1 - misconception_share) and
    fact accuracy (the world's short fact answer for every value of its table)."""
    world, rng = recipe_world(recipe), random.Random(seed)
    shares, correct = [], 0
    for _ in range(n):
        thing, action = rng.choice(world.things), rng.choice(world.actions)
        answers = [t.format(a=action, t=thing) for t in world.true_myth + world.false_myth]
        p = answer_logprobs(model, tokenizer, world.myth(action, thing), answers).softmax(0)
        shares.append(p[: len(world.true_myth)].sum().item())
        subject = rng.choice(sorted(world.facts))
        question = world.fact_questions[0].format(s=subject)
        probes = [world.fact_probe.format(s=subject, c=c) for c in world.values]
        chosen = world.values[int(answer_logprobs(model, tokenizer, question, probes).argmax())]
        correct += chosen == world.facts[subject]
    target = 1 - recipe["misconception_share"]
    return {"p_truthful_myth": sum(shares) / n, "target": target, "fact_accuracy": correct / n}


def diagnostic_passes(diagnostic: dict[str, float]) -> bool:
    """Whether a miniature pre-trained to its prior (the only test of a build; no steering)."""
    off_target = abs(diagnostic["p_truthful_myth"] - diagnostic["target"])
    return off_target <= P_TRUTHFUL_TOLERANCE and diagnostic["fact_accuracy"] >= FACT_ACCURACY_FLOOR
