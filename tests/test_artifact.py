"""One artifact (issue 19, item 2): adapter + steering vector as one directory that PEFT still loads
as a plain adapter, a one-call steered loader, ``custom_generate`` from a local folder, and an
upload to a local stand-in of the Hub (no network)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from svdecode_pl.integrations.artifact import load_steered, push_to_hub, save_artifact
from svdecode_pl.models.tiny import resolve_tiny_model
from svdecode_pl.steering.processor import SteeringLogitsProcessor
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.errors import SteeringArtifactError

PROMPT = "Q: What is the capital of France?\nA:"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _model_cache):
    """A LoRA model with non-zero weights, its tokenizer, and a strong static vector."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_tiny_model("svdecode-tiny")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    direction = torch.randn(base.config.vocab_size, generator=torch.Generator().manual_seed(3))
    vector = SteeringVector(direction, mu=-8.0, metadata={"model": str(model_dir)})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, vector


def generate(model, tokenizer, **kwargs) -> list[int]:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_round_trip_plain_adapter_and_steered_loader(trained, tmp_path):
    """PEFT loads the directory as a plain adapter (same weights); ``load_steered`` gives the same
    vector and generates what the steering processor generates, which differs from plain decoding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer, vector = trained
    directory = save_artifact(model, vector, tmp_path / "artifact", tokenizer)
    assert {p.name for p in directory.iterdir()} >= {"adapter_config.json", "steering", "custom_generate"}
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_tiny_model("svdecode-tiny")),
                                      str(directory))
    mine, theirs = model.state_dict(), plain.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if "lora_" in k)
    loaded = load_steered(directory)
    assert torch.equal(loaded.steering_vector.direction, vector.direction) and loaded.steering_vector.mu == vector.mu
    expected = generate(model, tokenizer, do_sample=False, logits_processor=[SteeringLogitsProcessor(vector)])
    assert generate(loaded, tokenizer, do_sample=False) == expected
    assert generate(model, tokenizer, do_sample=False) != expected, "the vector does not change greedy decoding"


@pytest.mark.parametrize("sampling", [False, True])
def test_custom_generate_from_a_local_folder(trained, tmp_path, sampling):
    """Plain transformers: ``generate(custom_generate=<dir>, trust_remote_code=True)`` decodes steered,
    greedy and seeded sampling, token for token as our processor does."""
    model, tokenizer, vector = trained
    directory = save_artifact(model, vector, tmp_path / "artifact", tokenizer)
    kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0} if sampling else {"do_sample": False}
    torch.manual_seed(5)
    expected = generate(model, tokenizer, logits_processor=[SteeringLogitsProcessor(vector)], **kwargs)
    torch.manual_seed(5)
    got = generate(model, tokenizer, custom_generate=str(directory), trust_remote_code=True, **kwargs)
    assert got == expected
    torch.manual_seed(5)
    assert generate(model, tokenizer, **kwargs) != expected


def test_old_run_directory_still_loads(trained, tmp_path):
    """A run written before the artifact: ``<run>/adapter`` (plain adapter) beside ``<run>/steering``."""
    model, tokenizer, vector = trained
    model.save_pretrained(str(tmp_path / "run" / "adapter"))
    vector.save(tmp_path / "run" / "steering")
    loaded = load_steered(tmp_path / "run" / "adapter")
    assert loaded.steering_vector is not None and torch.equal(loaded.steering_vector.direction, vector.direction)


def test_vector_of_another_vocabulary_is_refused(trained, tmp_path):
    model, tokenizer, _ = trained
    directory = save_artifact(model, SteeringVector(torch.zeros(5), mu=1.0), tmp_path / "bad", tokenizer)
    with pytest.raises(SteeringArtifactError, match="field 'vocab_size': 5, but the model has"):
        load_steered(directory)


class _Hub(BaseHTTPRequestHandler):
    """The three endpoints ``create_repo`` + ``upload_folder`` call, answering as the Hub does
    (small files go inline, base64, in the NDJSON commit)."""

    files: dict[str, bytes] = {}

    def _send(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        root = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            return self._send({"url": f"{root}/me/{json.loads(data)['name']}"})
        if "/preupload/" in self.path:
            files = json.loads(data)["files"]
            return self._send({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        for line in data.decode().splitlines():
            op = json.loads(line)
            if op.get("key") == "file":
                self.files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
        return self._send({"commitUrl": f"{root}/me/steered/commit/{'a' * 40}", "commitOid": "a" * 40})

    def log_message(self, *args) -> None:
        pass


def serve_hub():
    _Hub.files = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_push_to_hub_uploads_adapter_and_vector(trained, tmp_path, monkeypatch):
    """Every local file goes up, except that the uploaded custom_generate/generate.py names the repo
    and not the local path (which stays in the local copy, unchanged)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    model, tokenizer, vector = trained
    directory = save_artifact(model, vector, tmp_path / "artifact", tokenizer)
    local = {str(p.relative_to(directory)): p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}
    server = serve_hub()
    try:
        url = push_to_hub(directory, "me/steered", token="test", endpoint=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert url.endswith("a" * 40)
    assert set(_Hub.files) == set(local) and "steering/steering_vector.safetensors" in local
    generate_py = "custom_generate/generate.py"
    assert all(_Hub.files[name] == data for name, data in local.items() if name != generate_py)
    uploaded = _Hub.files[generate_py].decode()
    assert "REPO_ID = 'me/steered'" in uploaded and "ARTIFACT_DIR = None" in uploaded
    assert str(tmp_path) not in uploaded and str(tmp_path).encode() in local[generate_py]
    assert (Path(directory) / generate_py).read_bytes() == local[generate_py]


def test_push_with_the_hub_unreachable_is_one_line(trained, tmp_path, monkeypatch, capsys):
    """A network failure ended in a 74-line httpx traceback; now one line that says what to do."""
    import huggingface_hub.constants

    from svdecode_pl.cli.entry import main

    model, _, vector = trained
    model.save_pretrained(str(tmp_path / "run" / "adapter"))
    vector.save(tmp_path / "run" / "steering")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "test")
    monkeypatch.delenv("SVDECODE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["push", str(tmp_path / "run"), "me/steered", "--endpoint", "http://127.0.0.1:9"])  # nothing listens
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("svdecode: error: push: cannot reach the Hub at http://127.0.0.1:9 (")
    assert err[0].endswith("check the network (or HF_ENDPOINT, --endpoint) and run the same command again: nothing "
                           "was uploaded or changed")


def test_push_command_uploads_a_run_directory(trained, tmp_path, monkeypatch, capsys):
    """``svdecode push RUN_DIR REPO_ID``: a run written before the artifact (``<run>/adapter`` beside
    ``<run>/steering``) goes up as one artifact; bad input is one line and exit 2, nothing uploaded."""
    import huggingface_hub.constants

    from svdecode_pl.cli.entry import main

    model, tokenizer, vector = trained
    model.save_pretrained(str(tmp_path / "run" / "adapter"))
    vector.save(tmp_path / "run" / "steering")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "test")
    server = serve_hub()

    def push(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as info:
            main(["push", *args, "--endpoint", f"http://127.0.0.1:{server.server_port}"])
            raise SystemExit(0)
        out = capsys.readouterr()
        return info.value.code, out.out, out.err

    try:
        for args, expected in [((str(tmp_path / "nowhere"), "me/steered"), "no such directory"),
                               ((str(tmp_path), "me/steered"), "no adapter_config.json"),
                               ((str(tmp_path / "run"), "me/a/b"), "repo id 'me/a/b'"),
                               ((str(tmp_path / "run"),), "the following arguments are required: repo_id")]:
            code, _, err = push(*args)
            assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
        assert _Hub.files == {}
        (tmp_path / "bare" / "adapter").mkdir(parents=True)
        model.save_pretrained(str(tmp_path / "bare" / "adapter"))
        code, _, err = push(str(tmp_path / "bare"), "me/steered")
        assert code == 2 and "no steering vector to upload" in err and _Hub.files == {}
        code, out, _ = push(str(tmp_path / "run"), "me/steered")
    finally:
        server.shutdown()
    assert code == 0 and out.strip().endswith("a" * 40)
    adapter = tmp_path / "run" / "adapter"
    assert {n for n in _Hub.files if "/" not in n} == {p.name for p in adapter.iterdir()}
    assert _Hub.files["steering/steering_vector.safetensors"] == (
        tmp_path / "run" / "steering" / "steering_vector.safetensors").read_bytes()
    assert "ARTIFACT_DIR = None" in _Hub.files["custom_generate/generate.py"].decode()
