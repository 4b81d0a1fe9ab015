"""Feature losses (VNE, VICReg, Jacobian): gradients in float64, optima, agreement with direct formulas."""

import math

import pytest
import torch
from torch.autograd import gradcheck

from spectrakit.errors import SpectrakitError
from spectrakit.regularize import INTL, VNE, JacobianPenalty, VICReg

D = torch.float64


# Tiny matrices: a second intra-op thread only adds contention (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def features(n=12, d=5, seed=0):
    torch.manual_seed(seed)
    return (torch.randn(n, d, dtype=D) * torch.linspace(0.3, 2, d, dtype=D)).requires_grad_()


@pytest.mark.parametrize("loss", [VNE(), VNE(maximize=False), VICReg(), VICReg(gamma=3.0, variance_weight=1.0), INTL(),
                                  INTL(iterations=1)])
def test_feature_loss_gradients(loss):
    assert gradcheck(loss, (features(),), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_vne_against_eigenvalues_and_extremes():
    H = features().detach()
    unit = H / H.norm(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(unit.T @ unit / len(H)).clamp_min(0)
    expected = -(lam * lam.clamp_min(1e-300).log()).sum()
    assert float(VNE.entropy(H)) == pytest.approx(float(expected), rel=1e-10)
    assert float(VNE()(H)) == pytest.approx(-float(expected))
    # isotropic features reach the maximum log d, collapsed ones the minimum 0
    d = 6
    iso = torch.cat([torch.eye(d, dtype=D), -torch.eye(d, dtype=D)])
    assert float(VNE.entropy(iso)) == pytest.approx(math.log(d), rel=1e-12)
    line = torch.randn(10, 1, dtype=D) * torch.ones(1, d, dtype=D)
    assert float(VNE.entropy(line)) == pytest.approx(0, abs=1e-10)
    assert 0 < float(VNE.entropy(H)) < math.log(5)


def test_vicreg_terms_against_formulas_and_optimum():
    Z = features(32, 6).detach()
    loss = VICReg(variance_weight=1.0, covariance_weight=0.0)
    std = torch.sqrt(Z.var(dim=0) + 1e-4)
    assert float(loss(Z)) == pytest.approx(float(torch.relu(1 - std).mean()))
    C = torch.cov(Z.T)
    off = (C.square().sum() - C.diagonal().square().sum()) / 6
    assert float(VICReg(variance_weight=0.0)(Z)) == pytest.approx(float(off))
    # decorrelated features with std ≥ γ cost nothing
    Q, _ = torch.linalg.qr(torch.randn(40, 6, dtype=D))
    white = torch.cat([Q, -Q]) * (79 / 2) ** 0.5
    assert float(VICReg()(white)) == pytest.approx(0, abs=1e-12)
    assert float(VICReg()(white, white)) == pytest.approx(0, abs=1e-12)
    assert float(VICReg()(0.5 * white)) > 1


def test_jacobian_penalty_exact_and_random_projections():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 7, dtype=D), torch.nn.Tanh(), torch.nn.Linear(7, 3, dtype=D))
    x = torch.randn(5, 4, dtype=D, requires_grad=True)
    jac = torch.func.vmap(torch.func.jacrev(net))(x.detach())
    truth = float(jac.square().sum() / 5)
    assert float(JacobianPenalty(exact=True)(x, net(x))) == pytest.approx(truth, rel=1e-12)
    # unbiased: the mean over many random projections approaches the exact value
    estimate = JacobianPenalty(n_projections=2000, seed=0)(x, net(x))
    assert float(estimate) == pytest.approx(truth, rel=0.05)
    # differentiable in the parameters and in the inputs (finite differences, fixed projections)
    v = torch.randn(2, 5, 3, dtype=D)
    params = tuple(net.parameters())
    penalty = JacobianPenalty()
    assert gradcheck(lambda *_: penalty(x, net(x), projections=v), params, eps=1e-6, atol=1e-6)
    assert gradcheck(lambda x_: JacobianPenalty(exact=True)(x_, net(x_)), (x,), eps=1e-6, atol=1e-6)


def test_jacobian_penalty_same_seed_same_value():
    net = torch.nn.Linear(4, 6)
    x = torch.randn(3, 4, requires_grad=True)
    a = JacobianPenalty(seed=3)(x, torch.tanh(net(x)))
    b = JacobianPenalty(seed=3)(x, torch.tanh(net(x)))
    assert float(a) == float(b)


def test_bad_feature_input():
    with pytest.raises(SpectrakitError, match="features"):
        VNE()(torch.randn(5))
    with pytest.raises(SpectrakitError, match="NaN"):
        VNE()(torch.full((4, 3), float("nan")))
    with pytest.raises(SpectrakitError, match="embeddings\\[1\\]"):
        VICReg()(torch.randn(4, 3), torch.randn(1, 3))
    with pytest.raises(SpectrakitError, match="require grad"):
        JacobianPenalty()(torch.randn(3, 2), torch.randn(3, 2))
    x = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(SpectrakitError, match="depend"):
        JacobianPenalty()(x, torch.nn.Linear(2, 2)(torch.randn(3, 2)))


def _iteration_polynomial(lam, steps):
    value = torch.ones_like(lam)
    for _ in range(steps):
        value = 0.5 * (3 * value - value ** 3 * lam)
    return value


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_intl_whitening_modulates_each_eigenvalue_by_the_iteration_polynomial(steps):
    # ground truth from the eigendecomposition of Σ: s -> (s - ε) f_T(s / tr Σ)² / tr Σ
    Z = features(n=200, d=6).detach()
    eps = 1e-3
    centred = Z - Z.mean(0)
    sigma = centred.T @ centred / Z.shape[0] + eps * torch.eye(6, dtype=D)
    s = torch.linalg.eigvalsh(sigma)
    trace = s.sum()
    expected = (s - eps) * _iteration_polynomial(s / trace, steps) ** 2 / trace
    W = INTL(iterations=steps, eps=eps).whiten(Z)
    got = torch.linalg.eigvalsh(W.T @ W / Z.shape[0])
    assert torch.allclose(got.sort().values, expected.sort().values, rtol=1e-10, atol=1e-12)
    assert torch.allclose(W.mean(0), torch.zeros(6, dtype=D), atol=1e-12)


def test_intl_converges_to_full_whitening_and_its_trace_loss_follows():
    # the uncoupled Newton iteration stays stable for many steps only on a well-conditioned Σ
    torch.manual_seed(0)
    Z = torch.randn(400, 6, dtype=D) * torch.linspace(0.8, 1.2, 6, dtype=D)
    intl = INTL(iterations=40, eps=0.0)
    W = intl.whiten(Z)
    assert torch.allclose(W.T @ W / Z.shape[0], torch.eye(6, dtype=D), atol=1e-8)
    n = Z.shape[0]  # Var uses 1/(N−1): a whitened feature has variance N/(N−1)
    assert math.isclose(float(intl(Z)), 6 * (n / (n - 1) - 1) ** 2, rel_tol=1e-6)
    few = INTL(iterations=1, eps=0.0)  # without ε, whitening does not see the scale of Z
    manual = (few.whiten(Z).var(dim=0) - 1).square().sum()
    assert torch.equal(few(Z), manual) and float(few(Z, 2 * Z)) == pytest.approx(2 * float(manual), rel=1e-12)


def test_intl_bad_input_is_one_clear_error():
    with pytest.raises(SpectrakitError, match="iterations"):
        INTL(iterations=0)
    with pytest.raises(SpectrakitError, match=r"embeddings\[1\]: contains NaN"):
        INTL()(torch.randn(8, 3), torch.full((8, 3), float("nan")))
    with pytest.raises(SpectrakitError, match="no variance"):
        INTL(eps=0.0)(torch.ones(8, 3))
    with pytest.raises(SpectrakitError, match="at least one"):
        INTL()()
