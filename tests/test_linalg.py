"""The spectral core against torch.linalg.svd in float64."""

import pytest
import torch
import torch.nn.functional as F

import spectrakit as sk
from spectrakit.errors import NonFiniteError, SpectrakitError

SHAPES = [(64, 64), (200, 50), (40, 300), (3, 129, 70)]


def reference_values(W):
    return torch.linalg.svdvals(W.double())


def decaying(m, n, decay=0.9, seed=0, dtype=torch.float64):
    """A matrix with σᵢ = decay^i and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    S = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return ((U * S) @ V.T).to(dtype)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["exact", "gram", "auto"])
def test_svdvals_fp32_matches_float64(shape, method):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    S = sk.linalg.svdvals(W, method=method)
    assert S.dtype == torch.float32
    assert S.shape == reference_values(W).shape
    assert rel(S, reference_values(W)) <= 1e-5
    assert bool((S[..., :-1] >= S[..., 1:]).all())


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_svd_reconstructs(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    U, S, Vh = sk.linalg.svd(W, method="exact")
    assert rel(S, reference_values(W)) <= 1e-5
    assert rel(U @ torch.diag_embed(S) @ Vh, W) <= 1e-5
    eye = torch.eye(S.shape[-1])
    assert torch.allclose(U.mT @ U, eye.expand_as(U.mT @ U), atol=1e-5)


def test_gram_svd_vectors_match_exact_on_well_conditioned():
    W = decaying(300, 80, decay=0.97)
    U, S, Vh = sk.linalg.svd(W, k=10, method="gram")
    Ur, Sr, Vhr = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(S, Sr[:10], rtol=1e-10)
    # vectors agree up to sign
    assert torch.allclose((U * Ur[:, :10]).sum(0).abs(), torch.ones(10, dtype=W.dtype), atol=1e-8)
    assert torch.allclose((Vh * Vhr[:10]).sum(1).abs(), torch.ones(10, dtype=W.dtype), atol=1e-8)


@pytest.mark.parametrize("shape", [(1000, 400), (400, 1000)])
def test_randomized_default_top_k_within_1e3(shape):
    W = decaying(*shape, decay=0.95, dtype=torch.float32)
    k = 20
    S = sk.linalg.svdvals(W, k=k, method="randomized")
    truth = reference_values(W)[:k]
    assert float(((S.double() - truth).abs() / truth).max()) <= 1e-3
    U, S2, Vh = sk.linalg.svd(W, k=k, method="randomized")
    assert U.shape == (shape[0], k) and Vh.shape == (k, shape[1])
    assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-4)


def test_randomized_same_seed_same_result():
    W = torch.randn(500, 300)
    a = sk.linalg.svd(W, k=8, method="randomized", seed=3)
    b = sk.linalg.svd(W, k=8, method="randomized", seed=3)
    c = sk.linalg.svd(W, k=8, method="randomized", seed=4, niter=0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_auto_choices():
    assert sk.linalg.choose_method((4096, 1024), k=16, want_vectors=True) == "randomized"
    assert sk.linalg.choose_method((4096, 1024), k=None, want_vectors=False) == "gram"
    assert sk.linalg.choose_method((64, 32), k=None, want_vectors=False) == "exact"
    assert sk.linalg.choose_method((4096, 1024), k=None, want_vectors=True) == "exact"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_fp32(dtype):
    W = torch.randn(150, 140).to(dtype)
    S = sk.linalg.svdvals(W)
    assert S.dtype == torch.float32
    assert rel(S, reference_values(W.float())) <= 1e-5
    S64 = sk.linalg.svdvals(W, dtype=torch.float64)
    assert S64.dtype == torch.float64


def test_k_and_method_errors():
    W = torch.randn(10, 5)
    with pytest.raises(SpectrakitError, match="k=6"):
        sk.linalg.svdvals(W, k=6)
    with pytest.raises(SpectrakitError, match="method"):
        sk.linalg.svd(W, method="qr")
    with pytest.raises(SpectrakitError, match="NaN"):
        sk.linalg.svdvals(torch.full((4, 4), float("nan")))
    with pytest.raises(SpectrakitError, match="not floating point"):
        sk.linalg.svdvals(torch.ones(4, 4, dtype=torch.int8))
    with pytest.raises(SpectrakitError, match="meta"):
        sk.linalg.svdvals(torch.empty(4, 4, device="meta"))


# --- spectral norm ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(50, 50), (300, 40), (40, 300), (5, 60, 30)])
def test_gram_bound_is_upper_and_tight(shape):
    for seed in range(5):
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        sigma = torch.linalg.matrix_norm(W.double(), 2)
        bound = sk.linalg.spectral_norm(W, "gram")
        assert bool((bound >= sigma).all())
        assert bool((bound <= 1.01 * sigma).all())


def test_gram_bound_worst_case_flat_spectrum():
    # all singular values equal: the hardest case for the bound
    Q = torch.linalg.qr(torch.randn(512, 512, dtype=torch.float64)).Q
    bound = sk.linalg.spectral_norm(Q, "gram")
    assert 1.0 <= float(bound) <= 1.01
    # fewer iterations: still an upper bound, but looser
    loose = sk.linalg.spectral_norm(Q, "gram", n_iter=3)
    assert float(loose) >= float(bound) >= 1.0


def test_power_and_exact_spectral_norm():
    W = decaying(120, 80, decay=0.8)
    truth = torch.linalg.matrix_norm(W, 2)
    assert torch.isclose(sk.linalg.spectral_norm(W, "exact"), truth)
    assert torch.isclose(sk.linalg.spectral_norm(W, "power"), truth, rtol=1e-6)


def test_persistent_power_iteration_converges_and_is_differentiable():
    # a fixed matrix with σ₁ = 1.5 σ₂: 300 steps converge whatever ran before (an unseeded
    # Gaussian matrix's gap can be too small for that)
    U, S, Vh = torch.linalg.svd(torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
                                full_matrices=False)
    S[0] = 1.5 * S[1]
    W = (U * S) @ Vh
    W.requires_grad_(True)
    state = sk.linalg.PowerIteration(n_iter=1)
    for _ in range(300):
        sigma = sk.linalg.spectral_norm(W, state=state)
    truth = torch.linalg.matrix_norm(W.detach(), 2)
    assert abs(float(sigma.detach()) - float(truth)) / float(truth) < 1e-4
    sigma.backward()
    U, S, Vh = torch.linalg.svd(W.detach())
    assert torch.allclose(W.grad, torch.outer(U[:, 0], Vh[0]).abs().mul(torch.sign(W.grad)), atol=1e-3)
    assert torch.allclose(W.grad.abs(), torch.outer(U[:, 0], Vh[0]).abs(), atol=1e-3)


# --- convolution spectra ---------------------------------------------------------------------

def circular_operator(kernel, spatial):
    """The explicit matrix of a stride-1 circular convolution, column by column."""
    c_in = kernel.shape[1]
    n = c_in
    for s in spatial:
        n *= s
    basis = torch.eye(n, dtype=kernel.dtype).reshape(n, c_in, *spatial)
    pad = []
    for k in reversed(kernel.shape[2:]):
        pad += [0, k - 1]
    padded = F.pad(basis, pad, mode="circular")
    conv = F.conv1d if kernel.ndim == 3 else F.conv2d
    return conv(padded, kernel).reshape(n, -1).T


@pytest.mark.parametrize("kernel_shape,spatial", [
    ((3, 2, 3), (8,)), ((4, 4, 5), (7,)), ((2, 3, 3, 3), (5, 6)), ((4, 2, 2, 3), (4, 4)),
])
def test_conv_singular_values_match_circulant_operator(kernel_shape, spatial):
    kernel = torch.randn(*kernel_shape, dtype=torch.float64)
    operator = circular_operator(kernel, spatial)
    truth = torch.linalg.svdvals(operator)
    values = sk.linalg.conv_singular_values(kernel, spatial)
    assert values.shape[0] <= truth.shape[0]
    assert torch.allclose(values, truth[: values.shape[0]], atol=1e-10)
    assert torch.allclose(truth[values.shape[0]:], torch.zeros(1, dtype=truth.dtype), atol=1e-10)


def test_conv_input_shape_errors():
    kernel = torch.randn(4, 3, 3, 3)
    with pytest.raises(SpectrakitError, match="channels"):
        sk.linalg.conv_singular_values(kernel, (5, 8, 8))
    with pytest.raises(SpectrakitError, match="exceeds"):
        sk.linalg.conv_singular_values(kernel, (2, 8))
    assert sk.linalg.conv_singular_values(kernel, (3, 8, 8)).shape == (3 * 64,)


# --- polar factor ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 64), (100, 30), (30, 100)])
def test_newton_schulz_polar_factor(shape):
    W = decaying(*shape, decay=0.99)  # condition number ≤ 2
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    Q = sk.linalg.orthogonalize(W, steps=6)
    assert torch.allclose(Q, U @ Vh, atol=1e-6)


def test_muon_coefficients_roughly_orthogonal():
    W = torch.randn(64, 128)
    Q = sk.linalg.orthogonalize(W, steps=5, coefficients="muon")
    S = torch.linalg.svdvals(Q)
    assert float(S.min()) > 0.5 and float(S.max()) < 1.3


# --- incremental SVD -------------------------------------------------------------------------

def test_svd_update_columns_and_rows_exact():
    A = torch.randn(60, 20, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    C = torch.randn(60, 7, dtype=torch.float64)
    U2, S2, Vh2 = sk.linalg.svd_update(U, S, Vh, columns=C)
    full = torch.cat([A, C], dim=1)
    assert torch.allclose(S2, torch.linalg.svdvals(full), atol=1e-10)
    assert torch.allclose(U2 @ torch.diag(S2) @ Vh2, full, atol=1e-10)
    R = torch.randn(9, 20, dtype=torch.float64)
    U3, S3, Vh3 = sk.linalg.svd_update(U, S, Vh, rows=R)
    stacked = torch.cat([A, R], dim=0)
    assert torch.allclose(U3 @ torch.diag(S3) @ Vh3, stacked, atol=1e-10)


def test_svd_update_truncated_tracks_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    left = torch.randn(200, 5, generator=g, dtype=torch.float64)
    right = torch.randn(5, 80, generator=g, dtype=torch.float64)
    X = left @ right
    U, S, Vh = torch.linalg.svd(X[:20], full_matrices=False)
    U, S, Vh = U[:, :5], S[:5], Vh[:5]
    for block in X[20:].split(30):
        U, S, Vh = sk.linalg.svd_update(U, S, Vh, rows=block, k=5)
    assert torch.allclose(S, torch.linalg.svdvals(X)[:5], rtol=1e-9)
    assert torch.allclose(U @ torch.diag(S) @ Vh, X, atol=1e-8)


def test_incremental_svd_streaming_rows():
    # rank 10 < k: the streamed factorization is exact
    g = torch.Generator().manual_seed(1)
    X = torch.randn(1000, 10, generator=g, dtype=torch.float64) @ decaying(10, 64, decay=0.8)
    tracker = sk.linalg.IncrementalSVD(k=16)
    for block in X.split(128):
        tracker.update(block)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    assert tracker.rows_seen == 1000
    assert torch.allclose(tracker.S[:10], S[:10], rtol=1e-9)
    assert torch.allclose((tracker.Vh[:10] * Vh[:10]).sum(1).abs(), torch.ones(10, dtype=X.dtype), atol=1e-8)
    # full rank with k = n: exact as well
    Y = decaying(700, 32, decay=0.9)
    full = sk.linalg.IncrementalSVD(k=32)
    for block in Y.split(100):
        full.update(block)
    assert torch.allclose(full.S, torch.linalg.svdvals(Y), rtol=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["gram", "exact", "randomized", "auto"])
def test_every_method_rejects_a_single_non_finite_entry(bad, method):
    W = torch.randn(300, 200)
    W[123, 45] = bad
    k = 5 if method == "randomized" else None
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        sk.linalg.svdvals(W, k=k, method=method)
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        sk.linalg.svd(W, k=k or 5, method=method)


def test_gram_recovers_from_overflow_of_finite_entries():
    # squares of 1e20 overflow fp32, though every entry is finite: the Gram path redoes the
    # product in float64 instead of reporting the matrix as non-finite
    torch.manual_seed(0)
    W = torch.randn(200, 80, dtype=torch.float64) * 1e20
    truth = torch.linalg.svdvals(W)
    values = sk.linalg.svdvals(W.float(), method="gram")
    assert values.dtype == torch.float32
    assert torch.allclose(values.double(), truth, rtol=1e-5)
    U, S, Vh = sk.linalg.svd(W.float(), k=4, method="gram")
    assert torch.allclose(S.double(), truth[:4], rtol=1e-5)
    assert U.dtype == torch.float32
    # squares that fit fp32 one by one but whose sum (the largest eigenvalue) does not
    W = (torch.ones(200, 80, dtype=torch.float64) + 0.1 * torch.randn(200, 80, dtype=torch.float64)) * 8e17
    assert float((W.float().double() ** 2).sum(0).max()) < 3e38 < float(torch.linalg.svdvals(W)[0] ** 2)
    values = sk.linalg.svdvals(W.float(), method="gram")
    assert torch.allclose(values.double(), torch.linalg.svdvals(W), rtol=1e-5)


def test_auto_values_of_small_single_precision_matrix_match_exact_float64():
    # auto takes a double-precision Gram matrix here; it must be at least as accurate as
    # the single-precision SVD it replaces, also on an ill-conditioned matrix
    torch.manual_seed(1)
    Q1 = torch.linalg.qr(torch.randn(120, 100, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(100, 100, dtype=torch.float64)).Q
    truth = torch.logspace(0, -4, 100, dtype=torch.float64)
    W = (Q1 * truth) @ Q2.T
    auto = sk.linalg.svdvals(W.float())
    exact32 = sk.linalg.svdvals(W.float(), method="exact")
    assert auto.dtype == torch.float32
    auto_error = ((auto.double() - truth).abs() / truth).max()
    exact_error = ((exact32.double() - truth).abs() / truth).max()
    assert auto_error <= max(exact_error, 1e-5)


def _residual_ratio(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> float:
    truth = torch.linalg.svdvals(W.double())
    approx = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
    return float((W.double() - approx).norm() / truth[k:].norm())


@pytest.mark.parametrize("shape", [(1024, 384), (384, 1024)])
def test_krylov_is_near_eckart_young_on_a_flat_spectrum(shape):
    # a Gaussian matrix has the flat Marchenko–Pastur spectrum of a freshly initialized layer:
    # the hard case for iterative methods
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    U, S, Vh = sk.linalg.svd(W, k=16, method="krylov")
    assert U.shape == (shape[0], 16) and Vh.shape == (16, shape[1])
    assert _residual_ratio(W, U, S, Vh, 16) <= 1.001
    assert torch.allclose(U.T @ U, torch.eye(16), atol=1e-4)
    assert torch.allclose(Vh @ Vh.T, torch.eye(16), atol=1e-4)


def test_krylov_top_values_on_a_decaying_spectrum():
    torch.manual_seed(0)
    Q1 = torch.linalg.qr(torch.randn(800, 400, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(400, 400, dtype=torch.float64)).Q
    truth = 0.95 ** torch.arange(400, dtype=torch.float64)
    W = (Q1 * truth) @ Q2.T
    S = sk.linalg.svdvals(W, k=10, method="krylov")
    assert torch.allclose(S, truth[:10], rtol=1e-8)


def test_krylov_complex_batched_and_rank_deficient():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 400, 200, dtype=torch.complex128, generator=g)
    U, S, Vh = sk.linalg.svd(W, k=6, method="krylov")
    truth = torch.linalg.svdvals(W)
    assert S.shape == (3, 6)
    assert bool((S <= truth[:, :6] * (1 + 1e-12)).all())  # Ritz values never overshoot
    approx = (U * S.to(W.dtype).unsqueeze(-2)) @ Vh
    ratio = (W - approx).flatten(1).norm(dim=1) / truth[:, 6:].norm(dim=1)
    assert bool((ratio <= 1.001).all())
    # rank 3: the Krylov space runs out; the basis is rebuilt and the spectrum stays right
    low = torch.randn(500, 3, dtype=torch.float64, generator=g) @ torch.randn(3, 300, dtype=torch.float64, generator=g)
    S_low = sk.linalg.svdvals(low, k=8, method="krylov")
    assert torch.allclose(S_low[:3], torch.linalg.svdvals(low)[:3], rtol=1e-10)
    assert float(S_low[3:].abs().max()) < 1e-6 * float(S_low[0])


def test_krylov_on_a_small_problem_is_the_exact_eigensolve():
    W = torch.randn(60, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    S = sk.linalg.svdvals(W, k=10, method="krylov")  # (5 + 1)·10 ≥ 40 columns: solved exactly
    assert torch.allclose(S, torch.linalg.svdvals(W)[:10], rtol=1e-10)


@pytest.mark.parametrize("shape,dtype", [((300, 800), torch.float64), ((2, 40, 500), torch.float32),
                                         ((64, 420), torch.complex128), ((50, 100), torch.float64)])
def test_gram_equals_the_full_product(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(*shape, generator=g, dtype=dtype)
    expected = X.mH @ X
    G = sk.linalg.gram(X)
    assert G.shape == expected.shape
    tolerance = {"rtol": 1e-5, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
    assert torch.allclose(G, expected, **tolerance)
    if shape[-1] >= 384:  # formed in blocks: the lower triangle is a copy of the upper one
        assert torch.equal(torch.tril(G, -1), torch.tril(G.mH, -1))
    leaf = X.clone().requires_grad_(True)  # under autograd: one product, differentiable
    (grad,) = torch.autograd.grad(sk.linalg.gram(leaf).abs().square().sum(), leaf)
    reference = X.clone().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad((reference.mH @ reference).abs().square().sum(), reference)
    assert torch.allclose(grad, expected_grad, rtol=1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gram_functions_promote_half_precision(dtype):
    from spectrakit.linalg.gram import gram_eigh, gram_svd, gram_svdvals

    W = torch.randn(40, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    truth = torch.linalg.svdvals(W.double())
    assert torch.allclose(gram_svdvals(W).double(), truth, rtol=1e-4, atol=1e-4)
    U, S, Vh = gram_svd(W, 24)
    assert S.dtype == torch.float32 and torch.allclose((U * S) @ Vh, W.float(), atol=1e-4)
    assert torch.allclose(gram_eigh(W)[0].double(), truth, rtol=1e-4, atol=1e-4)
