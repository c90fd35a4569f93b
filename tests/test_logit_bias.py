"""Static steering as a server's sparse ``logit_bias`` (issue 19, item 3): applied through a plain
transformers logits processor it decodes as full static steering does while the dropped part is
below the bound; the command's bad input is one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

from svdecode_pl.cli.entry import main
from svdecode_pl.integrations.logit_bias import apply_logit_bias, as_steering_vector, export_logit_bias
from svdecode_pl.models.tiny import resolve_tiny_model
from svdecode_pl.steering.processor import SteeringLogitsProcessor
from svdecode_pl.steering.vector import SteeringVector

PROMPTS = ["Q: What is the capital of France?\nA:", "The quick brown fox", "Q: Why is the sky blue?\nA:"]


class ServerBias(LogitsProcessor):
    """What vLLM / llama.cpp do with a request's logit_bias, in plain transformers."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.bias = bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return apply_logit_bias(scores, self.bias)


class Margins(LogitsProcessor):
    """Records each step's top-two margin of the (steered) scores it sees."""

    def __init__(self) -> None:
        self.smallest = float("inf")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = scores.topk(2, dim=-1).values
        self.smallest = min(self.smallest, float((top[:, 0] - top[:, 1]).min()))
        return scores


def concentrated_vector(vocab: int, spikes: int = 32, noise: float = 1e-3) -> SteeringVector:
    """mu*d: +-12 on a few tokens, a constant 0.7 everywhere (softmax ignores it) and small noise."""
    g = torch.Generator().manual_seed(4)
    direction = 0.7 + noise * (2 * torch.rand(vocab, generator=g) - 1)
    tokens = torch.randperm(vocab, generator=g)[:spikes]
    direction[tokens] += 12.0 * torch.sign(torch.randn(spikes, generator=g))
    return SteeringVector(direction, mu=1.0)


@pytest.fixture(scope="module")
def tiny(_model_cache):
    path = resolve_tiny_model("svdecode-tiny")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def decode(model, tokenizer, processors, sampling: bool) -> list[list[int]]:
    outs = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        torch.manual_seed(11)
        kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0} if sampling else {"do_sample": False}
        out = model.generate(**inputs, max_new_tokens=12, logits_processor=processors, **kwargs,
                             pad_token_id=tokenizer.pad_token_id)
        outs.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    return outs


@pytest.mark.parametrize("sampling", [False, True])
def test_sparse_bias_decodes_as_full_static_steering_below_the_bound(tiny, sampling):
    """With 32 of the 710 entries kept, the dropped part (max 1e-3 noise around the constant) is below
    half the smallest greedy margin, so greedy decoding must agree; seeded sampling agrees too (each
    probability within exp(2e-3))."""
    model, tokenizer = tiny
    vector = concentrated_vector(model.config.vocab_size)
    exported = export_logit_bias(vector, max_entries=32)
    assert len(exported.bias) == 32 and exported.max_dropped <= 1e-3 and exported.kept_share > 0.99
    assert abs(exported.offset - 0.7) < 1e-3
    margins = Margins()
    full = decode(model, tokenizer, [SteeringLogitsProcessor(vector), margins], sampling)
    if not sampling:
        assert margins.smallest > 2 * exported.max_dropped, "the bound's premise does not hold on this model"
    assert decode(model, tokenizer, [ServerBias(exported.bias)], sampling) == full
    assert decode(model, tokenizer, [], sampling) != full, "the vector does not change decoding"


def test_too_few_entries_or_clamping_is_reported():
    """Fewer entries than the vector's spikes, or a bias past the clamp, show in max_dropped."""
    vector = concentrated_vector(710)
    assert export_logit_bias(vector, max_entries=8).max_dropped > 3.0
    loud = SteeringVector(torch.tensor([0.0, 0.0, 300.0, 0.0]), mu=1.0)
    exported = export_logit_bias(loud, max_entries=1)
    assert exported.bias == {2: 100.0} and exported.max_dropped == pytest.approx(200.0)


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_command(tiny, tmp_path, capsys):
    model, _ = tiny
    path = concentrated_vector(model.config.vocab_size).save(tmp_path / "v")
    code, out, err = run(["logit-bias", str(path), "--max-entries", "32", "--model", "svdecode-tiny"], capsys)
    assert code == 0 and len(json.loads(out)["logit_bias"]) == 32 and "largest logit change dropped" in err
    code, out, _ = run(["logit-bias", str(path)], capsys)  # the default, 1024, is capped at a smaller vocabulary
    assert code == 0 and len(json.loads(out)["logit_bias"]) == model.config.vocab_size < 1024
    code, _, err = run(["logit-bias", str(path), "--max-entries", "5000"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--max-entries: 5000" in err
    other = SteeringVector(torch.zeros(100), mu=1.0).save(tmp_path / "other")
    code, _, err = run(["logit-bias", str(other), "--model", "svdecode-tiny"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "field 'vocab_size': 100" in err


def test_sparse_bias_as_a_steering_vector_scores_what_the_server_applies(tmp_path, capsys):
    """The vector written by --as-steering steers the logits exactly as the server's bias does (so
    `svdecode test` on it measures the sparse bias), and keeps the full vector's metadata."""
    full = concentrated_vector(710, spikes=40).with_mu(-3.0)
    full.metadata["tokenizer_fingerprint"] = "abc"
    exported = export_logit_bias(full, max_entries=32)
    sparse = as_steering_vector(full, exported)
    logits = torch.randn(3, 710, generator=torch.Generator().manual_seed(5))
    served = apply_logit_bias(logits, exported.bias)
    assert torch.allclose(sparse.steer(logits), served, atol=1e-5)
    assert int((sparse.direction != 0).sum()) == 32 and sparse.metadata["tokenizer_fingerprint"] == "abc"
    # the dropped entries really are dropped: the full vector's log-probabilities differ
    assert not torch.allclose(full.steer(logits).log_softmax(-1), served.log_softmax(-1), atol=1e-2)
    path = full.save(tmp_path / "v")
    code, _, _ = run(["logit-bias", str(path), "--max-entries", "32", "--as-steering", str(tmp_path / "s")], capsys)
    loaded = SteeringVector.load(tmp_path / "s")
    assert code == 0 and torch.equal(loaded.direction, sparse.direction) and loaded.mu == -3.0
