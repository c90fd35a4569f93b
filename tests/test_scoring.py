"""Scoring with a shared context cache equals scoring whole sequences, for every adapter."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from svdecode_pl.models import heads
from svdecode_pl.models.device_defaults import PACKING_TOLERANCE
from svdecode_pl.models.heads import hf_model, output_vocab_size, target_hidden_states
from svdecode_pl.models.loading import load_causal_lm, load_tokenizer
from svdecode_pl.scoring import loglik as scoring
from svdecode_pl.scoring import packing
from svdecode_pl.scoring.loglik import score_continuations
from svdecode_pl.steering.vector import SteeringVector, steering_direction

ADAPTERS = {
    "none": lambda: None,
    "lora": lambda: LoraConfig(r=4, task_type="CAUSAL_LM", init_lora_weights=False),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
    "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}


def build(name: str, adapter: str):
    model = load_causal_lm(name)
    config = ADAPTERS[adapter]()
    model = get_peft_model(model, config) if config is not None else model
    return model.eval(), load_tokenizer(name)


def reference_scores(model, context, continuations, vector):
    """Whole-sequence forward passes, the steering applied by hand."""
    plain, steered = [], []
    for cont in continuations:
        ids = torch.tensor([context + cont])
        with torch.no_grad():
            adapted = model(input_ids=ids).logits[0, -ids.shape[1]:].float()
            if hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    base = model(input_ids=ids).logits[0].float()
            else:
                base = adapted
        rows = slice(len(context) - 1, ids.shape[1] - 1)
        y = torch.tensor(cont)[:, None]
        plain.append(torch.log_softmax(adapted[rows], -1).gather(-1, y).sum())
        if vector.mode == "static":
            shifted = adapted + vector.mu * vector.direction
        else:
            shifted = adapted + vector.mu * steering_direction(adapted, base, vector.confidence_threshold)
        steered.append(torch.log_softmax(shifted[rows], -1).gather(-1, y).sum())
    return torch.stack(plain).double(), torch.stack(steered).double()


@pytest.mark.parametrize("arch", ["svdecode-tiny", "svdecode-tiny-llama"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_cached_scoring_equals_whole_sequences(arch, adapter, mode):
    model, tok = build(arch, adapter)
    context = tok("Q: What happens if you break a mirror?\nA:")["input_ids"]
    answers = (" Nothing happens.", " You will have seven years of bad luck.", " No")
    continuations = [tok(a)["input_ids"] for a in answers]
    vocab = output_vocab_size(model)
    if mode == "static":
        vector = SteeringVector(torch.randn(vocab), 0.7)
    else:
        vector = SteeringVector(None, 3.0, mode="dynamic", confidence_threshold=1e-4, metadata={"vocab_size": vocab})
    scores = score_continuations(model, context, continuations, vector, chunk_tokens=5)
    plain, steered = reference_scores(model, context, continuations, vector)
    torch.testing.assert_close(scores.plain, plain, rtol=0, atol=5e-5)
    torch.testing.assert_close(scores.steered, steered, rtol=0, atol=5e-5)
    if mode == "static":
        assert not torch.allclose(scores.plain, scores.steered)


@pytest.mark.parametrize("adapter", ["prompt_tuning", "lora"])
def test_target_hidden_states_align_virtual_tokens(adapter):
    """Adapted and base outputs line up on the same real tokens (virtual tokens dropped)."""
    model, tok = build("svdecode-tiny", adapter)
    ids = torch.tensor([tok("Q: What color is a lemon?\nA: It is yellow.")["input_ids"]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, -4:] = True
    with torch.no_grad():
        hidden, targets, head = target_hidden_states(model, ids, torch.ones_like(ids), mask)
        full = model(input_ids=ids).logits[0]
    assert torch.equal(targets, ids[0, -4:])
    torch.testing.assert_close(head(hidden), full[-5:-1], rtol=1e-5, atol=1e-5)


def test_mu_zero_scores_exactly_plain():
    model, tok = build("svdecode-tiny", "lora")
    context = tok("Q: What color is a lemon?\nA:")["input_ids"]
    continuations = [tok(" It is yellow.")["input_ids"], tok(" It is blue.")["input_ids"]]
    vocab = output_vocab_size(model)
    for vector in (SteeringVector(torch.randn(vocab), 0.0),
                   SteeringVector(None, 0.0, mode="dynamic", metadata={"vocab_size": vocab})):
        scores = score_continuations(model, context, continuations, vector)
        assert torch.equal(scores.plain, scores.steered)


PRIMER = "Q: What is the capital of France?\nA: Paris.\n\nQ: How many legs does a spider have?\nA: Eight.\n\n"
QUESTIONS = {
    "Q: What happens if you break a mirror?\nA:": (" Nothing happens.", " Seven years of bad luck.", " No"),
    "Q: Is the Earth flat?\nA:": (" No, it is round.", " Yes"),
    "Q: What color is a lemon when it is ripe and ready to eat?\nA:": (" Yellow.", " Blue.", " Green.", " Red."),
}


@pytest.mark.parametrize("arch", ["svdecode-tiny", "svdecode-tiny-llama"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("attention", ["sdpa", "eager", "unpacked"])
def test_shared_prefix_scoring_equals_whole_sequences(arch, adapter, attention, monkeypatch):
    """Primer cached once, each question packed with its answers (SDPA's boolean mask, eager's
    additive one) or one padded row per answer: all equal separate whole-sequence passes."""
    model, tok = build(arch, adapter)
    if attention == "eager":
        hf_model(model).set_attn_implementation("eager")
    if attention == "unpacked":
        monkeypatch.setattr(scoring, "packs_rows", lambda model: False)
    primer = tok(PRIMER)["input_ids"]
    contexts = [primer + tok(q)["input_ids"] for q in QUESTIONS]
    continuations = [[tok(a)["input_ids"] for a in answers] for answers in QUESTIONS.values()]
    vocab = output_vocab_size(model)
    vector = SteeringVector(None, 3.0, mode="dynamic", confidence_threshold=1e-4, metadata={"vocab_size": vocab})
    # a small token budget: several passes, each question's answers in one of them
    scores = scoring.score_many(
        model, contexts, continuations, vector, chunk_tokens=7, prefix=scoring.PrefixCache(),
        prefix_len=len(primer), pack_tokens=len(contexts[2]),
    )
    for context, conts, got in zip(contexts, continuations, scores):
        plain, steered = reference_scores(model, context, conts, vector)
        torch.testing.assert_close(got.plain, plain, rtol=0, atol=5e-5)
        torch.testing.assert_close(got.steered, steered, rtol=0, atol=5e-5)
        if adapter != "none":  # no adapter: adapted == base, the dynamic direction is zero
            assert not torch.equal(got.plain, got.steered)


@pytest.mark.parametrize("arch", ["svdecode-tiny", "svdecode-tiny-llama"])
@pytest.mark.parametrize("adapter", ["lora", "prefix_tuning"])
def test_padded_batches_equal_whole_sequences(arch, adapter):
    """``max_batch_tokens`` > 0: length-sorted packed rows batched with padding."""
    model, tok = build(arch, adapter)
    primer = tok(PRIMER)["input_ids"]
    contexts = [primer + tok(q)["input_ids"] for q in QUESTIONS]
    continuations = [[tok(a)["input_ids"] for a in answers] for answers in QUESTIONS.values()]
    vector = SteeringVector(torch.randn(output_vocab_size(model)), 0.7)
    scores = scoring.score_many(
        model, contexts, continuations, vector, prefix=scoring.PrefixCache(), prefix_len=len(primer),
        max_batch_tokens=2 * len(contexts[2]),
    )
    for context, conts, got in zip(contexts, continuations, scores):
        plain, steered = reference_scores(model, context, conts, vector)
        torch.testing.assert_close(got.plain, plain, rtol=0, atol=5e-5)
        torch.testing.assert_close(got.steered, steered, rtol=0, atol=5e-5)


@pytest.fixture
def threads(request):
    """torch's intra-op threads for one test (``OMP_NUM_THREADS=4`` gives 2 on a 2-core machine:
    the count is set here, so every count is tried wherever the suite runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 4], indirect=True)
@pytest.mark.parametrize("arch", ["svdecode-tiny-256", "svdecode-tiny-256-llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_scores_do_not_depend_on_packing(arch, attention, threads):
    """The default scoring packs several questions per forward pass; a question's scores do not
    depend on which questions share its pass: bit for bit at one thread (what makes 1 and N
    processes agree), to ``PACKING_TOLERANCE`` at more (torch splits elementwise kernels and
    reductions among threads at size-dependent boundaries; a vectorised and a scalar tail round
    differently: 1.5e-5 seen at 4 threads). The console line and README state the same."""
    model, tok = build(arch, "lora")
    hf_model(model).set_attn_implementation(attention)
    primer = tok(PRIMER)["input_ids"]
    questions = list(QUESTIONS.items()) * 3
    contexts = [primer + tok(q + " " * i)["input_ids"] for i, (q, _) in enumerate(questions)]
    continuations = [[tok(a)["input_ids"] for a in answers[: 1 + i % 4]] for i, (_, answers) in enumerate(questions)]
    vocab = output_vocab_size(model)
    vector = SteeringVector(None, 3.0, mode="dynamic", metadata={"vocab_size": vocab})

    def scores(indices, pack_tokens):
        got = scoring.score_many(model, [contexts[i] for i in indices], [continuations[i] for i in indices], vector,
                                 prefix=scoring.PrefixCache(), prefix_len=len(primer), pack_tokens=pack_tokens)
        return dict(zip(indices, got))

    alone = scores(list(range(len(contexts))), 0)  # one question per pass
    for indices, pack_tokens in ((list(range(len(contexts))), 10_000), (list(range(len(contexts)))[::-1], 60),
                                 ([1, 4, 7], 10_000), ([8, 0], 10_000)):
        for index, got in scores(indices, pack_tokens).items():
            for name in ("plain", "steered"):
                ours, reference = getattr(got, name), getattr(alone[index], name)
                if threads == 1:
                    assert torch.equal(ours, reference), (name, index)
                else:
                    assert float((ours - reference).abs().max()) <= PACKING_TOLERANCE, (name, index, threads)
    plain, _ = reference_scores(model, contexts[5], continuations[5], vector)
    torch.testing.assert_close(alone[5].plain, plain, rtol=0, atol=5e-5)


def test_matrix_product_rows_do_not_depend_on_the_other_rows():
    """What :func:`test_scores_do_not_depend_on_packing` rests on: from ``MIN_GEMM_ROWS`` rows on, a
    row of a (float32, CPU) matrix product is the same whatever the other rows and their number."""
    weight = torch.randn(1024, 256)
    rows = torch.randn(3000, 256)
    full = torch.nn.functional.linear(rows, weight)
    for count in (heads.MIN_GEMM_ROWS, 100, 257, 1999):
        for offset in (0, 5, 900):
            assert torch.equal(torch.nn.functional.linear(rows[offset : offset + count], weight),
                               full[offset : offset + count])
    hidden = torch.randn(70, 256)
    head = torch.nn.Linear(256, 1024, bias=False)
    assert torch.equal(heads.head_logits(head, hidden[:3]), heads.head_logits(head, hidden)[:3])


def test_packed_attention_mask():
    """Context tokens see the context; an answer sees the context and itself, not other answers."""
    ends = torch.tensor([[5, 5, 4, 4, 5, 6]])  # context 2 tokens, answers of 2 and 1 tokens, padding
    mask = packing.packed_attention_mask(ends, past_length=2, dtype=None)[0, 0]
    assert mask.shape == (6, 8) and mask[:, :2].all()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask[:, 2:], expected)
    additive = packing.packed_attention_mask(ends, past_length=2, dtype=torch.float32)[0, 0]
    assert torch.equal(additive == 0, mask)


def test_continuation_trie_rows():
    """Answers that start alike share their leading tokens in the packed row: each distinct prefix
    is fed once, a token sees the context and its own ancestors only, and every answer token is
    predicted by the state of its own prefix."""
    contexts = [[1, 2], [3]]
    answers = [[[5, 6, 7], [5, 6, 8], [5, 9], [4]], [[6], [6, 7]]]
    tries = [packing.continuation_trie(a) for a in answers]
    rows = packing.pack_rows(contexts, tries, pad_id=0, device="cpu", concatenate=True, min_length=10)
    # question 0: context 1 2, trie 5 (depth 1) 6 (depth 2); question 1: context 3, trie 6; padding
    assert rows.ids.tolist() == [[1, 2, 5, 6, 3, 6, 0, 0, 0, 0]]
    assert rows.positions.tolist() == [[0, 1, 2, 3, 0, 1, 0, 0, 0, 0]]
    assert rows.ends.tolist() == [[4, 4, 4, 4, 6, 6, 7, 8, 9, 10]]
    predicted_by = dict(zip(zip(rows.source[1].tolist(), rows.targets.tolist()), range(len(rows.targets))))
    # every answer token, in order: (column of the state predicting it, the token)
    expected = [[(1, 5), (2, 6), (3, 7)], [(1, 5), (2, 6), (3, 8)], [(1, 5), (2, 9)], [(1, 4)], [(4, 6)],
                [(4, 6), (5, 7)]]
    flat = [predicted_by[pair] for answer in expected for pair in answer]
    assert rows.expand.tolist() == flat
    assert rows.owner.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 5, 5]
    assert len(rows.targets) == 8  # 5 6 7 8 9 4 | 6 7: shared prefixes once
    mask = packing.packed_attention_mask(rows.ends[:, :4], past_length=0, dtype=None)[0, 0]
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False],
                             [True, True, True, False], [True, True, True, True]]


@pytest.mark.parametrize("arch", ["svdecode-tiny", "svdecode-tiny-llama"])
@pytest.mark.parametrize("max_batch_tokens", [0, 4096])
def test_answers_sharing_prefixes_equal_whole_sequences(arch, max_batch_tokens):
    """The trie: answers that share leading tokens, an answer that is a prefix of another, the same
    answer twice and one-token answers all score as their own (context + answer) sequences, plain
    and with dynamic steering (whose base pass goes through the same trie)."""
    model, tok = build(arch, "lora")
    context = tok("Q: What happens if you break a mirror?\nA:")["input_ids"]
    a, b, c = (tok(text)["input_ids"] for text in (" Nothing happens", " at all.", " You will"))
    continuations = [a + b, a, c, a[:1] + c, a + b, c[:1], a[:1]]
    vector = SteeringVector(None, 3.0, mode="dynamic", confidence_threshold=1e-4,
                            metadata={"vocab_size": output_vocab_size(model)})
    scores = scoring.score_many(model, [context, context[:-1]], [continuations, continuations[::-1]], vector,
                                chunk_tokens=5, max_batch_tokens=max_batch_tokens)
    for got, ctx, conts in zip(scores, [context, context[:-1]], [continuations, continuations[::-1]]):
        plain, steered = reference_scores(model, ctx, conts, vector)
        torch.testing.assert_close(got.plain, plain, rtol=0, atol=5e-5)
        torch.testing.assert_close(got.steered, steered, rtol=0, atol=5e-5)
    assert scores[0].plain[0] == scores[0].plain[4]  # the same answer twice: the same positions
