"""training_jacobian: top singular values of ∂θ_T/∂θ_0 against the explicit Jacobian."""

import pytest
import torch

import spectrakit as sk
from spectrakit.analyze.curvature.training_jacobian import _flatten
from spectrakit.errors import SpectrakitError


def explicit_jacobian(step, params, steps):
    theta0, unflatten, flatten = _flatten(params)

    def run(theta):
        state = unflatten(theta)
        for t in range(steps):
            state = step(state, t)
        return flatten(state)

    return torch.autograd.functional.jacobian(run, theta0)


def test_matches_svd_of_explicit_jacobian_for_sgd_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, generator=g, dtype=torch.float64),
                torch.randn(8, 2, generator=g, dtype=torch.float64)) for _ in range(2)]
    step, params = sk.analyze.sgd_train_step(model, torch.nn.functional.mse_loss, batches, lr=0.3)
    result = sk.analyze.training_jacobian(step, params, steps=4, k=5, tol=1e-10, vectors=True)
    J = explicit_jacobian(step, params, 4)
    U, S, Vh = torch.linalg.svd(J)
    assert result.converged
    torch.testing.assert_close(result.singular_values, S[:5], rtol=1e-6, atol=0)
    # singular vectors up to sign, and J v = σ u
    assert torch.allclose((result.right_vectors.T @ Vh[:5].T).diagonal().abs(), torch.ones(5, dtype=torch.float64),
                          atol=1e-6)
    assert torch.allclose(J @ result.right_vectors, result.left_vectors * result.singular_values, atol=1e-8)
    # the model itself was not trained
    assert torch.equal(params["0.weight"], model[0].weight.detach())


def test_plain_tensor_step_and_bad_input():
    A = torch.tensor([[0.9, 0.2], [0.0, 1.1]], dtype=torch.float64)
    result = sk.analyze.training_jacobian(lambda theta, t: A @ theta + 0.1 * torch.tanh(theta), torch.ones(2,
                                          dtype=torch.float64), steps=3, k=2, tol=1e-12)
    J = explicit_jacobian(lambda theta, t: A @ theta + 0.1 * torch.tanh(theta), torch.ones(2, dtype=torch.float64), 3)
    torch.testing.assert_close(result.singular_values, torch.linalg.svdvals(J), rtol=1e-8, atol=0)
    with pytest.raises(SpectrakitError, match="steps=0"):
        sk.analyze.training_jacobian(lambda theta, t: theta, torch.ones(2), steps=0)
    with pytest.raises(SpectrakitError, match="larger than"):
        sk.analyze.training_jacobian(lambda theta, t: 2 * theta, torch.ones(2), steps=1, k=3)
    with pytest.raises(SpectrakitError, match="does not depend"):
        sk.analyze.training_jacobian(lambda theta, t: theta.detach(), torch.ones(2), steps=1, k=1)
    with pytest.raises(SpectrakitError, match="NaN/Inf"):
        sk.analyze.training_jacobian(lambda theta, t: theta / 0, torch.ones(2), steps=1, k=1)
