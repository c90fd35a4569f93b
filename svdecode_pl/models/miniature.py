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
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from svdecode_pl.corpus import synthetic as world
from svdecode_pl.corpus.miniature import CORPUS_RECIPE, MISCONCEPTION_SHARE, corpus_tables, document, document_stream
from svdecode_pl.corpus.primer import QA_PRIMER, mc_prompt
from svdecode_pl.models.tiny import build_tokenizer, save_model_dir, tiny_model_cache

NAME = "svdecode-mini"
#: Names that resolve to the pre-trained miniature.
MINIATURE_MODELS = (NAME,)

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


def pretrain(recipe: dict = RECIPE, log: Log = print, log_every: int = 50):
    """(model, tokenizer) pre-trained by the recipe in plain torch; the global RNG is left as found."""
    tokenizer = build_tokenizer()
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
                log(f"{NAME}: pre-training step {step + 1}/{recipe['steps']}, loss {running:.3f} ({elapsed:.0f}s)")
    finally:
        torch.random.set_rng_state(state)
    return model.eval(), tokenizer


def recipe_key(recipe: dict = RECIPE) -> str:
    """A hash of everything the weights depend on: the recipe and the corpus tables."""
    return hashlib.sha256(json.dumps([recipe, corpus_tables()], sort_keys=True).encode()).hexdigest()[:10]


def build_miniature(path: str | Path, recipe: dict = RECIPE, log: Log = print) -> Path:
    """Pre-train and save (model + tokenizer + recipe) into ``path``, whole or not at all."""
    model, tokenizer = pretrain(recipe, log=log)
    model.config.svdecode_miniature_recipe = recipe  # saved in config.json: the build says how it was made
    return save_model_dir(model, tokenizer, Path(path))


def resolve_miniature(name: str = NAME, recipe: dict = RECIPE, log: Log = print) -> Path:
    """The cached miniature's directory, built on first use (outside any process group)."""
    if name not in MINIATURE_MODELS:
        raise KeyError(name)
    path = tiny_model_cache() / f"{name}-{recipe_key(recipe)}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if log:
            log(f"{name}: pre-training the miniature once (cached in {path.parent}); about 15 s on 2 free cores")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            code = "from svdecode_pl.models.miniature import build_miniature; "
            code += f"build_miniature({str(path)!r}, {recipe!r})"
            subprocess.run([sys.executable, "-c", code], check=True)
        else:
            build_miniature(path, recipe, log=log)
    return path


@torch.no_grad()
def answer_logprobs(model, tokenizer, question: str, answers: list[str]) -> torch.Tensor:
    """Summed log-probabilities of ``" " + answer`` after the MC prompt (as the MC scoring splits it)."""
    context = mc_prompt(question, QA_PRIMER)
    ctx = len(tokenizer(context)["input_ids"])
    out = []
    for answer in answers:
        ids = tokenizer(context + " " + answer)["input_ids"]
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        out.append(sum(logp[i - 1, ids[i]].item() for i in range(ctx, len(ids))))
    return torch.tensor(out)


def prior_diagnostic(model, tokenizer, n: int = 40, seed: int = 1) -> dict[str, float]:
    """The stopping rule, fixed before any steering: P(truthful class) on myth questions (mass of the
    true vs the false templates; target 1 - MISCONCEPTION_SHARE) and fact accuracy."""
    rng = random.Random(seed)
    shares, correct = [], 0
    colors = sorted(set(world.FACTS.values()))
    for _ in range(n):
        thing, action = rng.choice(world.THINGS), rng.choice(world.ACTIONS)
        answers = [t.format(a=action, t=thing) for t in world.TRUE_MYTH + world.FALSE_MYTH]
        p = answer_logprobs(model, tokenizer, f"What happens if you {action} {thing}?", answers).softmax(0)
        shares.append(p[: len(world.TRUE_MYTH)].sum().item())
        subject = rng.choice(sorted(world.FACTS))
        question = world.FACT_QUESTIONS[0].format(s=subject)
        lp = answer_logprobs(model, tokenizer, question, [f"It is {c}." for c in colors])
        correct += colors[int(lp.argmax())] == world.FACTS[subject]
    return {"p_truthful_myth": sum(shares) / n, "target": 1 - MISCONCEPTION_SHARE, "fact_accuracy": correct / n}


if __name__ == "__main__":  # python -m svdecode_pl.models.miniature [--diagnose]
    t0 = time.perf_counter()
    where = resolve_miniature()
    print(f"{NAME} at {where} ({time.perf_counter() - t0:.1f}s)")
    if "--diagnose" in sys.argv:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        m = AutoModelForCausalLM.from_pretrained(where).eval()
        print(prior_diagnostic(m, AutoTokenizer.from_pretrained(where)))
