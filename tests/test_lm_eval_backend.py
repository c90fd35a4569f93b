"""The lm-evaluation-harness backend (issue 19, item 1): steering off gives HFLM's numbers exactly,
static and dynamic steering give our scorer's token log-probabilities, and ``svdecode lm-eval``
runs lm-eval's own CLI. Skipped when the optional extra ``lm-eval`` is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[lm-eval]')")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from svdecode_pl.decoding.generation import generate_texts  # noqa: E402
from svdecode_pl.decoding.settings import GenerationSettings  # noqa: E402
from svdecode_pl.integrations.lm_eval_backend import SteeredHFLM  # noqa: E402
from svdecode_pl.models.tiny import resolve_tiny_model  # noqa: E402
from svdecode_pl.scoring.loglik import score_many  # noqa: E402
from svdecode_pl.steering.vector import SteeringVector  # noqa: E402
from svdecode_pl.utils.errors import SteeringArtifactError  # noqa: E402

PAIRS = [("Q: What is the capital of France?\nA:", " Paris."), ("The quick brown fox", " jumps over the lazy dog"),
         ("Q: Why is the sky blue?\nA:", " Because of Rayleigh scattering."), ("Hello", " world")]
PROMPTS = ["Q: What is the capital of France?\nA:", "The quick brown fox", "Q: Why is the sky blue?\nA:"]
TASKS = {
    "tiny_mc": "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
               "metric_list:\n  - metric: acc\n",
    "tiny_gen": "output_type: generate_until\ndoc_to_target: '{{choices[0]}}'\n"
                "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n",
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, _model_cache) -> dict:
    """The tiny model, a LoRA adapter with non-zero weights, a static and a dynamic vector."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("lm_eval")
    model_dir = resolve_tiny_model("svdecode-tiny")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(work / "adapter")
    vocab = base.config.vocab_size
    direction = torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 0.5
    SteeringVector(direction, mu=-4.0).save(work / "static")
    SteeringVector(None, mu=-1.5, mode="dynamic", metadata={"vocab_size": vocab}).save(work / "dynamic")
    data = work / "data.jsonl"
    rows = [("What is the capital of France?", ["Paris", "London", "Rome"]),
            ("Why is the sky blue?", ["Rayleigh scattering", "Paint", "Magic"]),
            ("What do cows drink?", ["Water", "Milk", "Oil"])]
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": 0}) + "\n" for q, c in rows))
    (work / "tasks").mkdir()
    for name, body in TASKS.items():
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                "test_split: test\ndoc_to_text: 'Q: {{question}}\\nA:'\n")
        (work / "tasks" / f"{name}.yaml").write_text(head + body)
    common = dict(pretrained=str(model_dir), peft=str(work / "adapter"), device="cpu", dtype="float32", batch_size=4)
    return {"work": work, "common": common, "static": work / "static", "dynamic": work / "dynamic"}


def local_tasks(tasks_dir: Path) -> TaskManager:
    """Only the local task YAMLs: indexing lm-eval's own ~10k task files takes ~18 s."""
    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def task_samples(lm: HFLM, tasks_dir: Path) -> dict[str, list]:
    """Every request's raw response on the local tasks, through lm-eval's own evaluator."""
    out = simple_evaluate(model=lm, tasks=list(TASKS), task_manager=local_tasks(tasks_dir),
                          log_samples=True, verbosity="ERROR")
    return {task: [s["resps"] for s in samples] for task, samples in out["samples"].items()}


def test_steering_off_equals_hflm_exactly(artifacts):
    """No vector, or mu = 0 (static and dynamic): the same responses as HFLM, bit for bit, on a
    local multiple-choice (loglikelihood) and generate_until task, and on loglikelihood_rolling."""
    common, tasks = artifacts["common"], artifacts["work"] / "tasks"
    rolling = [Instance("loglikelihood_rolling", {}, ("Steering vectors decode in logit space. Q: Why?",), 0)]
    hflm = HFLM(**common)
    expected, expected_rolling = task_samples(hflm, tasks), hflm.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert len(expected["tiny_mc"]) == 3 and len(expected["tiny_gen"]) == 3
    for extra in ({}, {"steering": str(artifacts["static"]), "mu": 0.0},
                  {"steering": str(artifacts["dynamic"]), "mu": 0.0}):
        lm = SteeredHFLM(**common, **extra)
        assert task_samples(lm, tasks) == expected, extra
        assert lm.loglikelihood_rolling(rolling, disable_tqdm=True) == expected_rolling, extra


def per_token_logprobs(lm: SteeredHFLM, context: str, continuation: str) -> tuple[torch.Tensor, ...]:
    """(lm-eval's, ours, plain): log_softmax of the backend's ``_model_call`` at each continuation
    token, our scorer's steered log-probability of the same token after the same prefix (lm-eval's
    token split), and HFLM's unsteered one."""
    ctx, cont = lm._encode_pair(context, continuation)
    inputs, positions = torch.tensor([(ctx + cont)[:-1]]), len(ctx) - 1 + torch.arange(len(cont))
    theirs = torch.log_softmax(lm._model_call(inputs), dim=-1)[0][positions, torch.tensor(cont)]
    plain = torch.log_softmax(HFLM._model_call(lm, inputs), dim=-1)[0][positions, torch.tensor(cont)]
    scores = score_many(lm.model, [ctx + cont[:k] for k in range(len(cont))], [[[t]] for t in cont],
                        lm.steering, pad_id=lm.tokenizer.pad_token_id)
    ours = torch.tensor([float(s.steered[0]) for s in scores], dtype=torch.float64)
    return theirs.double(), ours, plain.double()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_steered_token_logprobs_equal_our_scorer(artifacts, mode):
    """Static and dynamic steering through lm-eval equal ``score_many``'s steered token log-probabilities.

    Tolerance 1e-5 per token: the two routes run different forward passes (lm-eval: one row of the
    whole text; ours: packed rows, head only at target positions), whose float32 logits differ by
    ~1e-6 on this model; a wrong sign, strength or base pass moves them by > 0.1 here."""
    lm = SteeredHFLM(**{**artifacts["common"], "batch_size": 1}, steering=str(artifacts[mode]))
    worst, moved = 0.0, 0.0
    for context, continuation in PAIRS:
        theirs, ours, plain = per_token_logprobs(lm, context, continuation)
        worst = max(worst, float((theirs - ours).abs().max()))
        moved = max(moved, float((theirs - plain).abs().max()))
    assert worst <= 1e-5, worst
    assert moved > 0.1, "steering did not change the log-probabilities: the comparison would be vacuous"
    got = [x[0] for x in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)],
                                          disable_tqdm=True)]
    ctxs, conts = zip(*(lm._encode_pair(*p) for p in PAIRS))
    sums = score_many(lm.model, list(ctxs), [[c] for c in conts], lm.steering, pad_id=lm.tokenizer.pad_token_id)
    assert max(abs(a - float(s.steered[0])) for a, s in zip(got, sums)) <= 1e-4


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_steered_generate_until_equals_our_decoding(artifacts, mode):
    """Greedy generate_until through the backend decodes what our own steered generation decodes."""
    lm = SteeredHFLM(**artifacts["common"], steering=str(artifacts[mode]), mu_scale=10.0)  # moves argmaxes
    kwargs = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(PROMPTS)]
    got = lm.generate_until(requests, disable_tqdm=True)
    ours = generate_texts(lm.model, lm.tokenizer, [lm.tok_encode(p) for p in PROMPTS],
                          GenerationSettings(max_new_tokens=12, stop=["\n\n"]), lm.steering)
    assert got == ours
    lm.steering = lm.steering.with_mu(0.0)
    assert lm.generate_until(requests, disable_tqdm=True) != got, "steering did not change any generation"


def test_vocabulary_mismatch_is_one_clear_error(artifacts, tmp_path):
    common = artifacts["common"]
    bad = SteeringVector(torch.zeros(7), mu=1.0).save(tmp_path / "bad")
    with pytest.raises(SteeringArtifactError, match="field 'vocab_size': 7, but the model has"):
        SteeredHFLM(**common, steering=str(bad))


def test_command_writes_lm_eval_results_and_refuses_unknown_tasks(artifacts, tmp_path, capsys):
    """``svdecode lm-eval`` is lm-eval's CLI with ``--model svdecode``: its own results file; the
    registered name works from ``simple_evaluate(model="svdecode")`` too; an unknown task is one line, exit 2."""
    from svdecode_pl.cli.entry import main

    common = artifacts["common"]
    model_args = f"pretrained={common['pretrained']},peft={common['peft']},steering={artifacts['static']},dtype=float32"
    base = ["lm-eval", "--model_args", model_args, "--include_path", str(artifacts["work"] / "tasks"),
            "--device", "cpu", "--batch_size", "4"]
    main([*base, "--tasks", "tiny_mc", "--output_path", str(tmp_path / "out")])
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert len(results) == 1 and results[0]["config"]["model"] == "svdecode"
    by_name = simple_evaluate(model="svdecode", model_args=model_args, tasks=["tiny_mc"], device="cpu",
                              task_manager=local_tasks(artifacts["work"] / "tasks"))
    assert by_name["results"]["tiny_mc"]["acc,none"] == results[0]["results"]["tiny_mc"]["acc,none"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--tasks", "tiny_mc,no_such_task"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--tasks" in err[0] and "no_such_task" in err[0], err


@pytest.mark.parametrize(("model_args", "expected"), [
    ({"mu": float("nan")}, "model_args mu nan: expected a finite number (or null), not NaN"),
    ({"mu_scale": float("inf")}, "model_args mu_scale inf: expected a finite number, not infinity"),
    ({"mu_scale": "big"}, "model_args mu_scale 'big': expected a finite number"),
])
def test_model_args_are_checked_before_the_model_loads(artifacts, monkeypatch, model_args, expected):
    """``mu=nan`` made every log-likelihood NaN and lm-eval reported acc 1.0 (a NaN row ranks its first
    choice highest); now it is one line, before HFLM loads anything."""
    from svdecode_pl.utils.errors import OptionError, user_error_message

    monkeypatch.setattr(HFLM, "__init__", lambda self, **kwargs: pytest.fail("HFLM was built"))
    with pytest.raises(OptionError) as info:
        SteeredHFLM(pretrained=artifacts["common"]["pretrained"], steering=str(artifacts["static"]), **model_args)
    assert user_error_message(info.value) == expected


def test_misspelt_model_arg_is_one_line_with_the_closest_name(artifacts, tmp_path, capsys, monkeypatch):
    """HFLM hands model_args it does not know to ``from_pretrained``: ``steerng=`` ended in a 50-line
    TypeError from the model class."""
    from svdecode_pl.cli.entry import main

    monkeypatch.delenv("SVDECODE_DEBUG", raising=False)
    common = artifacts["common"]
    model_args = f"pretrained={common['pretrained']},peft={common['peft']},steerng={artifacts['static']}"
    with pytest.raises(SystemExit) as info:
        main(["lm-eval", "--model_args", model_args, "--include_path", str(artifacts["work"] / "tasks"),
              "--tasks", "tiny_mc", "--device", "cpu"])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("svdecode:")]  # lm-eval logs its INFO lines
    assert info.value.code == 2 and "Traceback" not in err and len(ours) == 1, err
    assert ours[0] == ("svdecode: error: model_args 'steerng': not an argument of the svdecode model, HFLM or the "
                       "model's from_pretrained (did you mean steering?)")
