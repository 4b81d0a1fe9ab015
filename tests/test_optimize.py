"""spectrakit.optimize: each update against its explicit formula (float64 ground truth),
torch.optim.Muon as the anchor, state_dict resume, GradScaler, schedulers, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import spectrakit as sk
from spectrakit.errors import NonFiniteError, SpectrakitError
from spectrakit.optimize import (
    SAM,
    SOAP,
    GaLore,
    Grokfast,
    MultiNormalized,
    Muon,
    Shampoo,
    dct_basis,
    for_model,
    sinkhorn_normalize,
)
from spectrakit.optimize._projection import dct_indices, svd_basis


def regression(seed: int = 0, rows: int = 12, columns: int = 20, samples: int = 64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, columns, generator=g), torch.randn(samples, columns, generator=g),
            torch.randn(samples, rows, generator=g))


def loss_of(W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return ((X @ W.T - Y) ** 2).mean()


def train(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, X: torch.Tensor, Y: torch.Tensor,
          steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(param, X, Y).backward()
        optimizer.step()


# -- Muon ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_bf16_matches_torch(shape: tuple[int, int], adjust: str, nesterov: bool) -> None:
    W, X, Y = regression(rows=shape[0], columns=shape[1])
    ours, theirs = torch.nn.Parameter(W.clone()), torch.nn.Parameter(W.clone())
    lr, steps = 0.02, 6
    opt_ours = Muon([ours], lr=lr, weight_decay=0.1, adjust_lr=adjust, nesterov=nesterov, ns_dtype=torch.bfloat16)
    opt_theirs = torch.optim.Muon([theirs], lr=lr, weight_decay=0.1, adjust_lr_fn=adjust, nesterov=nesterov)
    for _ in range(steps):
        train(ours, opt_ours, X, Y, 1)
        train(theirs, opt_theirs, X, Y, 1)
    assert not torch.equal(ours, W)
    # bf16 rounding of the update (2⁻⁸ relative) times the step size, per step
    assert torch.allclose(ours, theirs, rtol=0, atol=steps * lr * 2 * 2**-8)


def test_muon_float32_update_in_quintic_band_with_gradient_singular_vectors() -> None:
    G = torch.randn(48, 32, dtype=torch.float64)
    W = torch.nn.Parameter(torch.zeros(48, 32))
    W.grad = G.float()
    Muon([W], lr=1.0, momentum=0.0, nesterov=False, adjust_lr=None).step()
    O = -W.detach().double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    core = U.T @ O @ Vh.T  # diagonal when O shares G's singular vectors
    values = torch.linalg.svdvals(O)
    assert values.min() > 0.6 and values.max() < 1.2, values
    assert torch.allclose(core, torch.diag(torch.diagonal(core)), atol=1e-4)
    assert not torch.allclose(values, torch.ones_like(values), atol=1e-3)  # a band, not exactly 1


def test_muon_flattens_conv_kernels() -> None:
    kernel = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    flat = torch.nn.Parameter(kernel.detach().reshape(8, 27).clone())
    grad = torch.randn(8, 3, 3, 3)
    kernel.grad, flat.grad = grad.clone(), grad.reshape(8, 27).clone()
    Muon([kernel], lr=0.1).step()
    Muon([flat], lr=0.1).step()
    assert torch.equal(kernel.detach().reshape(8, 27), flat.detach())


def test_muon_transposed_group_scales_lr_by_out_in() -> None:
    stored = torch.nn.Parameter(torch.zeros(8, 32))  # a Conv1D weight: in × out, i.e. out×in = 32×8
    stored.grad = torch.randn(8, 32)
    plain = torch.nn.Parameter(torch.zeros(8, 32))
    plain.grad = stored.grad.clone()
    Muon([{"params": [stored], "transposed": True}], lr=0.1).step()
    Muon([plain], lr=0.1).step()
    assert torch.allclose(stored, plain * 2)  # √(32/8) = 2 versus √max(1, 8/32) = 1


# -- the matrix optimizers against their formulas ---------------------------------------------------
def inverse_fourth_root(A: torch.Tensor, eps: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(A + eps * torch.eye(A.shape[0], dtype=A.dtype))
    return vectors @ torch.diag(values ** -0.25) @ vectors.T


def test_shampoo_step_is_explicit_inverse_fourth_roots() -> None:
    W0, X, Y = regression(rows=6, columns=9)
    W0, X, Y = W0.double(), X.double(), Y.double()
    param = torch.nn.Parameter(W0.clone())
    lr, eps = 0.05, 1e-3
    opt = Shampoo([param], lr=lr, betas=(0.0, 0.999), epsilon=eps, precondition_frequency=1, graft=None)
    reference = W0.clone()
    L, R = torch.zeros(6, 6, dtype=torch.float64), torch.zeros(9, 9, dtype=torch.float64)
    for _ in range(3):
        ref = reference.clone().requires_grad_()
        loss_of(ref, X, Y).backward()
        G = ref.grad
        L, R = L + G @ G.T, R + G.T @ G
        reference = reference - lr * inverse_fourth_root(L, eps) @ G @ inverse_fourth_root(R, eps)
        train(param, opt, X, Y, 1)
    assert torch.allclose(param.detach(), reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("graft", ["adam", "sgd"])
def test_shampoo_graft_takes_the_step_norm(graft: str) -> None:
    param = torch.nn.Parameter(torch.zeros(6, 9, dtype=torch.float64))
    G = torch.randn(6, 9, dtype=torch.float64)
    param.grad = G.clone()
    Shampoo([param], lr=1.0, betas=(0.0, 0.999), graft=graft).step()
    adam_step = G / (G.abs() + 1e-8)  # Adam's first step, bias-corrected
    expected = torch.linalg.norm(adam_step if graft == "adam" else G)
    assert torch.isclose(torch.linalg.norm(param.detach()), expected, rtol=1e-10)


def test_shampoo_leaves_long_sides_unpreconditioned() -> None:
    param = torch.nn.Parameter(torch.zeros(4, 30, dtype=torch.float64))
    G = torch.randn(4, 30, dtype=torch.float64)
    param.grad = G.clone()
    Shampoo([param], lr=1.0, betas=(0.0, 0.999), epsilon=1e-6, graft=None, max_preconditioner_dim=10).step()
    assert torch.allclose(-param.detach(), inverse_fourth_root(G @ G.T, 1e-6) @ G, atol=1e-8)


def test_soap_with_frequency_one_is_adam_in_the_explicit_eigenbasis() -> None:
    W0, X, Y = regression(rows=5, columns=7)
    W0, X, Y = W0.double(), X.double(), Y.double()
    param = torch.nn.Parameter(W0.clone())
    lr, (b1, b2), eps = 0.01, (0.9, 0.95), 1e-8
    opt = SOAP([param], lr=lr, betas=(b1, b2), eps=eps, precondition_frequency=1, eigh_dtype=torch.float64)
    reference = W0.clone()
    L, R = torch.zeros(5, 5, dtype=torch.float64), torch.zeros(7, 7, dtype=torch.float64)
    M, V = torch.zeros_like(W0), torch.zeros_like(W0)
    for t in range(1, 5):
        ref = reference.clone().requires_grad_()
        loss_of(ref, X, Y).backward()
        G = ref.grad
        L, R = b2 * L + (1 - b2) * G @ G.T, b2 * R + (1 - b2) * G.T @ G
        QL, QR = torch.linalg.eigh(L)[1], torch.linalg.eigh(R)[1]
        M = b1 * M + (1 - b1) * G
        rotated = QL.T @ G @ QR
        V = b2 * V + (1 - b2) * rotated ** 2
        step = (QL.T @ M @ QR / (1 - b1 ** t)) / ((V / (1 - b2 ** t)).sqrt() + eps)
        reference = reference - lr * QL @ step @ QR.T
        train(param, opt, X, Y, 1)
    assert torch.allclose(param.detach(), reference, rtol=0, atol=1e-9)


@pytest.mark.parametrize("projection", ["svd", "dct"])
def test_galore_full_rank_sgd_is_sgd(projection: str) -> None:
    W, X, Y = regression(rows=8, columns=14)
    ours, theirs = torch.nn.Parameter(W.clone().double()), torch.nn.Parameter(W.clone().double())
    X, Y = X.double(), Y.double()
    train(ours, GaLore([ours], lr=0.05, rank=8, update_every=100, scale=1.0, projection=projection,
                       base="sgd", momentum=0.9), X, Y, 5)
    train(theirs, torch.optim.SGD([theirs], lr=0.05, momentum=0.9), X, Y, 5)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("projection", ["svd", "dct"])
def test_galore_full_rank_adamw_is_adamw(projection: str) -> None:
    W, X, Y = regression(rows=8, columns=14)
    ours, theirs = torch.nn.Parameter(W.clone().double()), torch.nn.Parameter(W.clone().double())
    X, Y = X.double(), Y.double()
    train(ours, GaLore([ours], lr=0.01, rank=8, update_every=2, scale=1.0, projection=projection,
                       base="adamw", weight_decay=0.1), X, Y, 6)
    train(theirs, torch.optim.AdamW([theirs], lr=0.01, weight_decay=0.1), X, Y, 6)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)


def test_galore_svd_basis_is_the_top_singular_subspace_and_state_is_small() -> None:
    G = torch.randn(10, 30, dtype=torch.float64)
    P = svd_basis(G, 3)
    U = torch.linalg.svd(G)[0][:, :3]
    assert torch.allclose(P @ P.T, U @ U.T, atol=1e-10)
    tall = torch.randn(30, 10, dtype=torch.float64)
    Q = svd_basis(tall, 3)
    V = torch.linalg.svd(tall)[2][:3].T
    assert Q.shape == (10, 3) and torch.allclose(Q @ Q.T, V @ V.T, atol=1e-10)
    param = torch.nn.Parameter(torch.zeros(10, 30))
    param.grad = G.float()
    opt = GaLore([param], rank=3, projection="dct")
    opt.step()
    assert opt.state[param]["exp_avg"].shape == (3, 30) and opt.state[param]["indices"].shape == (3,)


def test_dct_basis_is_orthonormal_and_choice_keeps_most_energy() -> None:
    D = dct_basis(17, torch.float64)
    assert torch.allclose(D.T @ D, torch.eye(17, dtype=torch.float64), atol=1e-12)
    import numpy as np
    import scipy.fft

    assert np.allclose(D.numpy(), scipy.fft.dct(np.eye(17), norm="ortho", axis=0).T)  # scipy's DCT-II
    for G in (torch.randn(17, 40, dtype=torch.float64), torch.randn(40, 17, dtype=torch.float64)):
        chosen = dct_indices(G, 5)
        energy = ((D.T @ G) ** 2).sum(1) if G.shape[0] <= G.shape[1] else ((G @ D) ** 2).sum(0)
        others = torch.ones(17, dtype=torch.bool)
        others[chosen] = False
        assert energy[chosen].min() >= energy[others].max()


def test_multinormalized_matches_sinkgd_formula() -> None:
    G = torch.randn(6, 10, dtype=torch.float64)
    rows = G / G.norm(dim=1, keepdim=True) * 10 ** 0.5
    once = rows / rows.norm(dim=0, keepdim=True) * 6 ** 0.5
    assert torch.allclose(sinkhorn_normalize(G, 1), once)
    converged = sinkhorn_normalize(G, 200)
    assert torch.allclose(converged.norm(dim=1), torch.full((6,), 10 ** 0.5, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(converged.norm(dim=0), torch.full((10,), 6 ** 0.5, dtype=torch.float64), rtol=1e-6)
    param = torch.nn.Parameter(torch.zeros(6, 10, dtype=torch.float64))
    param.grad = G
    MultiNormalized([param], lr=0.5, iterations=3).step()
    assert torch.allclose(param.detach(), -0.5 * sinkhorn_normalize(G, 3))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturbation_and_step(adaptive: bool) -> None:
    model = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    twin = copy.deepcopy(model)
    rho, eta, lr = 0.1, 0.01, 0.2
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=lr)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    closure()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    T = [w.abs() + eta if adaptive else torch.ones_like(w) for w in weights]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(T, grads)))
    expected = [rho * t * t * g / norm for t, g in zip(T, grads)]
    for (_, epsilon), want in zip(opt.perturbation(), expected):
        assert torch.allclose(epsilon, want)
    opt.step(closure)
    with torch.no_grad():  # the explicit two passes
        for p, e in zip(twin.parameters(), expected):
            p.add_(e)
    ((twin(x) - y) ** 2).mean().backward()
    with torch.no_grad():
        for p, w in zip(twin.parameters(), weights):
            p.copy_(w - lr * p.grad)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q)


def test_grokfast_equals_explicit_ema() -> None:
    model = torch.nn.Linear(4, 3)
    alpha, lamb = 0.9, 2.0
    grokfast = Grokfast(model, alpha=alpha, lamb=lamb)
    average = None
    for step in range(4):
        model.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        raw = model.weight.grad.clone()
        average = raw if average is None else alpha * average + (1 - alpha) * raw
        grokfast()
        assert torch.allclose(model.weight.grad, raw + lamb * average), step


# -- state_dict, GradScaler, schedulers ------------------------------------------------------------
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 16), torch.nn.GELU(),
                               torch.nn.Conv1d(16, 12, 3, padding=1), torch.nn.Flatten(1),
                               torch.nn.Linear(12 * 6, 20))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 20, (4, 6), generator=g), torch.randint(0, 20, (4,), generator=g)


def model_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    tokens, target = batch(step)
    hidden = model[1](model[0](tokens))  # b × 6 × 16
    features = model[3](model[2](hidden).transpose(1, 2))
    return torch.nn.functional.cross_entropy(model[5](model[4](features)), target)


BUILD = {
    "muon": lambda m: for_model(m, "muon", lr=0.02),
    "soap": lambda m: for_model(m, "soap", precondition_frequency=2),
    "shampoo": lambda m: for_model(m, "shampoo", precondition_frequency=2),
    "galore-svd": lambda m: for_model(m, "galore", rank=4, update_every=2),
    "galore-dct": lambda m: for_model(m, "galore", rank=4, update_every=2, projection="dct"),
    "multinorm": lambda m: for_model(m, "multinorm"),
    "adamw": lambda m: for_model(m, "adamw"),
    "sam-muon": lambda m: SAM([p for p in m.parameters() if p.ndim >= 2], Muon, rho=0.05, lr=0.02),
}


def run_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range,
              grokfast: Grokfast | None = None) -> None:
    for step in steps:
        def closure(step: int = step) -> torch.Tensor:
            opt.zero_grad()
            loss = model_loss(model, step)
            loss.backward()
            if grokfast is not None:
                grokfast()
            return loss
        if isinstance(opt, SAM):
            opt.step(closure)
        else:
            closure()
            opt.step()


@pytest.mark.parametrize("name", [*BUILD, "grokfast"])
def test_interrupted_and_resumed_equals_uninterrupted(name: str) -> None:
    build = BUILD.get(name, BUILD["muon"])
    straight = tiny_model()
    opt = build(straight)
    filt = Grokfast(straight) if name == "grokfast" else None
    run_steps(straight, opt, range(6), filt)

    first = tiny_model()
    opt_first = build(first)
    filt_first = Grokfast(first) if name == "grokfast" else None
    run_steps(first, opt_first, range(3), filt_first)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict(),
                "grokfast": filt_first.state_dict() if filt_first else None}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_model()
    resumed.load_state_dict(saved["model"])
    opt_resumed = build(resumed)
    opt_resumed.load_state_dict(saved["opt"])
    filt_resumed = Grokfast(resumed) if name == "grokfast" else None
    if filt_resumed is not None:
        filt_resumed.load_state_dict(saved["grokfast"])
    run_steps(resumed, opt_resumed, range(3, 6), filt_resumed)
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    assert not torch.equal(straight[1].weight, tiny_model()[1].weight)


@pytest.mark.parametrize("method", ["muon", "soap", "shampoo", "galore", "multinorm"])
def test_grad_scaler_skips_inf_and_unscales(method: str) -> None:
    options = {"rank": 4} if method == "galore" else {}
    scaled_model, plain_model = tiny_model(), tiny_model()
    scaled_opt, plain_opt = for_model(scaled_model, method, **options), for_model(plain_model, method, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaled_opt.zero_grad()
    scaler.scale(model_loss(scaled_model, 0)).backward()
    scaled_model[1].weight.grad[0, 0] = float("inf")
    before = copy.deepcopy(scaled_model.state_dict())
    scaler.step(scaled_opt)
    scaler.update()
    assert all(torch.equal(before[k], v) for k, v in scaled_model.state_dict().items())
    assert scaler.get_scale() == 2.0 ** 9
    for step in range(2):
        scaled_opt.zero_grad()
        scaler.scale(model_loss(scaled_model, step)).backward()
        scaler.step(scaled_opt)
        scaler.update()
        plain_opt.zero_grad()
        model_loss(plain_model, step).backward()
        plain_opt.step()
    for a, b in zip(scaled_model.parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_lr_scheduler_drives_every_group() -> None:
    model = tiny_model()
    opt = for_model(model, "muon")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    run_steps(model, opt, range(1))
    scheduler.step()
    assert all(group["lr"] == 0.0 for group in opt.param_groups)
    frozen = copy.deepcopy(model.state_dict())
    run_steps(model, opt, range(1, 2))
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items())


# -- bad input ------------------------------------------------------------------------------------
def test_non_matrix_parameter_points_to_for_model() -> None:
    with pytest.raises(SpectrakitError, match=r"bias.*for_model"):
        Muon(torch.nn.Linear(4, 3).named_parameters())


def test_nan_gradient_names_the_parameter() -> None:
    layer = torch.nn.Linear(4, 3)
    opt = Muon([("layer.weight", layer.weight)])
    layer.weight.grad = torch.full((3, 4), float("nan"))
    with pytest.raises(NonFiniteError, match=r"^layer\.weight: the gradient holds NaN"):
        opt.step()


@pytest.mark.parametrize("cls", [Muon, SOAP, Shampoo, GaLore, MultiNormalized])
def test_negative_lr_is_one_line(cls: type) -> None:
    with pytest.raises(SpectrakitError, match=r"lr=-0\.1 must be a finite number ≥ 0") as error:
        cls([torch.nn.Parameter(torch.zeros(3, 4))], lr=-0.1)
    assert "\n" not in str(error.value)


def test_rank_larger_than_matrix_is_one_line() -> None:
    with pytest.raises(SpectrakitError, match=r"w: GaLore rank=5 exceeds the shorter side 4"):
        GaLore([("w", torch.nn.Parameter(torch.zeros(4, 9)))], rank=5)


@pytest.mark.parametrize("options", [{"adjust_lr": "bogus"}, {"momentum": 1.5}, {"ns_steps": -1}])
def test_bad_muon_options(options: dict) -> None:
    with pytest.raises(SpectrakitError, match="Muon"):
        Muon([torch.nn.Parameter(torch.zeros(3, 4))], **options)


def test_top_level_exposes_optimize() -> None:
    assert sk.optimize.Muon is Muon
