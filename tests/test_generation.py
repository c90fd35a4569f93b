"""Steered decoding: mu = 0 is plain decoding token for token, static steering is decoding with
mu*d added to the head's output, the dynamic loop's cached logits equal uncached ones for every
PEFT method, stop strings and EOS cut as lm-eval cuts, checkpoint defaults cannot interfere."""

from __future__ import annotations

import pytest
import torch
from conftest import ADAPTER_CONFIGS, peft_model

from svdecode_pl.decoding.dynamic import dynamic_steered_decode
from svdecode_pl.decoding.generation import (
    GenerationSettings,
    StopStringsCriteria,
    generate_sequences,
    generate_texts,
    generate_token_ids,
    left_padded,
    stop_token_ids,
    stopping_criteria,
)
from svdecode_pl.models.heads import hf_model, output_vocab_size
from svdecode_pl.models.tiny import build_tiny_model
from svdecode_pl.steering.vector import SteeringVector, steering_direction

pytestmark = pytest.mark.usefixtures("one_thread")
STRATEGIES = {
    "greedy": GenerationSettings(max_new_tokens=10, stop=[]),
    "sampling": GenerationSettings(max_new_tokens=10, stop=[], do_sample=True, temperature=0.8, top_k=40, top_p=0.9,
                                   seed=7),
    "beams": GenerationSettings(max_new_tokens=8, stop=[], num_beams=3),
}


def random_direction(model, seed: int = 1) -> torch.Tensor:
    return torch.randn(output_vocab_size(model), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("mode", "strategy"),
    [("static", "greedy"), ("static", "sampling"), ("static", "beams"), ("dynamic", "greedy"), ("dynamic", "sampling"),
     ("dynamic", "beams")],  # dynamic beams for every loop and adapter: test_dynamic_beams.py
)
def test_mu_zero_reproduces_plain_decoding(flat_model_dir, flat_tokenizer, prompts, strategy, mode):
    model = peft_model(flat_model_dir)
    settings = STRATEGIES[strategy]
    vector = SteeringVector(random_direction(model) if mode == "static" else None, 0.0, mode=mode)
    plain = generate_token_ids(model, flat_tokenizer, prompts, settings)
    steered = generate_token_ids(model, flat_tokenizer, prompts, settings, vector)
    assert steered == plain
    assert all(len(ids) > 0 for ids in plain)
    if strategy == "sampling":  # the seed, not the global generator, decides
        torch.manual_seed(12345)
        assert generate_token_ids(model, flat_tokenizer, prompts, settings) == plain
        greedy = GenerationSettings(max_new_tokens=10, stop=[])
        assert plain != generate_token_ids(model, flat_tokenizer, prompts, greedy)


@pytest.mark.parametrize("adapter", list(ADAPTER_CONFIGS))
def test_dynamic_loop_at_mu_zero_is_generate_for_every_adapter(flat_model_dir, flat_tokenizer, prompts, adapter):
    """Our loop (virtual tokens, positions, caches of its own) decodes as PEFT's ``generate`` does,
    batched and left-padded, and as one prompt at a time."""
    model = peft_model(flat_model_dir, adapter)
    settings = STRATEGIES["greedy"]
    ours = generate_token_ids(model, flat_tokenizer, prompts, settings, SteeringVector(None, 0.0, mode="dynamic"))
    assert ours == generate_token_ids(model, flat_tokenizer, prompts, settings)
    assert ours == [generate_token_ids(model, flat_tokenizer, [prompt], settings)[0] for prompt in prompts]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_static_steering_is_decoding_with_shifted_logits(flat_model_dir, flat_tokenizer, prompts, strategy):
    """Steered decoding = plain decoding of a model whose head outputs z + mu*d; under beam search
    that means beams ranked by log_softmax(z + mu*d)."""
    model = peft_model(flat_model_dir)
    settings = STRATEGIES[strategy]
    vector = SteeringVector(random_direction(model), 1.5)
    steered = generate_token_ids(model, flat_tokenizer, prompts, settings, vector)
    head = hf_model(model).get_output_embeddings()
    handle = head.register_forward_hook(lambda _module, _inputs, logits: logits + vector.mu * vector.direction)
    try:
        shifted_head = generate_token_ids(model, flat_tokenizer, prompts, settings)
    finally:
        handle.remove()
    assert steered == shifted_head
    assert steered != generate_token_ids(model, flat_tokenizer, prompts, settings)  # steering changed the output


def _plain_generate(model, flat_tokenizer, prompts, settings, processors=()):
    """``model.generate`` as a user calls it, with our settings pinned; the new tokens."""
    from transformers import LogitsProcessorList

    from svdecode_pl.decoding.generation import checkpoint_defaults_ignored, generation_config, seeded

    input_ids, mask = left_padded(prompts, flat_tokenizer.pad_token_id, torch.device("cpu"))
    config = generation_config(settings, stop_token_ids(model, flat_tokenizer), flat_tokenizer.pad_token_id)
    with seeded(settings.seed, input_ids.device), checkpoint_defaults_ignored(model), torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                             logits_processor=LogitsProcessorList(list(processors)))
    return out[:, input_ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    """A tiny Qwen2 whose beams have distinct distributions, so that ranking by
    log_softmax(z) + mu*d and by log_softmax(z + mu*d) choose different beams."""
    return str(build_tiny_model(tmp_path_factory.mktemp("gen") / "peaked", embedding_std=0.3))


def spiked_direction(model, seed: int = 1) -> torch.Tensor:
    """+1 on a random twentieth of the vocabulary: the steered normaliser differs from beam to beam."""
    vocab = output_vocab_size(model)
    direction = torch.zeros(vocab)
    direction[torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[: vocab // 20]] = 1.0
    return direction


class _AddToScores:
    """What the processor did before it detected log-probabilities: mu*d added, not renormalised."""

    def __init__(self, shift: torch.Tensor) -> None:
        self.shift = shift

    def __call__(self, input_ids, scores):
        return scores + self.shift


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_processor_in_plain_generate_is_a_head_with_bias_mu_d(flat_model_dir, peaked_model_dir, flat_tokenizer, prompts,
                                                              strategy):
    """No flag: ``model.generate(..., logits_processor=[SteeringLogitsProcessor(v)])`` equals
    generating from a head whose bias is mu*d, under greedy, seeded sampling and beam search
    (where transformers hands the processor log-probabilities, which it detects)."""
    from svdecode_pl.steering.processor import SteeringLogitsProcessor

    beams = strategy == "beams"
    model = peft_model(peaked_model_dir if beams else flat_model_dir)
    settings = STRATEGIES[strategy]
    vector = SteeringVector(spiked_direction(model) if beams else random_direction(model), 2.0 if beams else 1.5)
    steered = _plain_generate(model, flat_tokenizer, prompts, settings, [SteeringLogitsProcessor(vector)])
    head = hf_model(model).get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(vector.mu * vector.direction)
    hf_model(model).set_output_embeddings(biased)
    try:
        with_bias = _plain_generate(model, flat_tokenizer, prompts, settings)
    finally:
        hf_model(model).set_output_embeddings(head)
    assert steered == with_bias
    if beams:  # the case tells the right ranking from log_softmax(z) + mu*d
        naive = _plain_generate(model, flat_tokenizer, prompts, settings, [_AddToScores(vector.mu * vector.direction)])
        assert naive != with_bias
    else:
        assert steered != _plain_generate(model, flat_tokenizer, prompts, settings)  # steering changed the output


def test_log_probabilities_are_detected():
    from svdecode_pl.steering.processor import are_log_probabilities

    logits = torch.randn(3, 50) * 4
    assert not are_log_probabilities(logits)
    assert are_log_probabilities(torch.log_softmax(logits, -1))
    masked = torch.log_softmax(logits, -1)
    masked[1] = float("-inf")  # a row of -inf only is no evidence either way
    assert are_log_probabilities(masked)
    assert not are_log_probabilities(logits - logits.amax(-1, keepdim=True) - 1.0)  # <= 0, not normalised


@pytest.mark.parametrize("flag", [None, True])
def test_beam_scores_are_steered_log_probabilities(flat_model_dir, flat_tokenizer, prompts, flag):
    """The best beam's score is the length-normalised sum of log_softmax(z + mu*d) of its tokens,
    without a flag (detected) and with the old ``log_probs=True``."""
    from transformers import LogitsProcessorList

    from svdecode_pl.decoding.generation import checkpoint_defaults_ignored, generation_config
    from svdecode_pl.steering.processor import SteeringLogitsProcessor

    model = peft_model(flat_model_dir)
    settings = STRATEGIES["beams"]
    vector = SteeringVector(random_direction(model), 1.5)
    input_ids, mask = left_padded(prompts[:1], flat_tokenizer.pad_token_id, torch.device("cpu"))
    with checkpoint_defaults_ignored(model):
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True,
            generation_config=generation_config(settings, stop_token_ids(model, flat_tokenizer),
                                                flat_tokenizer.pad_token_id),
            logits_processor=LogitsProcessorList([SteeringLogitsProcessor(vector, log_probs=flag)]),
        )
    sequence = out.sequences[0]
    new = sequence.shape[0] - input_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=sequence[None, :-1]).logits[0, -new:].float()
    log_probs = torch.log_softmax(logits + vector.mu * vector.direction, -1)
    expected = log_probs.gather(-1, sequence[-new:, None]).sum() / new  # length_penalty 1.0
    assert torch.allclose(out.sequences_scores[0], expected, atol=1e-4)


@pytest.mark.parametrize("adapter", list(ADAPTER_CONFIGS))
def test_dynamic_loop_logits_equal_uncached_recomputation(flat_model_dir, flat_tokenizer, prompts, adapter):
    model = peft_model(flat_model_dir, adapter)
    settings = GenerationSettings(max_new_tokens=6, stop=[])
    vector = SteeringVector(None, 300.0, mode="dynamic")  # flat model: small directions
    input_ids, mask = left_padded(prompts, flat_tokenizer.pad_token_id, torch.device("cpu"))
    eos = stop_token_ids(model, flat_tokenizer)
    criteria = stopping_criteria(flat_tokenizer, settings, input_ids.shape[1], eos)
    out = dynamic_steered_decode(model, input_ids, mask, settings, vector, criteria, flat_tokenizer.pad_token_id,
                                 keep_logits=True)
    assert len(out.adapted_logits) == out.sequences.shape[1] - input_ids.shape[1] == settings.max_new_tokens
    largest_shift = 0.0
    for row, prompt in enumerate(prompts):
        generated = out.sequences[row, input_ids.shape[1] :].tolist()
        for step, token in enumerate(generated):
            ids = torch.tensor([prompt + generated[:step]])
            with torch.no_grad():
                adapted = model(input_ids=ids, use_cache=False).logits[0, -1].float()  # PEFT adds virtual tokens
                with model.disable_adapter():
                    base = hf_model(model)(input_ids=ids, use_cache=False).logits[0, -1].float()
            torch.testing.assert_close(out.adapted_logits[step][row], adapted, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(out.base_logits[step][row], base, atol=2e-5, rtol=1e-5)
            steered = adapted + vector.mu * steering_direction(adapted[None], base[None])[0]
            assert token == int(steered.argmax())
            largest_shift = max(largest_shift, float((steered - adapted).abs().max()))
            if token in eos:
                break
    assert not torch.equal(out.adapted_logits[0], out.base_logits[0])  # the adapter does something
    assert largest_shift > 0.1  # and the tokens followed steered logits, not the adapted ones


@pytest.mark.parametrize("mode", ["none", "static", "dynamic"])
def test_stop_strings_cut_text_and_stop_decoding(flat_model_dir, flat_tokenizer, prompts, mode):
    """The text is the full continuation cut at the first stop string, and decoding stops once
    every row has produced one."""
    model = peft_model(flat_model_dir)
    vector = {"none": None, "static": SteeringVector(random_direction(model), 0.5),
              "dynamic": SteeringVector(None, -2.0, mode="dynamic")}[mode]
    long = GenerationSettings(max_new_tokens=24, stop=[])
    full = generate_texts(model, flat_tokenizer, prompts, long, vector)
    # a stop string every row produces: the 2 characters after its first 3 characters
    stops = [text[3:5] for text in full]
    assert all(len(s) == 2 for s in stops)
    settings = GenerationSettings(max_new_tokens=24, stop=stops)
    texts = generate_texts(model, flat_tokenizer, prompts, settings, vector)
    expected = []
    for text in full:
        for term in stops:
            text = text.split(term)[0]
        expected.append(text)
    assert texts == expected
    sequences = generate_sequences(model, flat_tokenizer, prompts, settings, vector)
    assert sequences.shape[1] - max(map(len, prompts)) < long.max_new_tokens


def test_stop_string_criterion_reads_the_continuation_only(flat_tokenizer):
    prompt = flat_tokenizer("A:\n")["input_ids"]
    newline = flat_tokenizer("\n", add_special_tokens=False)["input_ids"]
    word = flat_tokenizer("o", add_special_tokens=False)["input_ids"]
    assert len(newline) == len(word) == 1
    criterion = StopStringsCriteria(flat_tokenizer, ["\n\n"], prompt_length=len(prompt))
    first = torch.tensor([prompt + newline, prompt + word])
    assert criterion(first).tolist() == [False, False]  # "\n" + "\n" straddling the prompt does not count
    second = torch.tensor([prompt + newline + newline, prompt + word + word])
    assert criterion(second).tolist() == [True, False]


def test_eos_stops_and_is_cut(flat_model_dir, flat_tokenizer, prompts):
    """A steering vector that makes EOS the top token: every continuation is empty."""
    model = peft_model(flat_model_dir)
    direction = torch.zeros(output_vocab_size(model))
    direction[flat_tokenizer.eos_token_id] = 1.0
    vector = SteeringVector(direction, 1e4)
    settings = GenerationSettings(max_new_tokens=5, stop=[])
    assert generate_texts(model, flat_tokenizer, prompts, settings, vector) == [""] * len(prompts)
    assert generate_sequences(model, flat_tokenizer, prompts, settings, vector).shape[1] == max(map(len, prompts)) + 1


def test_checkpoint_generation_config_cannot_switch_on_processors(flat_model_dir, flat_tokenizer, prompts):
    model = peft_model(flat_model_dir)
    vector = SteeringVector(random_direction(model), 1.0)
    settings = GenerationSettings(max_new_tokens=8, stop=[])
    plain, steered = (generate_token_ids(model, flat_tokenizer, prompts, settings, v) for v in (None, vector))
    config = hf_model(model).generation_config
    config.repetition_penalty, config.no_repeat_ngram_size = 5.0, 1
    config.suppress_tokens = sorted({ids[0] for ids in plain if ids})
    config.do_sample, config.top_k, config.num_beams = True, 3, 4
    assert generate_token_ids(model, flat_tokenizer, prompts, settings) == plain
    assert generate_token_ids(model, flat_tokenizer, prompts, settings, vector) == steered
    assert hf_model(model).generation_config.repetition_penalty == 5.0  # restored afterwards


def test_plain_path_matches_lm_eval_generate_call(flat_model_dir, flat_tokenizer, prompts):
    """At batch size 1 lm-eval calls generate(input_ids, attention_mask, max_length=ctx+max_gen_toks,
    pad_token_id, use_cache=True, do_sample=False) with the model's own defaults, then decodes the
    continuation and splits it at each stop string: our plain path gives the same completions."""
    model = peft_model(flat_model_dir)
    settings = GenerationSettings(max_new_tokens=16, stop=["\n\n", "."])
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_length=ids.shape[1] + 16,
                                 pad_token_id=flat_tokenizer.pad_token_id, use_cache=True, do_sample=False)
        text = flat_tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        for term in [*settings.stop, flat_tokenizer.eos_token]:
            text = text.split(term)[0]
        assert generate_texts(model, flat_tokenizer, [prompt], settings) == [text]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(do_sample=True, temperature=0.0)
    assert GenerationSettings().stop == ["\n\n"] and GenerationSettings().stop is not GenerationSettings().stop
