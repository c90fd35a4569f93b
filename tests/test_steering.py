"""The steering math against autograd, the explicit Jacobian and a brute-force mu* search."""

from __future__ import annotations

import warnings

import pytest
import torch

from svdecode_pl.steering.calibration import SteeringStatistics
from svdecode_pl.steering.strength import StrengthChoice
from svdecode_pl.steering.vector import SteeringVector, fine_tuning_gradient, steering_direction


def kl(z: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(z, -1)
    return (log_p.exp() * (log_p - log_q)).sum()


def test_direction_is_minus_kl_gradient_autograd():
    z_phi, z_theta = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, 11, dtype=torch.float64)
    z = z_phi.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(kl(z, torch.log_softmax(z_theta, -1)), z)
    delta = steering_direction(z_phi, z_theta)
    torch.testing.assert_close(delta, (-grad).float(), rtol=1e-5, atol=1e-6)


def test_direction_matches_explicit_jacobian_formula():
    z_phi, z_theta = torch.randn(7) * 3, torch.randn(7) * 3
    p, q = torch.softmax(z_phi.double(), -1), torch.softmax(z_theta.double(), -1)
    jacobian = torch.diag(p) - torch.outer(p, p)
    expected = jacobian @ (-torch.log(p / q) - 1)
    torch.testing.assert_close(steering_direction(z_phi, z_theta), expected.float(), rtol=1e-5, atol=1e-7)


def test_direction_identical_models_is_zero_and_finite_under_underflow():
    z = torch.randn(3, 9)
    assert torch.all(steering_direction(z, z) == 0)
    extreme = torch.tensor([[0.0, -2000.0, 5.0]])
    out = steering_direction(extreme, torch.tensor([[1.0, -1000.0, 0.0]]))
    assert torch.isfinite(out).all()


def test_confidence_threshold_filters_low_probability_entries():
    z_phi, z_theta = torch.tensor([[3.0, 0.0, -3.0, 1.0]]), torch.zeros(1, 4)
    p = torch.softmax(z_phi, -1)
    full = steering_direction(z_phi, z_theta, 0.0)
    filtered = steering_direction(z_phi, z_theta, 0.05)
    assert torch.all(filtered[p < 0.05] == 0)
    torch.testing.assert_close(filtered[p >= 0.05], full[p >= 0.05])
    assert (full[p < 0.05] != 0).all()


def test_fine_tuning_gradient_is_minus_cross_entropy_gradient():
    z = torch.randn(4, 6, requires_grad=True)
    y = torch.tensor([0, 5, 2, 2])
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y, reduction="sum"), z)
    torch.testing.assert_close(fine_tuning_gradient(z.detach(), y), -grad)


def brute_force_mu(g: torch.Tensor, delta: torch.Tensor) -> float:
    grid = torch.linspace(-50, 50, 200001, dtype=torch.float64)
    # sum_t ||g_t - mu delta_t||^2 = A - 2 mu B + mu^2 C, evaluated on the grid
    a, b, c = (g * g).sum(), (g * delta).sum(), (delta * delta).sum()
    loss = a - 2 * grid * b + grid**2 * c
    return float(grid[loss.argmin()])


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_mu_star_minimises_least_squares(mode):
    z_phi, z_theta = torch.randn(40, 13) * 2, torch.randn(40, 13) * 2
    y = torch.randint(0, 13, (40,))
    stats = SteeringStatistics(mode, 13)
    for part in range(4):  # streamed in batches
        rows = slice(10 * part, 10 * part + 10)
        stats.update(z_phi[rows], z_theta[rows], y[rows])
    vector = stats.steering_vector(eps=0.0)
    g = fine_tuning_gradient(z_phi, y).double()
    delta = steering_direction(z_phi, z_theta).double()
    if mode == "static":
        delta = delta.mean(0, keepdim=True).expand_as(delta)
        torch.testing.assert_close(vector.direction.double(), delta[0], rtol=1e-5, atol=1e-7)
    assert vector.mu == pytest.approx(brute_force_mu(g, delta), abs=1e-3)


def test_zero_direction_gives_mu_zero_with_warning():
    z = torch.randn(6, 5)
    stats = SteeringStatistics("dynamic", 5)
    stats.update(z, z, torch.zeros(6, dtype=torch.long))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vector = stats.steering_vector()
    assert vector.mu == 0.0
    assert any("zero" in str(w.message) for w in caught)


def test_non_finite_logits_are_an_error():
    stats = SteeringStatistics("static", 3)
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(torch.tensor([[0.0, float("nan"), 1.0]]), torch.zeros(1, 3), torch.tensor([0]))


def test_a_fitted_vector_is_at_its_mu_star_and_the_choice_sets_the_strength():
    """The fit gives mu*; which strength a run steers at is the strength record's (mu_scale applied
    there, once: tests/test_strength.py)."""
    z_phi, z_theta = torch.randn(8, 5), torch.randn(8, 5)
    stats = SteeringStatistics("static", 5)
    stats.update(z_phi, z_theta, torch.zeros(8, dtype=torch.long))
    fitted = stats.steering_vector()
    assert fitted.mu == fitted.metadata["mu_star"] and "mu_scale" not in fitted.metadata and fitted.choice is None
    choice = StrengthChoice("fixed", "dynamic", 2.0, "the fixed rule", mu_scale=3.0)
    steered = fitted.chosen(choice)
    assert (steered.mode, steered.mu, steered.choice) == ("dynamic", 2.0, choice)
    assert torch.equal(steered.direction, fitted.direction) and fitted.mu == fitted.metadata["mu_star"]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_artifact_round_trip(tmp_path, mode):
    direction = torch.randn(17) if mode == "static" else None
    meta = {"model": "m", "vocab_size": 17, "tokenizer_fingerprint": "abc", "token_count": 9}
    vector = SteeringVector(direction, -1.25, mode=mode, confidence_threshold=0.01, metadata=meta)
    loaded = SteeringVector.load(vector.save(tmp_path / "sv"))
    assert (loaded.mode, loaded.mu, loaded.confidence_threshold) == (mode, -1.25, 0.01)
    assert loaded.metadata == vector.metadata
    if mode == "static":
        assert torch.equal(loaded.direction, vector.direction)
    z, zb = torch.randn(2, 17), torch.randn(2, 17)
    torch.testing.assert_close(loaded.steer(z, zb), vector.steer(z, zb))


def test_artifact_mismatch_errors_name_file_and_field(tmp_path):
    meta = {"vocab_size": 17, "tokenizer_fingerprint": "abc"}
    path = SteeringVector(torch.randn(17), 1.0, metadata=meta).save(tmp_path / "sv")
    loaded = SteeringVector.load(path)
    with pytest.raises(ValueError, match=r"steering_vector.json: field 'vocab_size'"):
        loaded.check_compatible(18, "abc", source=str(path / "steering_vector.json"))
    with pytest.raises(ValueError, match=r"field 'tokenizer_fingerprint'"):
        loaded.check_compatible(17, "xyz", source=str(path / "steering_vector.json"))
    (path / "steering_vector.json").write_text('{"mode": "static"}')
    with pytest.raises(ValueError, match=r"steering_vector.json: field 'mu': missing"):
        SteeringVector.load(path)


def test_mu_zero_is_exactly_plain():
    z = torch.randn(3, 10)
    assert torch.equal(SteeringVector(torch.randn(10), 0.0).steer(z), z)
    vector = SteeringVector(None, 0.0, mode="dynamic", metadata={"vocab_size": 10})
    assert torch.equal(vector.steer(z, torch.randn(3, 10)), z)
