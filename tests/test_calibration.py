"""The streaming calibration pass on a real (tiny) model against a float64 autograd reference,
and the paper's first-order claim: a small step along the fitted steering does not raise the
calibration cross-entropy."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model

from svdecode_pl.models.heads import output_vocab_size
from svdecode_pl.models.loading import load_causal_lm
from svdecode_pl.steering.calibration import SteeringStatistics, accumulate_calibration

MODES = ["static", "dynamic"]


def adapted_model(adapter: str = "lora"):
    torch.manual_seed(0)
    config = (LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
              if adapter == "lora" else PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    return get_peft_model(load_causal_lm("svdecode-tiny"), config).eval()


def calibration_batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Three right-padded batches; the targets are the last tokens of each sequence."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for lengths in ([9, 6], [7], [8, 8, 5]):
        ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        attention = torch.zeros_like(ids)
        targets = torch.zeros_like(ids, dtype=torch.bool)
        for row, n in enumerate(lengths):
            ids[row, :n] = torch.randint(0, vocab, (n,), generator=generator)
            attention[row, :n] = 1
            targets[row, 3:n] = True
        batches.append({"input_ids": ids, "attention_mask": attention, "target_mask": targets})
    return batches


def token_logits(model, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adapted and base float64 logits at the positions predicting targets, with the targets,
    from plain whole-sequence forward passes (no code under test)."""
    adapted, base, targets = [], [], []
    with torch.no_grad():
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            predict = batch["target_mask"][:, 1:]
            z = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
            with model.disable_adapter():
                zb = model(input_ids=ids, attention_mask=mask).logits
            adapted.append(z[:, :-1][predict].double())
            base.append(zb[:, :-1][predict].double())
            targets.append(ids[:, 1:][predict])
    return torch.cat(adapted), torch.cat(base), torch.cat(targets)


def reference_vector(z_phi, z_theta, y, mode, threshold=0.0):
    """delta = -dKL(softmax(z)||p_theta)/dz by autograd, filtered; g = -dCE/dz by autograd; the
    static direction is their mean; mu* the least-squares fit, all in float64."""
    z = z_phi.clone().requires_grad_(True)
    log_p, log_q = torch.log_softmax(z, -1), torch.log_softmax(z_theta, -1)
    (grad_kl,) = torch.autograd.grad((log_p.exp() * (log_p - log_q)).sum(), z)
    z = z_phi.clone().requires_grad_(True)
    (grad_ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y, reduction="sum"), z)
    delta, g = -grad_kl, -grad_ce
    delta[torch.softmax(z_phi, -1) < threshold] = 0.0
    if mode == "static":
        direction = delta.mean(0)
        return direction, float((g @ direction).sum() / (len(y) * direction @ direction)), delta
    return None, float((g * delta).sum() / (delta * delta).sum()), delta


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threshold", [0.0, 1e-3])
@pytest.mark.parametrize("adapter", ["lora", "prompt_tuning"])
def test_streamed_statistics_equal_autograd_reference(mode, threshold, adapter):
    model = adapted_model(adapter)
    vocab = output_vocab_size(model)
    batches = calibration_batches(vocab)
    stats = SteeringStatistics(mode, vocab, threshold)
    accumulate_calibration(stats, model, batches, chunk_tokens=4)  # several chunks, a partial last one
    vector = stats.steering_vector(eps=0.0)
    direction, mu, per_token = reference_vector(*token_logits(model, batches), mode, threshold)
    assert vector.metadata["token_count"] == sum(int(b["target_mask"][:, 1:].sum()) for b in batches)
    # float32 logits (ours from the chunked head, the reference's from the full forward) differ
    # by rounding, so errors scale with the per-token directions, not with their mean. Random
    # virtual tokens barely move a tiny model (|delta| ~ 1e-4): there the logits' rounding is a
    # 1e-3 share of the direction; a misalignment by one position would change everything.
    rtol = 1e-5 if adapter == "lora" else 1e-3
    if mode == "static":
        torch.testing.assert_close(vector.direction.double(), direction, rtol=rtol,
                                   atol=rtol / 10 * float(per_token.abs().max()))
    assert vector.mu == pytest.approx(mu, rel=rtol)


@pytest.mark.parametrize("mode", MODES)
def test_small_step_along_steering_does_not_raise_cross_entropy(mode):
    """First order: CE(z + h mu* delta) = CE(z) - h mu* <g, delta> + O(h^2), and mu* has the
    sign of <g, delta>, so the step lowers the calibration cross-entropy, at the predicted rate."""
    model = adapted_model()
    vocab = output_vocab_size(model)
    batches = calibration_batches(vocab)
    vector = accumulate_calibration(SteeringStatistics(mode, vocab), model, batches).steering_vector()
    z_phi, z_theta, y = token_logits(model, batches)
    delta, _, _ = reference_vector(z_phi, z_theta, y, mode)
    if mode == "dynamic":
        z = z_phi.clone().requires_grad_(True)
        log_p, log_q = torch.log_softmax(z, -1), torch.log_softmax(z_theta, -1)
        (grad_kl,) = torch.autograd.grad((log_p.exp() * (log_p - log_q)).sum(), z)
        delta = -grad_kl
    g = torch.nn.functional.one_hot(y, vocab).double() - torch.softmax(z_phi, -1)
    inner = float((g * delta.expand_as(g)).sum())
    assert abs(inner) > 1e-6 and vector.mu * inner > 0

    def ce(h: float) -> float:
        return float(torch.nn.functional.cross_entropy(z_phi + h * vector.mu * delta, y, reduction="sum"))

    for h in (1e-2, 1e-3, 1e-4):
        assert ce(h) < ce(0.0)
        # the decrease matches the first-order prediction h * mu* * <g, delta>
        assert (ce(0.0) - ce(h)) == pytest.approx(h * vector.mu * inner, rel=20 * h + 1e-6)


def test_workspace_path_equals_allocating_path():
    """The in-place path the callback uses (logits buffers reused) gives the same sums."""
    torch.manual_seed(0)
    z_phi, z_theta, y = torch.randn(6, 50) * 4, torch.randn(6, 50) * 4, torch.randint(0, 50, (6,))
    for mode in MODES:
        plain, in_place = SteeringStatistics(mode, 50, 0.01), SteeringStatistics(mode, 50, 0.01)
        plain.update(z_phi, z_theta, y)
        in_place.update(z_phi.clone(), z_theta.clone(), y, workspace=torch.empty(6, 50))
        for name, value in plain.compute().items():
            torch.testing.assert_close(in_place.compute()[name], value, rtol=1e-6, atol=1e-9)


def test_non_finite_logits_name_the_batch():
    model = adapted_model()
    vocab = output_vocab_size(model)
    batches = calibration_batches(vocab)
    head = model.get_base_model().get_output_embeddings()

    class Poisoned(torch.nn.Module):
        """The head, but the logits of one position are NaN."""

        def forward(self, hidden):
            out = head(hidden)
            out[0, 7] = float("nan")
            return out

    stats = SteeringStatistics("static", vocab)
    with pytest.raises(ValueError, match=r"calibration batch 0: logits contain non-finite values"):
        accumulate_calibration(stats, model, batches, head=Poisoned())
