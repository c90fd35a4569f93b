"""Shared fixtures: tiny real HF models built offline, small data files, the shared data dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_DATA_REASON = (
    f"real benchmark data not found at {SHARED_DATA} (CI has it; a user's clone does not: "
    "place the shared/ folder beside the repository to run these tests)"
)


def real_data(*parts: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(REAL_DATA_REASON)
    return path


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory) -> Path:
    """Built-in tiny models are built once per session, in a private cache."""
    cache = Path(os.environ.get("SVDECODE_TEST_CACHE", tmp_path_factory.mktemp("svdecode_cache")))
    os.environ["SVDECODE_CACHE"] = str(cache)
    return cache


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def mc_records(n: int = 6) -> list[dict]:
    """Small records in the official mc_task.json form."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "question": f"What happens if you break mirror number {i}?",
                "mc1_targets": {"Nothing happens.": 1, "Bad luck for years.": 0, "You die.": 0},
                "mc2_targets": {"Nothing happens.": 1, "Nothing in particular.": 1, "Bad luck for years.": 0,
                                "You die.": 0},
            }
        )
    return rows


@pytest.fixture
def mc_task_file(tmp_path) -> Path:
    path = tmp_path / "mc_task.json"
    path.write_text(json.dumps(mc_records()))
    return path


@pytest.fixture(autouse=True)
def _no_debug_environment():
    """``svdecode --debug`` sets SVDECODE_DEBUG in the process for the ranks it starts: a test that
    runs it in-process must not leave the next test printing tracebacks instead of one line."""
    os.environ.pop("SVDECODE_DEBUG", None)
    yield
    os.environ.pop("SVDECODE_DEBUG", None)


def small_run_args(config: str, run_dir: Path, questions: int, *extra: str) -> list[str]:
    """A quickstart config cut to ``questions`` generated questions (half warm-start, no validation
    split), quiet, in ``run_dir``: the pipeline tests' common command line."""
    return [
        "--config", config,
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.synthetic_questions", str(questions), "--data.train_fraction", "0.5", "--data.val_fraction", "0",
        "--data.eval_batch_size", "4",
        *extra,
    ]


# -- decoding tests (test_generation.py, test_dynamic_beams.py): one flat tiny model, every adapter type

#: Random-init PEFT configs, so each adapter type changes the logits.
ADAPTER_CONFIGS = {
    "lora": lambda: __import__("peft").LoraConfig(r=4, task_type="CAUSAL_LM", init_lora_weights=False),
    "ia3": lambda: __import__("peft").IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
    "prompt_tuning": lambda: __import__("peft").PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix_tuning": lambda: __import__("peft").PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}
#: Prompts of different lengths, so batches are left-padded.
PROMPT_TEXTS = ["Q: What happens if you break a mirror?\nA:", "Q: Why?\nA:", "Hello there", "The capital of France is"]


def peft_model(model_dir: str, adapter: str = "lora"):
    """The tiny model at ``model_dir`` with a seeded random adapter of type ``adapter``, in eval mode."""
    from peft import get_peft_model

    from svdecode_pl.models.loading import load_causal_lm

    torch.manual_seed(0)
    return get_peft_model(load_causal_lm(model_dir), ADAPTER_CONFIGS[adapter]()).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Decoding runs many small kernels: on a shared 2-core machine, one thread is far faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def flat_model_dir(tmp_path_factory) -> str:
    """A tiny Qwen2 with flat enough distributions that sampling and steering change tokens."""
    from svdecode_pl.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("decoding") / "flat", embedding_std=0.05))


@pytest.fixture(scope="session")
def flat_tokenizer(flat_model_dir):
    from svdecode_pl.models.loading import load_tokenizer

    return load_tokenizer(flat_model_dir)


@pytest.fixture(scope="session")
def prompts(flat_tokenizer) -> list[list[int]]:
    return [flat_tokenizer(t)["input_ids"] for t in PROMPT_TEXTS]


@pytest.fixture
def eager_steps(monkeypatch):
    """Compiled decoding's static caches and fixed-width masks, with its steps run uncompiled (compiling
    costs tens of seconds per shape on a CPU; tests/test_compiled.py compiles for real)."""
    from svdecode_pl.decoding import compiled, streams

    def uncompiled(device):
        return lambda decoder, **inputs: decoder(**inputs)

    monkeypatch.setattr(compiled, "compiled_call", uncompiled)
    monkeypatch.setattr(streams, "compiled_call", uncompiled)
