"""Matrix square roots, spectral-set projections and the sparse incremental SVD against ground truth."""

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import spectrakit as sk
from spectrakit.errors import SpectrakitError

D = torch.float64


def spd(n, condition, seed=0):
    """A symmetric positive-definite matrix with log-spaced eigenvalues from 1 down to 1/condition."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D)).Q
    values = torch.logspace(0, -float(np.log10(condition)), n, dtype=D)
    return (Q * values) @ Q.T


def eigh_root(A, power):
    values, vectors = torch.linalg.eigh(A)
    return (vectors * values.pow(power)) @ vectors.T


@pytest.mark.parametrize("condition", [1.0, 1e2, 1e5])
def test_newton_schulz_roots_match_eigh_in_float64(condition):
    A = spd(48, condition)
    S, T = sk.linalg.sqrtm(A), sk.linalg.inv_sqrtm(A)
    assert float((S - eigh_root(A, 0.5)).norm() / eigh_root(A, 0.5).norm()) <= 1e-8
    assert float((T - eigh_root(A, -0.5)).norm() / eigh_root(A, -0.5).norm()) <= 1e-8


def test_batched_and_single_precision_roots():
    A = torch.stack([spd(16, 10, seed=1), spd(16, 1e3, seed=2)])
    S = sk.linalg.sqrtm(A)
    assert torch.allclose(S, torch.stack([eigh_root(a, 0.5) for a in A]), atol=1e-10)
    S32 = sk.linalg.sqrtm(A.float())
    assert S32.dtype == torch.float32
    assert float((S32.double() - S).norm() / S.norm()) <= 1e-5


def test_pade_root_is_accurate_on_a_well_conditioned_matrix():
    A = spd(32, 4)
    S = sk.linalg.sqrtm(A, method="pade", degree=12)
    assert float((S - eigh_root(A, 0.5)).norm() / eigh_root(A, 0.5).norm()) <= 1e-8
    T = sk.linalg.inv_sqrtm(A, method="pade", degree=12)
    assert float((T - eigh_root(A, -0.5)).norm() / eigh_root(A, -0.5).norm()) <= 1e-8


@pytest.mark.parametrize("method", ["newton-schulz", "pade"])
@pytest.mark.parametrize("inverse", [False, True])
def test_root_gradients_pass_gradcheck(method, inverse):
    A = spd(8, 3 if method == "pade" else 50, seed=3).requires_grad_()
    root = sk.linalg.inv_sqrtm if inverse else sk.linalg.sqrtm

    def f(X):
        return root(0.5 * (X + X.mT), method=method, degree=16)

    assert gradcheck(f, (A,))


def test_root_gradient_matches_eigh_autograd():
    A = spd(12, 20, seed=4)
    weights = torch.randn(12, 12, dtype=D, generator=torch.Generator().manual_seed(0))
    grads = []
    for method in ("newton-schulz", "eigh"):
        X = A.clone().requires_grad_()
        (sk.linalg.sqrtm(0.5 * (X + X.T), method=method) * weights).sum().backward()
        grads.append(X.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-9)


def test_root_bad_input_is_one_line():
    for bad, text in [(torch.randn(3, 4, dtype=D), "square"),
                      (torch.randn(4, 4, dtype=D), "symmetric"),
                      (torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=D)), "positive-definite"),
                      (torch.tensor([[2.0, 1.9], [1.9, 1.0]], dtype=D), "not positive definite")]:
        with pytest.raises(SpectrakitError, match=text) as info:
            sk.linalg.sqrtm(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(SpectrakitError, match="method"):
        sk.linalg.sqrtm(torch.eye(3), method="svd")


def test_inverse_root_whitens_real_features():
    X, _ = sk.data.digits("train")
    Xc = X.double() - X.double().mean(0)
    cov = Xc.T @ Xc / len(Xc) + 1e-3 * torch.eye(64, dtype=D)
    whitened = Xc @ sk.linalg.inv_sqrtm(cov)
    assert torch.allclose(whitened.T @ whitened / len(Xc) + 1e-3 * sk.linalg.inv_sqrtm(cov) @ sk.linalg.inv_sqrtm(cov),
                          torch.eye(64, dtype=D), atol=1e-8)


# --- projections against cvxpy -------------------------------------------------------------

def nearest(W, constraints, symmetric=False):
    cp = pytest.importorskip("cvxpy")
    X = cp.Variable(W.shape, symmetric=symmetric)
    cp.Problem(cp.Minimize(cp.sum_squares(X - W.numpy())), constraints(X)).solve(solver=cp.CLARABEL)
    return torch.from_numpy(X.value)


def dilation(X, m, n):
    import cvxpy as cp

    return cp.bmat([[np.zeros((m, m)), X], [X.T, np.zeros((n, n))]])


@pytest.mark.parametrize("seed", [0, 1])
def test_spectral_projections_are_the_convex_solvers_nearest_points(seed):
    cp = pytest.importorskip("cvxpy")
    W = torch.randn(6, 4, dtype=D, generator=torch.Generator().manual_seed(seed))
    cases = [
        (sk.linalg.project_nuclear_ball(W, 2.0), lambda X: [cp.normNuc(X) <= 2.0]),
        (sk.linalg.project_spectral_ball(W, 1.0), lambda X: [cp.sigma_max(X) <= 1.0]),
        (sk.linalg.project_ky_fan_ball(W, 2, 2.0), lambda X: [cp.lambda_sum_largest(dilation(X, 6, 4), 2) <= 2.0]),
        (sk.linalg.project_ky_fan_ball(W, 3, 1.5), lambda X: [cp.lambda_sum_largest(dilation(X, 6, 4), 3) <= 1.5]),
    ]
    for mine, constraints in cases:
        assert torch.allclose(mine, nearest(W, constraints), atol=2e-5)
    A = torch.randn(5, 5, dtype=D, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(sk.linalg.project_psd(A), nearest(A, lambda X: [X >> 0], symmetric=True), atol=2e-5)


def test_projection_of_an_inside_point_is_itself_and_ky_fan_limits():
    W = torch.randn(5, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    big = float(torch.linalg.matrix_norm(W, "nuc")) + 1
    assert torch.equal(sk.linalg.project_nuclear_ball(W, big), W)
    assert torch.allclose(sk.linalg.project_ky_fan_ball(W, 1, 0.5), sk.linalg.project_spectral_ball(W, 0.5), atol=1e-10)
    assert torch.allclose(sk.linalg.project_ky_fan_ball(W, 3, 0.5), sk.linalg.project_nuclear_ball(W, 0.5), atol=1e-10)


def test_rank_projection_is_eckart_young():
    W = torch.randn(2, 7, 5, dtype=D, generator=torch.Generator().manual_seed(3))
    X = sk.linalg.project_rank(W, 2)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(X, (U[..., :2] * S[..., None, :2]) @ Vh[..., :2, :], atol=1e-12)
    assert torch.allclose(torch.linalg.matrix_norm(W - X), S[..., 2:].norm(dim=-1), atol=1e-12)


def test_projection_bad_input_is_one_line():
    W = torch.randn(4, 3, dtype=D)
    for call, text in [(lambda: sk.linalg.project_nuclear_ball(W, 0.0), "radius"),
                       (lambda: sk.linalg.project_spectral_ball(W, -1.0), "radius"),
                       (lambda: sk.linalg.project_ky_fan_ball(W, 2, 0), "radius"),
                       (lambda: sk.linalg.project_rank(W, 4), "k=4"),
                       (lambda: sk.linalg.project_ky_fan_ball(W, 5, 1.0), "k=5"),
                       (lambda: sk.linalg.project_psd(W), "square")]:
        with pytest.raises(SpectrakitError, match=text) as info:
            call()
        assert "\n" not in str(info.value)


# --- sparse incremental SVD -----------------------------------------------------------------

def test_sparse_incremental_svd_equals_a_fresh_svd():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(300, 40, dtype=D, generator=g)
    tracker = sk.linalg.SparseIncrementalSVD.from_matrix(A, k=500)
    full = A
    for step in range(4):
        C = torch.randn(300, 15, dtype=D, generator=g) * (torch.rand(300, 15, generator=g) < 0.05)
        if step == 2:
            C[:, 0] = 0           # an empty column
            C[:, 1] = A[:, 0]     # a column inside the current span
        tracker.update(C.to_sparse())
        full = torch.cat([full, C], 1)
    reference = torch.linalg.svdvals(full)
    r = tracker.S.shape[0]
    assert r == 98  # 100 columns, two adding no new direction
    assert torch.allclose(tracker.S, reference[:r], atol=1e-11)
    assert torch.allclose(tracker.U * tracker.S @ tracker.Vh, full, atol=1e-11)
    assert torch.allclose(tracker.U.T @ tracker.U, torch.eye(r, dtype=D), atol=1e-11)
    assert torch.allclose(tracker.compact().U * tracker.S @ tracker.Vh, full, atol=1e-11)


def test_sparse_incremental_svd_truncated_matches_brand_update():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(120, 30, dtype=D, generator=g)
    C = torch.randn(120, 10, dtype=D, generator=g) * (torch.rand(120, 10, generator=g) < 0.1)
    tracker = sk.linalg.SparseIncrementalSVD.from_matrix(A, k=12).update(C)
    U, S, Vh = sk.linalg.svd(A)
    _, S_brand, _ = sk.linalg.svd_update(U[:, :12], S[:12], Vh[:12], columns=C, k=12)
    assert torch.allclose(tracker.S, S_brand, atol=1e-11)
    with pytest.raises(SpectrakitError, match="columns: 119 rows"):
        tracker.update(torch.zeros(119, 2, dtype=D))


def test_sparse_incremental_svd_all_zero_block_adds_nothing():
    A = torch.randn(50, 10, dtype=D, generator=torch.Generator().manual_seed(4))
    tracker = sk.linalg.SparseIncrementalSVD.from_matrix(A, k=30).update(torch.zeros(50, 4, dtype=D))
    assert tracker.S.shape == (10,)
    grown = torch.cat([A, torch.zeros(50, 4, dtype=D)], 1)
    assert torch.allclose(tracker.U * tracker.S @ tracker.Vh, grown, atol=1e-12)
