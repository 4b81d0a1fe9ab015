"""spectrakit.analyze.hessian against explicit float64 curvature matrices."""

import math
import warnings

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import spectrakit as sk
from spectrakit.errors import SpectrakitError

F = torch.nn.functional


def mlp(seed=0, sizes=(5, 12, 3), activation=torch.nn.Tanh):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return torch.nn.Sequential(*layers).double()


def regression_batches(seed=1, count=2, size=16, d_in=5, d_out=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, d_in, generator=g, dtype=torch.float64),
             torch.randn(size, d_out, generator=g, dtype=torch.float64)) for _ in range(count)]


def flat_loss(model, loss_fn, batches, names=None, forward=None):
    """The mean batch loss as a function of the chosen parameters, flattened and concatenated."""
    named = dict(model.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]

    def loss(theta):
        params = dict(named)
        params.update({n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)})
        total = 0
        for batch in batches:
            if forward is None:
                out = functional_call(model, params, (batch[0],))
                total = total + loss_fn(out, batch[1]).mean()
            else:
                total = total + forward(lambda *a, **k: functional_call(model, params, a, k), batch)
        return total / len(batches)

    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    return loss, theta0, sizes


def explicit_hessian(model, loss_fn, batches, names=None, forward=None):
    loss, theta0, sizes = flat_loss(model, loss_fn, batches, names, forward)
    return torch.autograd.functional.hessian(loss, theta0), sizes


def operator_matrix(curvature, block=None):
    n = curvature.operator.block_size(block)
    eye = torch.eye(n, dtype=torch.float64)
    return torch.stack([curvature.matvec(eye[i], block) for i in range(n)], dim=1)


def test_top_k_matches_eigvalsh_on_mlp():
    model, batches = mlp(), regression_batches()
    H, _ = explicit_hessian(model, F.mse_loss, batches)
    h = sk.analyze.hessian(model, F.mse_loss, batches)
    assert torch.allclose(operator_matrix(h), H, atol=1e-10)
    exact = torch.linalg.eigvalsh(H)
    top = h.top(5, tol=1e-10, vectors=True)
    assert top.converged
    torch.testing.assert_close(top.values, exact.flip(0)[:5], rtol=1e-6, atol=0)
    # eigenvectors: orthonormal and A v = λ v
    V = top.vectors
    torch.testing.assert_close(V.T @ V, torch.eye(5, dtype=torch.float64), atol=1e-8, rtol=0)
    assert float((H @ V - V * top.values).norm()) < 1e-6 * float(top.values.abs().max())
    smallest = h.top(3, tol=1e-10, which="SA")
    torch.testing.assert_close(smallest.values, exact[:3], rtol=1e-6, atol=1e-9)
    # seeded and deterministic
    again = sk.analyze.hessian(model, F.mse_loss, batches).top(5, tol=1e-10)
    assert torch.equal(again.values, top.values)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=4, n_head=2, vocab_size=7, n_positions=6,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (3, 6), generator=g)
    return model, ids


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def lm_forward(model, batch):
    return model(input_ids=batch), batch


def test_top_k_and_blocks_on_tiny_transformer():
    model, ids = tiny_gpt2()
    names = [n for n, _ in model.named_parameters() if n.startswith("transformer.h.0.attn.")]

    def forward(call, batch):
        return lm_loss(call(input_ids=batch).logits, batch)

    with sdpa_kernel([SDPBackend.MATH]):
        H, sizes = explicit_hessian(model, None, [ids], names, forward)
    h = sk.analyze.hessian(model, lm_loss, [ids], params="transformer.h.0.attn.*", forward=lm_forward)
    assert h.parameter_names == names
    exact = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(h.top(4, tol=1e-10).values, exact.flip(0)[:4], rtol=1e-6, atol=0)
    # each block's operator is the diagonal block of the full Hessian
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    index = {n: i for i, n in enumerate(names)}
    g = torch.Generator().manual_seed(0)
    for block, members in h.operator.blocks.items():
        rows = torch.cat([torch.arange(offsets[index[names[i]]], offsets[index[names[i]] + 1]) for i in members])
        probe = torch.randn(len(rows), 2, generator=g, dtype=torch.float64)
        products = torch.stack([h.matvec(probe[:, j], block) for j in range(2)], dim=1)
        torch.testing.assert_close(products, H[rows][:, rows] @ probe, atol=1e-10, rtol=1e-8)


def test_trace_density_and_per_layer_on_mlp(tmp_path):
    model, batches = mlp(sizes=(6, 16, 4)), regression_batches(d_in=6, d_out=4)
    # trained a little, so the trace is not lost in the spread of an indefinite spectrum
    # (the moments' own standard errors are then well inside 5%)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        sum(F.mse_loss(model(x), y) for x, y in batches).backward()
        optimizer.step()
    H, sizes = explicit_hessian(model, F.mse_loss, batches)
    n = H.shape[0]
    h = sk.analyze.hessian(model, F.mse_loss, batches)
    exact_trace = float(H.trace())
    for seed in range(3):
        estimate = h.trace(probes=45, method="hutch++", seed=seed)
        assert abs(estimate.value - exact_trace) <= 3 * estimate.stderr
        plain = h.trace(probes=40, method="hutchinson", seed=seed)
        assert abs(plain.value - exact_trace) <= 3 * plain.stderr
    density = h.density(steps=40, probes=30, seed=0, method="slq")  # "auto" would take the exact path here
    assert density.method == "slq" and density.nodes.shape == (30, 10 + 40)  # 10 deflated pairs + 40 nodes
    grid, rho = density.grid, density.density
    assert float(torch.trapezoid(rho, grid)) == pytest.approx(1.0, abs=1e-6)
    first, second = float(torch.trapezoid(grid * rho, grid)), float(torch.trapezoid(grid**2 * rho, grid))
    assert first == pytest.approx(exact_trace / n, rel=0.05)
    assert second == pytest.approx(float(H.square().sum()) / n, rel=0.05)
    assert density.moment(1) == pytest.approx(first, rel=1e-6)
    assert abs(density.moment(1) - exact_trace / n) <= 4 * density.moment_stderr(1)
    # per-layer table: one row per Linear, exact top eigenvalue of each diagonal block
    table = h.per_layer(tol=1e-10, trace_probes=60)
    assert [row["name"] for row in table] == ["0", "2"]
    start = 0
    for row, (w, b) in zip(table, [(0, 1), (2, 3)]):
        stop = start + sizes[w] + sizes[b]
        block = H[start:stop, start:stop]
        assert row["top_eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-6)
        assert abs(row["trace"] - float(block.trace())) <= 3 * row["trace_stderr"] + 1e-9 * abs(float(block.trace()))
        start = stop
    table.to_csv(tmp_path / "h.csv")
    table.to_json(tmp_path / "h.json")
    frame = table.to_pandas()
    assert list(frame["name"]) == ["0", "2"] and (tmp_path / "h.csv").read_text().startswith("name,")


def density_moments_on_grid(density):
    grid, rho = density.grid, density.density
    return [float(torch.trapezoid(grid**p * rho, grid)) for p in range(3)]


def test_density_moments_on_untrained_indefinite_hessians():
    """Untrained: tr/n is small beside the spread, the case where a handful of probes miss by ~10%."""
    model, batches = mlp(sizes=(5, 8, 3)), regression_batches()
    H, _ = explicit_hessian(model, F.mse_loss, batches)
    n = H.shape[0]
    first, second = float(H.trace()) / n, float(H.square().sum()) / n
    assert float(torch.linalg.eigvalsh(H)[0]) < -0.1 * float(torch.linalg.eigvalsh(H)[-1])  # indefinite
    h = sk.analyze.hessian(model, F.mse_loss, batches)
    # defaults: n = 75 ≤ steps · probes = 480 products, so the n columns are cheaper than SLQ: exact
    density = h.density()
    assert density.method == "exact" and density.moment_stderr(1) == 0.0
    mass, m1, m2 = density_moments_on_grid(density)
    assert mass == pytest.approx(1.0, abs=1e-6)
    assert m1 == pytest.approx(first, rel=1e-6)
    assert m2 == pytest.approx(second + density.sigma**2, rel=1e-6)  # the smoothing adds σ² to the second
    torch.testing.assert_close(density.nodes[0], torch.linalg.eigvalsh(H), atol=1e-10, rtol=0)
    # SLQ: a complete orthonormal frame of the sampled space gives both moments exactly,
    # with and without the deflated pairs (Gauss quadrature is exact to degree 2·steps − 1)
    for deflate in (0, 7):
        full = h.density(steps=3, probes=n - deflate, deflate=deflate, method="slq")
        assert full.moment(1) == pytest.approx(first, rel=1e-9)
        assert full.moment(2) == pytest.approx(second, rel=1e-9)
        assert full.moment_stderr(1) == 0.0
    # fewer probes: unbiased, the error within 4 of its (without-replacement) standard errors
    for seed in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            partial = h.density(steps=15, probes=10, seed=seed, method="slq")
        mass, m1, _ = density_moments_on_grid(partial)
        assert mass == pytest.approx(1.0, abs=1e-6) and m1 == pytest.approx(partial.moment(1), rel=1e-9)
        assert abs(partial.moment(1) - first) <= 4 * partial.moment_stderr(1)
        assert abs(partial.moment(2) - second) <= 4 * partial.moment_stderr(2)
        noisy = partial.moment_stderr(1) > 0.05 * abs(partial.moment(1))
        assert noisy == any("first moment" in str(w.message) for w in caught)
    with pytest.raises(SpectrakitError, match="method="):
        h.density(method="dense")


def test_trace_density_and_ggn_on_tiny_transformer():
    model, ids = tiny_gpt2()
    names = [n for n, _ in model.named_parameters() if n.startswith("transformer.h.0.attn.")]

    def forward(call, batch):
        return lm_loss(call(input_ids=batch).logits, batch)

    with sdpa_kernel([SDPBackend.MATH]):
        H, _ = explicit_hessian(model, None, [ids], names, forward)
    n = H.shape[0]
    first, second = float(H.trace()) / n, float(H.square().sum()) / n
    h = sk.analyze.hessian(model, lm_loss, [ids], params="transformer.h.0.attn.*", forward=lm_forward)
    for seed in range(3):
        estimate = h.trace(probes=30, method="hutch++", seed=seed)
        assert abs(estimate.value - float(H.trace())) <= 3 * estimate.stderr
    density = h.density()
    assert density.method == "exact"
    mass, m1, m2 = density_moments_on_grid(density)
    assert mass == pytest.approx(1.0, abs=1e-6)
    assert m1 == pytest.approx(first, rel=0.05) and m2 == pytest.approx(second, rel=0.05)
    # SLQ with the default deflation: the outlying pairs taken exactly, the bulk sampled
    slq = h.density(steps=15, probes=8, method="slq")
    assert abs(slq.moment(1) - first) <= 4 * slq.moment_stderr(1)
    assert slq.moment(2) == pytest.approx(second, rel=0.05)
    # GGN = Jᵀ H_z J with J the Jacobian of all logits and H_z the loss Hessian in the logits
    loss, theta0, sizes = flat_loss(model, None, [ids], names, forward)
    named = dict(model.named_parameters())

    def logits(theta):
        params = dict(named)
        params.update({k: t.view(named[k].shape) for k, t in zip(names, theta.split(sizes))})
        return functional_call(model, params, (), {"input_ids": ids}).logits.reshape(-1)

    with sdpa_kernel([SDPBackend.MATH]):
        J = torch.autograd.functional.jacobian(logits, theta0)
        z = logits(theta0).detach()
        Hz = torch.autograd.functional.hessian(lambda o: lm_loss(o.view(*ids.shape, -1), ids), z)
    ggn = sk.analyze.hessian(model, lm_loss, [ids], params="transformer.h.0.attn.*", kind="ggn", forward=lm_forward)
    torch.testing.assert_close(operator_matrix(ggn), J.T @ Hz @ J, atol=1e-10, rtol=1e-8)


def test_ggn_equals_explicit_jthj_and_fisher_equals_gradient_outer_products():
    model = mlp(sizes=(4, 7, 3))
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
               for _ in range(2)]
    named = dict(model.named_parameters())
    names = list(named)
    sizes = [p.numel() for p in named.values()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def outputs(theta, x):
        params = {n: t.view(named[n].shape) for n, t in zip(names, theta.split(sizes))}
        return functional_call(model, params, (x,))

    G = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64)
    Fisher = torch.zeros_like(G)
    for x, y in batches:
        J = torch.autograd.functional.jacobian(lambda t, x=x: outputs(t, x), theta0).reshape(-1, theta0.numel())
        z = outputs(theta0, x).detach()
        Hz = torch.autograd.functional.hessian(lambda o, z=z, y=y: F.cross_entropy(o.view_as(z), y), z.reshape(-1))
        G += J.T @ Hz @ J / len(batches)
        per_example = torch.stack([torch.autograd.functional.jacobian(
            lambda t, x=x[i:i + 1], y=y[i:i + 1]: F.cross_entropy(outputs(t, x), y), theta0) for i in range(len(y))])
        Fisher += per_example.T @ per_example / len(y) / len(batches)
    ggn = sk.analyze.hessian(model, F.cross_entropy, batches, kind="ggn")
    torch.testing.assert_close(operator_matrix(ggn), G, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(ggn.top(3, tol=1e-10).values, torch.linalg.eigvalsh(G).flip(0)[:3], rtol=1e-6, atol=0)
    fisher = sk.analyze.hessian(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), batches, kind="fisher")
    torch.testing.assert_close(operator_matrix(fisher), Fisher, atol=1e-10, rtol=1e-8)


def test_alignment_equals_its_definition():
    model, batches = mlp(), regression_batches()
    H, _ = explicit_hessian(model, F.mse_loss, batches)
    loss, theta0, _ = flat_loss(model, F.mse_loss, batches)
    gradient = torch.autograd.functional.jacobian(loss, theta0)
    _, vectors = torch.linalg.eigh(H)
    top = vectors[:, -4:]
    expected = float((top.T @ gradient).square().sum() / gradient.square().sum())
    h = sk.analyze.hessian(model, F.mse_loss, batches)
    torch.testing.assert_close(h.gradient(), gradient, atol=1e-12, rtol=1e-10)
    assert h.alignment(k=4, tol=1e-10) == pytest.approx(expected, rel=1e-6)
    assert sk.analyze.gradient_alignment(gradient, top) == pytest.approx(expected, rel=1e-12)


def test_bad_input_gets_one_line():
    model, batches = mlp(), regression_batches()
    with pytest.raises(SpectrakitError, match="no batches"):
        sk.analyze.hessian(model, F.mse_loss, [])
    with pytest.raises(SpectrakitError, match="does not depend on the chosen parameters"):
        sk.analyze.hessian(model, lambda out, y: (y**2).mean(), batches)
    other = torch.nn.Linear(2, 2).double()
    with pytest.raises(SpectrakitError, match="does not depend on the chosen parameters"):
        sk.analyze.hessian(torch.nn.ModuleList([model, other]), F.mse_loss, batches, params="1.*",
                           forward=lambda m, b: (m[0](b[0]), b[1]))
    h = sk.analyze.hessian(model, F.mse_loss, batches)
    with pytest.raises(SpectrakitError, match="k=100 is larger than block '2'"):
        h.top(100, block="2")
    with pytest.raises(SpectrakitError, match="params: 'nope' matches no parameter"):
        sk.analyze.hessian(model, F.mse_loss, batches, params="nope")
    poisoned = mlp()
    with torch.no_grad():
        poisoned[0].weight[0, 0] = float("nan")  # the activations feeding block 2 turn NaN
    with pytest.raises(SpectrakitError, match="NaN/Inf in block '2'"):
        sk.analyze.hessian(poisoned, F.mse_loss, batches, params="2.*").top(1)
    dropout = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 3)).double()
    with pytest.raises(SpectrakitError, match="training mode with dropout"):
        sk.analyze.hessian(dropout, F.mse_loss, batches)
    with pytest.warns(UserWarning, match="eval mode and has dropout"):
        sk.analyze.hessian(dropout.eval(), F.mse_loss, batches)
    with pytest.raises(SpectrakitError, match="kind="):
        sk.analyze.hessian(model, F.mse_loss, batches, kind="laplace")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.analyze.hessian(model, F.mse_loss, batches)  # no dropout: no warning
    assert math.isfinite(h.trace(probes=6).value)
