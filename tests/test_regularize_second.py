"""Second-half regularizers: λ-orthogonality, Cauchy–Schwarz discrete/eigenvector, LDReg, orthonormal low-rank
layers, orthonormality + modulation, SINDER — gradients against finite differences (float64) and known optima."""

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import spectrakit as sk
from spectrakit.errors import SpectrakitError
from spectrakit.regularize import (
    ApproximateOrthonormality,
    CauchySchwarzDiscrete,
    CauchySchwarzEigenvector,
    CompatibleMap,
    LambdaOrthogonality,
    LDReg,
    LowRankLinear,
    SingularValueShift,
    neighbor_loss,
    sinder_repair,
    singular_defects,
)

D = torch.float64


# Tiny matrices: a second intra-op thread only adds contention (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


# --- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("values", ["binary", "one-sided", "ternary"])
@pytest.mark.parametrize("normalized", [False, True])
def test_cauchy_schwarz_discrete_gradient(values, normalized):
    W = randn(4, 6).requires_grad_()
    assert gradcheck(lambda w: CauchySchwarzDiscrete([w], values=values, normalized=normalized)(), (W,))


def test_eigenvector_lambda_orthogonality_ldreg_gradients():
    C = randn(5, 5, seed=1)
    C = C + C.T
    X = randn(5, 3, seed=2).requires_grad_()
    assert gradcheck(lambda x: CauchySchwarzEigenvector(C, normalized=True)(x), (X,))
    assert gradcheck(lambda x: CauchySchwarzEigenvector(C)(x), (X,))
    W = randn(6, 4, seed=3).requires_grad_()
    for lam in (0.0, 0.5):
        assert gradcheck(lambda w, lam=lam: LambdaOrthogonality([w], lam=lam)(), (W,))
    # the reference batch is detached (the paper's choice), so the check holds it fixed
    Z = randn(40, 6, seed=4)
    assert gradcheck(lambda z: LDReg(k=8)(z, reference=Z), (Z.clone().requires_grad_(),))


def test_low_rank_penalty_singular_value_shift_and_neighbor_loss_gradients():
    def penalty(U, S, V):
        eye = torch.eye(3, dtype=D)
        return (U.T @ U - eye).square().sum() + (V.T @ V - eye).square().sum() + 0.7 * _flatness(S)

    inputs = (randn(5, 3, seed=5).requires_grad_(), randn(3, 3, seed=6).requires_grad_(),
              randn(7, 3, seed=7).requires_grad_())
    assert gradcheck(penalty, inputs)
    # the module computes that formula, and its gradient reaches the layer's parameters
    layer = LowRankLinear(7, 5, rank=3, dtype=D)
    with torch.no_grad():
        layer.U.copy_(inputs[0])
        layer.S.copy_(inputs[1])
        layer.V.copy_(inputs[2])
    value = ApproximateOrthonormality(layer, conditioning=0.7)()
    assert float(value.detach()) == pytest.approx(float(penalty(*inputs).detach()))
    value.backward()
    expected = torch.autograd.grad(penalty(*inputs), inputs)
    for got, want in zip((layer.U.grad, layer.S.grad, layer.V.grad), expected):
        assert torch.allclose(got, want, atol=1e-10)

    shift = SingularValueShift(randn(4, 6, seed=8))
    eps = randn(4, seed=9).requires_grad_()
    assert gradcheck(lambda e: torch.func.functional_call(shift, {"epsilon": e}, (None,)), (eps,))

    # neighbor_loss holds its targets, weights and mask fixed (detached, as in the paper), so its gradient is
    # that of mean_i ‖x_i − T_i‖ / scale over the defective tokens: checked in closed form
    tokens = randn(1, 25, 6, seed=10)
    direction = randn(6, seed=11)
    tokens[:, 12] += 8 * direction  # one defective token in the middle of a 5 × 5 grid
    tokens.requires_grad_()
    loss = neighbor_loss(tokens, (5, 5), direction)
    loss.backward()
    grid = tokens.detach().reshape(5, 5, 6)
    unit = direction / direction.norm()
    logits = -(torch.nn.functional.normalize(grid, dim=-1) @ unit).abs()
    weights = torch.exp(logits / 0.1)
    gaussian = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=D)
    cut = logits.mean() - 0.001 * logits.std()
    scale = grid[1:4, 1:4].norm(dim=-1).mean()
    defective = [(i, j) for i in range(1, 4) for j in range(1, 4) if logits[i, j] < cut]
    assert (2, 2) in defective
    expected, total = torch.zeros_like(grid), 0.0
    for i, j in defective:
        local = weights[i - 1:i + 2, j - 1:j + 2] * gaussian
        target = (grid[i - 1:i + 2, j - 1:j + 2] * (local / local.sum())[..., None]).sum(dim=(0, 1))
        total += float((grid[i, j] - target).norm())
        expected[i, j] = (grid[i, j] - target) / (grid[i, j] - target).norm() / scale / len(defective)
    assert float(loss.detach()) == pytest.approx(total / len(defective) / float(scale), rel=1e-10)
    assert torch.allclose(tokens.grad.reshape(5, 5, 6), expected, atol=1e-12)


def _flatness(S):
    G = S.T @ S
    return (G - G.diagonal().sum() / 3 * torch.eye(3, dtype=D)).square().sum()


# --- known optima -----------------------------------------------------------------------------

def test_cauchy_schwarz_discrete_zero_exactly_on_its_sets_with_any_scale():
    signs = torch.sign(randn(3, 10, seed=1))
    scales = torch.tensor([[0.1], [2.0], [7.0]], dtype=D)
    mask = (randn(3, 10, seed=2) > 0).to(D)
    cases = {"binary": signs * scales, "one-sided": mask * scales, "ternary": signs * mask * scales}
    for values, W in cases.items():
        assert float(CauchySchwarzDiscrete([W], values=values)()) == pytest.approx(0.0, abs=1e-9)
        assert float(CauchySchwarzDiscrete([W + 0.05 * randn(3, 10, seed=3)], values=values)()) > 1e-6
    # one scale per row: rows with different α are fine per row, not per tensor
    assert float(CauchySchwarzDiscrete([cases["binary"]], per="tensor")()) > 1e-3
    # the ternary set is not binary: a zero entry costs the binary regularizer
    assert float(CauchySchwarzDiscrete([cases["ternary"]], values="binary")()) > 1e-3
    normalized = CauchySchwarzDiscrete([randn(3, 10, seed=4)], normalized=True)()
    assert 0 <= float(normalized) <= 3


def test_cauchy_schwarz_discrete_descent_reaches_binary_weights():
    W = randn(2, 8, seed=5).requires_grad_()
    optimizer = torch.optim.Adam([W], lr=0.02)
    reg = CauchySchwarzDiscrete([W], normalized=True)
    for _ in range(600):
        optimizer.zero_grad()
        reg().backward()
        optimizer.step()
    magnitudes = W.detach().abs()
    assert torch.allclose(magnitudes, magnitudes.mean(dim=1, keepdim=True), rtol=2e-2)


def test_cauchy_schwarz_eigenvector_zero_on_eigenvectors_and_descent_finds_one():
    C = randn(6, 6, seed=6)
    C = C @ C.T
    values, vectors = torch.linalg.eigh(C)
    reg = CauchySchwarzEigenvector(C)
    assert float(reg(3.0 * vectors)) == pytest.approx(0.0, abs=1e-8)
    x = randn(6, seed=7).requires_grad_()
    optimizer = torch.optim.Adam([x], lr=0.01)
    normalized = CauchySchwarzEigenvector(C, normalized=True)
    for _ in range(1500):
        optimizer.zero_grad()
        normalized(x).backward()
        optimizer.step()
    v = x.detach() / x.detach().norm()
    assert float((vectors.T @ v).abs().max()) > 0.999
    with pytest.raises(SpectrakitError, match="square"):
        CauchySchwarzEigenvector(randn(3, 4))
    with pytest.raises(SpectrakitError, match="length 6"):
        reg(randn(5))


def test_lambda_orthogonality_zero_inside_the_ball_and_procrustes_optimum():
    Q = torch.linalg.qr(randn(5, 5, seed=8)).Q
    near = Q @ (torch.eye(5, dtype=D) + 0.01 * randn(5, 5, seed=9))
    distance = float(torch.linalg.matrix_norm(near.T @ near - torch.eye(5, dtype=D)))
    assert float(LambdaOrthogonality([near], lam=distance + 1e-6)()) == 0.0
    assert float(LambdaOrthogonality([near], lam=distance / 2)()) == pytest.approx((distance / 2) ** 2)
    assert float(LambdaOrthogonality([near], lam=0.0)()) == pytest.approx(distance ** 2)
    # a map fitted under a strong λ = 0 penalty is the orthogonal Procrustes solution; a loose λ gives least squares
    X = randn(200, 5, seed=10)
    A = randn(5, 5, seed=11)
    Y = X @ A.T + 0.01 * randn(200, 5, seed=12)
    U, _, Vh = torch.linalg.svd(Y.T @ X)
    procrustes = U @ Vh
    least_squares = torch.linalg.lstsq(X, Y).solution.T
    for lam, weight, expected in ((0.0, 1e4, procrustes), (1e6, 1.0, least_squares)):
        torch.manual_seed(0)
        mapping = CompatibleMap(5, 5, lam=lam, bias=False, dtype=D)
        optimizer = torch.optim.LBFGS(mapping.parameters(), max_iter=200, tolerance_grad=1e-14, history_size=50,
                                      tolerance_change=1e-16, line_search_fn="strong_wolfe")

        def closure(mapping=mapping, optimizer=optimizer, weight=weight):
            optimizer.zero_grad()
            loss = (mapping(X) - Y).square().sum() / len(X) + weight * mapping.penalty()
            loss.backward()
            return loss

        for _ in range(8):  # L-BFGS restarts: 3 were enough with one BLAS, 4 with another
            optimizer.step(closure)
        assert torch.allclose(mapping.linear.weight.detach(), expected, atol=2e-3)
    with pytest.raises(SpectrakitError, match="lam"):
        LambdaOrthogonality([near], lam=-1.0)


def test_ldreg_estimates_dimension_and_its_gradient_raises_it():
    ldreg = LDReg(k=20)
    for d in (2, 6):
        uniform = torch.rand(2000, d, dtype=D, generator=torch.Generator().manual_seed(d))
        estimate = float(ldreg.lid(uniform).median())
        assert 0.7 * d <= estimate <= 1.3 * d
    Z = (randn(256, 16, seed=13) * torch.tensor([1.0] * 2 + [0.01] * 14, dtype=D)).requires_grad_()
    before = float(ldreg.lid(Z).mean())
    optimizer = torch.optim.Adam([Z], lr=0.01)
    for _ in range(40):
        optimizer.zero_grad()
        ldreg(Z).backward()
        optimizer.step()
    assert float(ldreg.lid(Z).mean()) > 3 * before
    with pytest.raises(SpectrakitError, match="duplicate"):
        ldreg(torch.zeros(10, 3, dtype=D))
    with pytest.raises(SpectrakitError, match="k="):
        LDReg(k=1)


def test_low_rank_layer_is_the_truncated_svd_and_training_flattens_its_spectrum():
    linear = nn.Linear(12, 10, dtype=D)
    layer = LowRankLinear.from_linear(linear, rank=4)
    U, S, Vh = torch.linalg.svd(linear.weight.detach())
    assert torch.allclose(layer.weight(), (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-12)
    x = randn(3, 12, seed=14)
    assert torch.allclose(layer(x), x @ layer.weight().T + linear.bias, atol=1e-12)
    assert float(layer.orthonormality()) < 1e-20
    # zero exactly at orthonormal U, V and S = c · orthogonal
    with torch.no_grad():
        layer.S.copy_(2.5 * torch.linalg.qr(randn(4, 4, seed=15)).Q)
    assert float(ApproximateOrthonormality(layer)()) == pytest.approx(0.0, abs=1e-18)
    # retraction keeps the weight, puts the factors back on the manifold
    with torch.no_grad():
        layer.U.add_(0.1 * randn(10, 4, seed=16))
    weight = layer.weight().detach().clone()
    layer.retract_()
    assert torch.allclose(layer.weight(), weight, atol=1e-12)
    assert float(layer.orthonormality()) < 1e-20
    # penalized training lowers the condition number of the factorized layer
    layer = LowRankLinear.from_linear(linear, rank=4)
    condition = lambda: float(torch.linalg.cond(layer.weight()[:, :].detach() @ layer.V.detach()))  # noqa: E731
    start = condition()
    penalty = ApproximateOrthonormality(layer, conditioning=1.0)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
    for _ in range(200):
        optimizer.zero_grad()
        penalty().backward()
        optimizer.step()
    assert condition() < 1.0 + 0.5 * (start - 1.0)
    with pytest.raises(SpectrakitError, match="rank=11"):
        LowRankLinear(12, 10, rank=11)
    with pytest.raises(SpectrakitError, match="no LowRankLinear"):
        ApproximateOrthonormality(nn.Linear(3, 3))


def test_orthonormal_modulation_keeps_backward_errors_at_the_losss_size():
    torch.manual_seed(0)
    depth = 8
    model = nn.Sequential(*[nn.Linear(16, 16, bias=False, dtype=D) for _ in range(depth)])
    penalty, handle = sk.regularize.orthonormal_modulation(model, max_gain=100.0)
    assert float(penalty()) < 1e-20
    with torch.no_grad():
        for i, layer in enumerate(model):
            layer.weight.mul_(0.5 if i % 2 else 0.3)  # errors shrink ×0.5 / ×0.3 per layer without modulation
    x = randn(4, 16, seed=17).requires_grad_()
    out = model(x)
    upstream = randn(4, 16, seed=18)
    out.backward(upstream)
    assert float(x.grad.norm()) == pytest.approx(float(upstream.norm()), rel=1e-10)
    # the weights' own gradients are the plain ones at each layer, given the modulated error above it
    first = x.grad.clone()
    handle.remove()
    x.grad = None
    model(x).backward(upstream)
    assert float(x.grad.norm()) < 1e-3 * float(upstream.norm())
    assert torch.allclose(first / first.norm(), x.grad / x.grad.norm(), atol=1e-10)  # same direction, new size
    assert float(penalty()) > 1.0


# --- SINDER on a small ViT with a planted defect -------------------------------------------------

class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(attention @ v)
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """8 × 8 digits cut into 2 × 2 patches: a 4 × 4 grid of tokens."""

    def __init__(self, dim=32, depth=3):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.position = nn.Parameter(0.1 * torch.randn(1, 16, dim))
        self.blocks = nn.ModuleList(Block(dim, 64) for _ in range(depth))

    def tokens(self, images):
        patches = images.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        x = self.embed(patches) + self.position
        outputs = [x]
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


def planted_vit(planted=1, strength=40.0):
    torch.manual_seed(0)
    vit = TinyViT()
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    v = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    block = vit.blocks[planted]
    with torch.no_grad():  # hidden unit 0 fires on some tokens and writes a large u into them
        block.fc1.weight[0] = 3.0 * v
        block.fc1.bias[0] = -2.0
        block.fc2.weight[:, 0] += strength * u
    return vit, u


def test_sinder_finds_the_planted_block_and_repair_shrinks_the_defect():
    vit, u = planted_vit()
    images, _ = sk.data.digits("train")
    images = images[:64].reshape(-1, 8, 8) * 4 - 2
    with torch.no_grad():
        tokens = vit.tokens(images)
    report = singular_defects(list(vit.blocks), 32, tokens=tokens, samples=4096)
    assert report.defective == [1]
    assert abs(float(report.directions[1] @ u.double())) > 0.95
    assert report.layers[1][0][0] == "fc2" and report.layers[1][0][1] > 0.95  # the planted layer
    assert report.gaps[1] > 3 * max(report.gaps[0], report.gaps[2])

    def defect(vit):
        with torch.no_grad():
            return float((vit.tokens(images)[2] @ u).abs().amax(dim=1).mean())

    before = defect(vit)
    direction = report.directions[1].float()
    losses = sinder_repair([vit.blocks[1]], [images[:32], images[32:]], lambda batch: vit.tokens(batch)[2], (4, 4),
                           direction, steps=60, lr=0.5)
    assert losses[-1] < losses[0]
    assert defect(vit) < 0.5 * before
    for layer in vit.blocks[1].modules():
        if isinstance(layer, nn.Linear):
            sk.regularize.remove_parametrizations(layer)
    assert defect(vit) < 0.5 * before  # baked in


def test_sinder_bad_input():
    with pytest.raises(SpectrakitError, match="no blocks"):
        singular_defects([], 4)
    with pytest.raises(SpectrakitError, match="grid"):
        neighbor_loss(torch.randn(1, 16, 4), (2, 8), torch.randn(4))
    with pytest.raises(SpectrakitError, match="no nn.Linear"):
        sk.regularize.singular_value_finetune([nn.ReLU()])


def test_sinder_reads_hugging_face_vit_layers():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=8, patch_size=2, num_channels=1)
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    layers = [m for m in model.modules() if type(m).__name__ == "ViTLayer"]
    with torch.no_grad():
        hidden = model(torch.randn(2, 1, 8, 8), output_hidden_states=True).hidden_states
    report = singular_defects(layers, 32, tokens=hidden, samples=512)
    assert len(report.directions) == 2 and report.defective == []  # a random ViT has no planted defect
    A = sk.regularize.block_linearization(layers[0], 32, samples=512)
    assert A.shape == (32, 32)
    # a pre-norm residual block: the identity path dominates its linearization
    assert float(torch.linalg.svdvals(A - torch.eye(32, dtype=A.dtype))[0]) < float(torch.linalg.svdvals(A)[-1])


def test_intl_exact_whitening_through_inv_sqrtm():
    from spectrakit.regularize import INTL

    torch.manual_seed(0)
    well = torch.randn(400, 6, dtype=D) * torch.linspace(0.8, 1.2, 6, dtype=D)
    exact = INTL(eps=0.0, whitening="exact")
    assert torch.allclose(exact.whiten(well), INTL(iterations=40, eps=0.0).whiten(well), atol=1e-8)
    ill = torch.randn(300, 6, dtype=D) * torch.logspace(0, -3, 6, dtype=D)  # IterNorm needs many steps here
    W = exact.whiten(ill)
    assert torch.allclose(W.T @ W / len(ill), torch.eye(6, dtype=D), atol=1e-8)
    Z = randn(30, 4, seed=20).requires_grad_()
    exact = INTL(whitening="exact", eps=1e-3)
    assert gradcheck(lambda z: exact.trace_loss(exact.whiten(z)), (Z,))
    with pytest.raises(SpectrakitError, match="whitening"):
        INTL(whitening="svd")
