"""Steering-vector extraction at the Qwen2.5 vocabulary size: time per token and peak memory.

    python benchmarks/steering_extraction.py [--hidden 256] [--layers 4] [--sizes 16 64]
        [--naive-sizes 4 16] [--seq-len 256] [--batch 8] [--chunk-tokens 256] [--device cpu|cuda]
        [--dtype float32|bfloat16]

A tiny Qwen2 (hidden 256, 4 layers by default) with 151,936 logits, as Qwen2.5 has, and a LoRA
adapter with non-zero weights; random sequences of ``--seq-len`` tokens, every position a
calibration token (the worst case for memory). Each measurement runs in a fresh process, after
a warm-up batch, and reports the time per calibration token and the peak extra resident memory
(the peak RSS above the RSS before the pass, from the kernel's high-water mark; on ``--device cuda``
the peak CUDA memory allocated above that before the pass, and times synchronised):

- ``forward``: one plain forward pass of the adapted and one of the base model (full logits),
  the floor any extraction pays;
- ``ours``: :func:`svdecode_pl.steering.calibration.accumulate_calibration`, what the steering callback
  runs (head applied ``--chunk-tokens`` positions at a time, sufficient statistics only);
- ``naive``: the direct transcription: full-vocabulary logits of the whole batch from both
  models, log-softmaxes, the softmax Jacobian applied to all rows of the batch at once, and the
  per-token directions and fine-tuning gradients kept until the end to average the direction
  and fit mu*. (A literal V x V Jacobian would be 92 GB per token at this vocabulary.)

Memory: ours at ``--sizes`` sequences (it must stay flat as the data grows) and the naive
version at ``--naive-sizes`` (its memory grows with the data: 7 GB at 4 sequences, 14 GB at 8; 64
would need ~40 GB), one pass each in a fresh process. Time: ours and the forward floor alternate
``--repeat`` times over ``--time-size`` sequences in one process, the fastest pass of each
counting (the machine is shared). Ours and the naive version fit the same vector: the script
prints how far apart their mu* and directions are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VOCAB = 151_936


def build_model(directory: Path, hidden: int, layers: int) -> Path:
    from svdecode_pl.models.tiny import build_tiny_model

    return build_tiny_model(directory / f"tiny-{hidden}x{layers}-v{VOCAB}", "qwen2", hidden, layers, 4, 2,
                            vocab_size=VOCAB)


def load(model_dir: str, device: str = "cpu", dtype: str = "float32"):
    from peft import LoraConfig, get_peft_model

    from svdecode_pl.models.loading import load_causal_lm

    model = load_causal_lm(model_dir, dtype)
    torch.manual_seed(0)
    config = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, config).to(device).eval()


def batches(
    n_sequences: int, seq_len: int, batch: int, vocab: int, device: str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n_sequences, seq_len), generator=generator)
    out = []
    for start in range(0, n_sequences, batch):
        chunk = ids[start : start + batch]
        mask = torch.ones_like(chunk, dtype=torch.bool)
        mask[:, 0] = False  # the first token is context; every other position is a target
        out.append({"input_ids": chunk.to(device), "attention_mask": torch.ones_like(chunk).to(device),
                    "target_mask": mask.to(device)})
    return out


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: str) -> int:
    """Start a peak measurement; returns the memory in use now (KiB)."""
    if device == "cpu":
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return rss_kib("VmRSS")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() // 1024


def peak_kib(device: str) -> int:
    if device == "cpu":
        return rss_kib("VmHWM")
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() // 1024


def timed(fn, device: str) -> float:
    """Seconds of one ``fn()``, synchronised on a GPU (the benchmarks' one timer)."""
    from truthfulqa_mc import fastest_seconds  # this folder is on sys.path when run as a script

    return fastest_seconds(fn, device, repeats=1)


@torch.no_grad()
def run_forward(model, data: list[dict]) -> None:
    """The floor: full logits of the adapted and of the base model, nothing else."""
    for batch in data:
        _ = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            _ = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def run_ours(model, data: list[dict], chunk_tokens: int) -> dict:
    from svdecode_pl.steering.calibration import SteeringStatistics, accumulate_calibration

    device = next(model.parameters()).device
    stats = SteeringStatistics("static", VOCAB).to(device)
    accumulate_calibration(stats, model, data, chunk_tokens=chunk_tokens)
    vector = stats.steering_vector()
    return {"mu": vector.mu, "direction": vector.direction.cpu()}


@torch.no_grad()
def run_naive(model, data: list[dict]) -> dict:
    directions, gradients = [], []
    for batch in data:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        z_phi = model(input_ids=ids, attention_mask=mask).logits.float()
        with model.disable_adapter():
            z_theta = model(input_ids=ids, attention_mask=mask).logits.float()
        log_p, log_q = torch.log_softmax(z_phi, -1), torch.log_softmax(z_theta, -1)
        p = log_p.exp()
        v = -(log_p - log_q) - 1.0
        delta = p * v - p * (p * v).sum(-1, keepdim=True)  # (diag(p) - p p^T) v for every row
        targets = ids[:, 1:]
        predict = batch["target_mask"][:, 1:]
        grad = torch.nn.functional.one_hot(targets, VOCAB).to(p.dtype) - p[:, :-1]
        directions.append(delta[:, :-1][predict])
        gradients.append(grad[predict])
    delta, grad = torch.cat(directions), torch.cat(gradients)
    direction = delta.double().mean(0)
    mu = float((grad.double() @ direction).sum() / (delta.shape[0] * (direction @ direction) + 1e-8))
    return {"mu": mu, "direction": direction.float().cpu()}


def measure(args: argparse.Namespace) -> None:
    """One measurement, in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    device = args.device
    model = load(args.model_dir, device, args.dtype)
    data = batches(args.n, args.seq_len, args.batch, VOCAB, device)
    warm = batches(args.batch, args.seq_len, args.batch, VOCAB, device)
    tokens = sum(int(b["target_mask"].sum()) for b in data)
    fn = {
        "forward": lambda d: run_forward(model, d),
        "ours": lambda d: run_ours(model, d, args.chunk_tokens),
        "naive": lambda d: run_naive(model, d),
    }[args.variant]
    fn(warm)  # warm-up: allocator, kernels
    before = reset_peak(device)
    result = {}
    seconds = timed(lambda: result.update(fn(data) or {}), device)
    peak = peak_kib(device)
    out = {"variant": args.variant, "n": args.n, "tokens": tokens, "peak_extra_mb": (peak - before) / 1024,
           "device": device}
    if args.repeat:  # timing: this machine is shared, so the variant and the forward floor
        # alternate in this one process and the fastest pass of each counts
        floor = []
        for _ in range(args.repeat):
            floor.append(timed(lambda: run_forward(model, data), device))
            seconds = min(seconds, timed(lambda: fn(data), device))
        out["forward_us_per_token"] = 1e6 * min(floor) / tokens
    out.update(seconds=seconds, us_per_token=1e6 * seconds / tokens)
    if result:
        torch.save(result, args.result)
    print(json.dumps(out))


def spawn(args: argparse.Namespace, variant: str, n: int, result: Path, repeat: int = 0) -> dict:
    command = [sys.executable, __file__, "--measure", variant, "--n", str(n), "--model-dir", args.model_dir,
               "--result", str(result), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
               "--chunk-tokens", str(args.chunk_tokens), "--threads", str(args.threads), "--repeat", str(repeat),
               "--device", args.device, "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{variant} at {n} sequences failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 64], help="sequences, ours")
    parser.add_argument("--naive-sizes", type=int, nargs="*", default=[4, 8], help="sequences, naive")
    parser.add_argument("--time-size", type=int, default=16, help="sequences of the timed comparison")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=3, help="timed passes of ours and the forward floor")
    parser.add_argument("--model-dir")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak = CUDA memory allocated there)")
    parser.add_argument("--dtype", default="float32", help="the model's weights (bfloat16 on a GPU); sums stay float64")
    parser.add_argument("--measure", choices=["forward", "ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.variant = args.measure
        return measure(args)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        given = args.model_dir
        if args.model_dir is None:
            args.model_dir = str(build_model(tmp, args.hidden, args.layers))
        model_name = given or f"tiny Qwen2 hidden {args.hidden} x {args.layers} layers"
        runs: dict[tuple[str, int], dict] = {}
        results: dict[tuple[str, int], dict] = {}
        plan = [("ours", n) for n in args.sizes] + [("naive", n) for n in args.naive_sizes]
        for variant, n in plan:
            path = tmp / f"{variant}-{n}.pt"
            runs[variant, n] = spawn(args, variant, n, path)
            results[variant, n] = torch.load(path) if path.exists() else {}
            print(f"  {variant:<6} {n:>4} sequences: peak extra {runs[variant, n]['peak_extra_mb']:8.1f} MB, "
                  f"{runs[variant, n]['us_per_token']:8.1f} us/token (one pass)", flush=True)
        timed = spawn(args, "ours", args.time_size, tmp / "timed.pt", repeat=args.repeat)

    print(f"\nSteering extraction, V={VOCAB:,}, {model_name} + LoRA, "
          f"{args.seq_len}-token sequences, batch {args.batch}, chunk {args.chunk_tokens} tokens, "
          f"{args.threads} threads, {args.device}")
    print(f"{'variant':<10}{'sequences':>10}{'tokens':>9}{'peak extra MB':>15}{'us/token, 1 pass':>18}")
    for (variant, n), run in runs.items():
        print(f"{variant:<10}{n:>10}{run['tokens']:>9}{run['peak_extra_mb']:>15.1f}{run['us_per_token']:>18.1f}")
    ratio = timed["us_per_token"] / timed["forward_us_per_token"]
    print(f"\ntime per token, fastest of {args.repeat} alternating passes over {args.time_size} sequences: "
          f"ours {timed['us_per_token']:.1f} us, forward pass of adapted + base {timed['forward_us_per_token']:.1f} us"
          f" -> ratio {ratio:.2f}x (goal <= 1.3x)")
    peaks = {n: runs["ours", n]["peak_extra_mb"] for n in args.sizes}
    line = f"ours, peak extra memory over {min(peaks)}..{max(peaks)} sequences: {min(peaks.values()):.0f} to " \
           f"{max(peaks.values()):.0f} MB (goal: flat as the data grows, < 1500 MB)"
    if max(peaks) // 4 in peaks:
        line += f"; {max(peaks)} vs {max(peaks) // 4} sequences: {peaks[max(peaks)] / peaks[max(peaks) // 4]:.2f}x"
    print(line)
    for n in args.naive_sizes:
        if ("ours", n) not in runs:
            continue
        t = runs["naive", n]["us_per_token"] / runs["ours", n]["us_per_token"]
        m = runs["naive", n]["peak_extra_mb"] / max(runs["ours", n]["peak_extra_mb"], 1e-9)
        print(f"naive / ours at {n} sequences: time {t:.2f}x, peak extra memory {m:.1f}x")
        ours, naive = results["ours", n], results["naive", n]
        scale = float(ours["direction"].abs().max())
        print(f"  same vector: mu* {ours['mu']:.7g} vs {naive['mu']:.7g}; max |direction difference| / max |direction|"
              f" = {float((ours['direction'] - naive['direction']).abs().max()) / scale:.1e} (float32 log-softmax "
              "kernels sum 152k terms with ~1e-4 relative error; ours normalises with a separate sum)")
    if len(args.naive_sizes) > 1:
        lo, hi = min(args.naive_sizes), max(args.naive_sizes)
        growth = runs["naive", hi]["peak_extra_mb"] / max(runs["naive", lo]["peak_extra_mb"], 1e-9)
        print(f"naive, peak extra memory {hi} vs {lo} sequences: {growth:.2f}x")


if __name__ == "__main__":
    main()
