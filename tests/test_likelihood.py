"""Tests of diffusers_vrfm.likelihood: closed-form Gaussian flows, Hutchinson, normalisation, the marginal over z,
gradients, bits per dimension, bad input, and the --quick likelihood benchmark."""

from __future__ import annotations

import collections
import importlib.util
import math
import os
import sys
import warnings

import pytest
import torch
from device_waits import DeviceWaits, count_host_reads
from torch import nn

from diffusers_vrfm import (
    VRFMLikelihoodOutput,
    VRFMMLPModel,
    VRFMPipeline,
    VRFMScheduler,
    VRFMVelocityOutput,
    log_likelihood,
)
from diffusers_vrfm.likelihood import (
    bits_per_dim_from_log_prob,
    exact_divergence,
    hutchinson_divergence,
    rademacher_probe,
    standard_normal_log_prob,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    path = os.path.join(REPO, "benchmarks", "likelihood_toy.py")
    spec = importlib.util.spec_from_file_location("likelihood_toy_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class AffineFlow(nn.Module):
    """The straight-line flow ``x_t = M_t x0 + t b`` with ``M_t = (1 - t) I + t A`` (``A`` symmetric positive
    definite), which pushes ``N(0, I)`` to ``N(b, A A^T)`` at ``t = 1``.

    Its velocity, written in ``x_t``: ``dx_t/dt = (A - I) x0 + b`` with ``x0 = M_t^{-1} (x_t - t b)``, so
    ``v(x, t) = (A - I) M_t^{-1} (x - t b) + b``; ``div v = tr((A - I) M_t^{-1}) = d/dt log det M_t``, whose integral
    over [0, 1] is ``log det A``. With a latent, ``b = b0 + W z``: then ``p(x | z) = N(b0 + W z, A A^T)`` and the
    marginal over ``z ~ N(0, I)`` is ``N(b0, A A^T + W W^T)``. Data of any `sample_shape` are flattened.
    """

    def __init__(self, A, b, W=None, sample_shape=None):
        super().__init__()
        self.register_buffer("A", torch.as_tensor(A, dtype=torch.float64))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float64))
        self.register_buffer("W", None if W is None else torch.as_tensor(W, dtype=torch.float64))
        self._sample_shape = tuple(sample_shape) if sample_shape is not None else (self.A.shape[0],)
        self.seen_labels = None

    @property
    def latent_dim(self):
        return 0 if self.W is None else self.W.shape[1]

    @property
    def sample_shape(self):
        return self._sample_shape

    @property
    def num_classes(self):
        return None

    def shift(self, z, batch_size):
        if self.W is None:
            assert z is None
            return self.b.expand(batch_size, -1)
        return self.b + z @ self.W.T

    def forward(self, sample, timestep, z=None, class_labels=None, return_dict=True):
        self.seen_labels = class_labels
        batch_size, dim = sample.shape[0], self.A.shape[0]
        x = sample.reshape(batch_size, dim)
        t = torch.as_tensor(timestep, dtype=x.dtype).expand(batch_size).reshape(-1, 1)
        shift = self.shift(z, batch_size)
        # M_t^{-1} = Q diag(1 / (1 - t + t lambda)) Q^T with A = Q diag(lambda) Q^T.
        eigenvalues, q = torch.linalg.eigh(self.A)
        y = ((x - t * shift) @ q / (1 - t + t * eigenvalues)) @ q.T
        velocity = y @ (self.A - torch.eye(dim, dtype=x.dtype)).T + shift
        return VRFMVelocityOutput(sample=velocity.reshape(sample.shape))

    def log_prob(self, x, z=None, marginal=False):
        """The closed-form log-density of the pushforward (given `z`, or the marginal over z)."""
        x = x.reshape(x.shape[0], -1).double()
        cov = self.A @ self.A.T
        if marginal:
            cov = cov + self.W @ self.W.T
            mean = self.b.expand_as(x)
        else:
            mean = self.shift(z, x.shape[0])
        return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)


A3 = [[1.6, 0.4, -0.2], [0.4, 0.9, 0.3], [-0.2, 0.3, 0.5]]  # symmetric positive definite, det = 0.535
B3 = [0.5, -1.0, 2.0]


@pytest.fixture
def affine3():
    return AffineFlow(A3, B3)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- closed-form Gaussian
@pytest.mark.parametrize(
    "solver, steps, tolerance",
    [("euler", 500, 5e-3), ("heun", 100, 2e-4), ("dopri5", None, 5e-5)],
)
def test_affine_flow_matches_closed_form_density(affine3, solver, steps, tolerance):
    x = torch.randn(64, 3, generator=gen(1), dtype=torch.float64) * 1.5 + torch.tensor(B3, dtype=torch.float64)
    kwargs = {"num_inference_steps": steps} if steps else {"rtol": 1e-9, "atol": 1e-9}
    out = log_likelihood(affine3, x, solver=solver, **kwargs)
    assert isinstance(out, VRFMLikelihoodOutput)
    expected = affine3.log_prob(x)
    error = (out.log_prob - expected).abs().max().item()
    assert error < tolerance, f"{solver}: max |log p - closed form| = {error:.2e}"
    # The sign: integral_0^1 div v dt = log det A (< 0 here, as det A = 0.535), and log p1 = log p0 - integral.
    log_det = torch.logdet(affine3.A).item()
    assert out.divergence_integral.shape == (1, 64)
    assert torch.allclose(out.divergence_integral, torch.full_like(out.divergence_integral, log_det), atol=tolerance)
    assert torch.allclose(out.log_prob, out.log_prob_source[0] - out.divergence_integral[0])
    # The backward integration reaches x0 = A^{-1} (x1 - b).
    x0 = torch.linalg.solve(affine3.A, (x - affine3.b).T).T
    assert torch.allclose(out.x0[0], x0, atol=50 * tolerance)
    if solver == "euler":
        assert out.num_function_evals == steps
    elif solver == "heun":
        assert out.num_function_evals == 2 * steps
    else:
        assert out.num_function_evals > 0


def test_euler_error_is_first_order(affine3):
    """Doubling the Euler steps halves the error of the log-density: the backward integration is consistent."""
    x = torch.randn(32, 3, generator=gen(1), dtype=torch.float64)
    errors = [
        (log_likelihood(affine3, x, solver="euler", num_inference_steps=n).log_prob - affine3.log_prob(x)).abs().max()
        for n in (100, 200)
    ]
    assert 1.7 < (errors[0] / errors[1]).item() < 2.3, errors


def test_the_seed_sign_would_be_wrong(affine3):
    """log p0(x0) + integral (the seed note's sign) differs from the closed form by 2 log det A."""
    x = torch.randn(16, 3, generator=gen(2), dtype=torch.float64)
    out = log_likelihood(affine3, x, num_inference_steps=100)
    wrong = out.log_prob_source[0] + out.divergence_integral[0]
    assert (wrong - affine3.log_prob(x)).abs().min() > 1.0
    assert torch.allclose(out.log_prob, affine3.log_prob(x), atol=1e-4)


def test_latent_model_given_z_is_the_conditional_density():
    model = AffineFlow([[0.6, 0.1], [0.1, 0.4]], [0.3, -0.2], W=[[1.5, 0.0, 0.2], [0.0, -1.0, 0.5]])
    x = torch.randn(32, 2, generator=gen(3), dtype=torch.float64)
    z = torch.randn(32, 3, generator=gen(4), dtype=torch.float64)
    out = log_likelihood(model, x, z=z, num_inference_steps=100, num_z_samples=50)
    assert out.log_prob_per_z.shape == (1, 32) and out.z.shape == (1, 32, 3)
    assert torch.allclose(out.log_prob, model.log_prob(x, z), atol=1e-4)
    # One z of shape (latent_dim,) is shared by every example.
    shared = log_likelihood(model, x, z=z[0], num_inference_steps=100)
    assert torch.allclose(shared.log_prob, model.log_prob(x, z[0].expand(32, -1)), atol=1e-4)


# ------------------------------------------------------------------------------------------------------- Hutchinson
def test_divergence_helpers_on_a_known_jacobian():
    x = torch.randn(5, 3, requires_grad=True)
    matrix = torch.tensor([[2.0, 1.0, 0.0], [0.5, -1.0, 3.0], [0.0, 4.0, 0.5]])
    output = x @ matrix.T + x.pow(2)  # Jacobian matrix + 2 diag(x): trace 1.5 + 2 sum(x)
    expected = 1.5 + 2 * x.detach().sum(dim=1)
    assert torch.allclose(exact_divergence(output, x), expected, atol=1e-5)
    probes = rademacher_probe((400, 5, 3), generator=gen(5))
    assert set(probes.unique().tolist()) == {-1.0, 1.0}
    estimates = torch.stack([hutchinson_divergence(x @ matrix.T + x.pow(2), x, p) for p in probes[:400]])
    standard_error = estimates.std(0) / math.sqrt(len(estimates))
    assert ((estimates.mean(0) - expected).abs() < 4 * standard_error).all()
    assert (estimates.std(0) > 1.0).all()  # single-probe estimates do vary


def test_exact_and_hutchinson_agree_on_average_over_probes(affine3):
    num_probes = 4000
    x = torch.tensor([[0.2, -0.7, 1.9]], dtype=torch.float64).expand(num_probes, 3).contiguous()
    exact = log_likelihood(affine3, x, num_inference_steps=20)
    hutch = log_likelihood(affine3, x, num_inference_steps=20, divergence="hutchinson", generator=gen(6))
    # The state does not depend on the probe; the divergence integral does, with mean equal to the exact one.
    assert torch.allclose(hutch.x0, exact.x0, atol=1e-12)
    estimates = hutch.divergence_integral[0]
    assert estimates.std() > 0.05
    standard_error = estimates.std().item() / math.sqrt(num_probes)
    gap = abs(estimates.mean().item() - exact.divergence_integral[0, 0].item())
    assert gap < 4 * standard_error, f"gap {gap:.4f} vs standard error {standard_error:.4f}"


def test_hutchinson_probe_is_held_fixed_along_the_trajectory(affine3):
    """For a linear field the Jacobian does not depend on x, so with one probe eps the Euler estimate must be exactly
    sum_n h eps^T J(t_n) eps; a probe redrawn at every step would give something else."""
    steps, batch = 8, 6
    x = torch.randn(batch, 3, generator=gen(7), dtype=torch.float64)
    out = log_likelihood(
        affine3, x, solver="euler", num_inference_steps=steps, divergence="hutchinson", generator=gen(8)
    )
    probe = rademacher_probe((batch, 3), generator=gen(8), dtype=torch.float64)  # the first draw of the generator
    eye = torch.eye(3, dtype=torch.float64)
    expected = torch.zeros(batch, dtype=torch.float64)
    for n in range(steps):
        t = 1 - n / steps
        jacobian = (affine3.A - eye) @ torch.linalg.inv((1 - t) * eye + t * affine3.A)
        expected += (1 / steps) * torch.einsum("bi,ij,bj->b", probe, jacobian, probe)
    assert torch.allclose(out.divergence_integral[0], expected, atol=1e-10)


# ------------------------------------------------------------------------------------------ a trained 2D model
@pytest.fixture(scope="module")
def trained_models():
    benchmark = load_benchmark()
    config = benchmark.BenchmarkConfig(
        train_steps=300, batch_size=256, hidden_dim=32, lr=2e-3, num_test=0, z_counts=(1,), heun_steps=0,
        dopri_check=False,
    )  # fmt: skip
    rf, _, _ = benchmark.train_model("gaussian_8gaussians", 0, 0.0, config)
    vrfm, _, _ = benchmark.train_model("gaussian_8gaussians", 4, 1.0, config)
    return rf, vrfm


def test_trained_2d_density_integrates_to_one(trained_models):
    """Riemann sum over [-10, 10]^2 (step 0.2) of exp(log p): about 1 to within 0.02, for RF and for VRFM given z."""
    rf, vrfm = trained_models
    axis = torch.linspace(-10, 10, 101)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    cell = (axis[1] - axis[0]).item() ** 2
    z = torch.randn(4, generator=gen(9))
    for model, kwargs in ((rf, {}), (vrfm, {"z": z})):
        out = log_likelihood(model, grid, num_inference_steps=16, **kwargs)
        mass = out.log_prob.double().exp().sum().item() * cell
        assert abs(mass - 1) < 0.02, f"{type(model).__name__} latent_dim={model.latent_dim}: mass {mass:.4f}"
    # The trained flow is not the identity: its density differs from the source's.
    assert (out.log_prob - standard_normal_log_prob(grid)).abs().max() > 1.0


def test_gradients_flow_when_asked(affine3, trained_models):
    x = torch.randn(8, 3, generator=gen(10), dtype=torch.float64).requires_grad_(True)
    out = log_likelihood(affine3, x, num_inference_steps=50, enable_grad=True)
    (grad,) = torch.autograd.grad(out.log_prob.sum(), x)
    sigma = affine3.A @ affine3.A.T
    expected = -torch.linalg.solve(sigma, (x.detach() - affine3.b).T).T  # grad of log N(x; b, Sigma)
    assert torch.allclose(grad, expected, atol=1e-3)
    # dopri5 and Hutchinson are differentiable too (for a linear field Hutchinson does not change the x-gradient).
    for kwargs in (
        {"solver": "dopri5", "rtol": 1e-8, "atol": 1e-8},
        {"divergence": "hutchinson", "generator": gen(11)},
    ):
        out = log_likelihood(affine3, x, enable_grad=True, num_inference_steps=50, **kwargs)
        (grad,) = torch.autograd.grad(out.log_prob.sum(), x)
        assert torch.allclose(grad, expected, atol=1e-3), kwargs
    # Without enable_grad nothing is tracked.
    out = log_likelihood(affine3, x, num_inference_steps=5)
    assert out.log_prob.grad_fn is None and not out.log_prob.requires_grad
    # Parameters of a trained network receive gradients (maximum-likelihood fine-tuning is possible).
    _, vrfm = trained_models
    vrfm.zero_grad()
    out = log_likelihood(vrfm, torch.randn(16, 2), num_z_samples=2, num_inference_steps=4, enable_grad=True)
    out.log_prob.mean().backward()
    grads = [p.grad for p in vrfm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    vrfm.zero_grad()


# ----------------------------------------------------------------------------------------------- the marginal over z
def test_marginal_estimate_is_non_decreasing_in_k_and_tends_to_the_marginal():
    model = AffineFlow([[0.5, 0.1], [0.1, 0.4]], [0.0, 0.0], W=[[1.2, 0.0], [0.3, 0.9]])
    x = torch.randn(100, 2, generator=gen(12), dtype=torch.float64) * 1.3
    true_marginal = model.log_prob(x, marginal=True).mean().item()
    means = {}
    for k in (1, 4, 16, 64):
        estimates = [
            log_likelihood(model, x, num_z_samples=k, num_inference_steps=10, generator=gen(100 * k + r)).log_prob
            for r in range(8)
        ]
        means[k] = torch.stack(estimates).mean().item()
    values = [means[k] for k in (1, 4, 16, 64)]
    assert all(a < b for a, b in zip(values, values[1:])), means
    assert values[-1] < true_marginal + 0.02  # a lower bound in expectation ...
    assert true_marginal - values[-1] < 0.25 * (true_marginal - values[0])  # ... that tightens with K


def test_marginal_parts_and_chunking_are_consistent():
    model = AffineFlow([[0.5, 0.1], [0.1, 0.4]], [0.2, 0.0], W=[[1.0, 0.0], [0.0, 1.0]])
    x = torch.randn(10, 2, generator=gen(13), dtype=torch.float64)
    out = log_likelihood(model, x, num_z_samples=7, num_inference_steps=50, generator=gen(14))
    assert out.log_prob_per_z.shape == (7, 10) and out.z.shape == (7, 10, 2)
    assert torch.allclose(out.log_prob, torch.logsumexp(out.log_prob_per_z, 0) - math.log(7))
    for k in range(7):
        assert torch.allclose(out.log_prob_per_z[k], model.log_prob(x, out.z[k]), atol=5e-4)
    chunked = log_likelihood(model, x, num_z_samples=7, num_inference_steps=50, generator=gen(14), z_chunk_size=3)
    assert torch.allclose(chunked.log_prob, out.log_prob, atol=1e-12)
    assert chunked.num_function_evals == 3 * out.num_function_evals  # three batched solves instead of one


def test_plain_rf_ignores_num_z_samples(affine3):
    x = torch.randn(4, 3, generator=gen(15), dtype=torch.float64)
    a = log_likelihood(affine3, x, num_z_samples=1, num_inference_steps=10)
    b = log_likelihood(affine3, x, num_z_samples=32, num_inference_steps=10)
    assert a.z is None and b.log_prob_per_z.shape == (1, 4)
    assert torch.equal(a.log_prob, b.log_prob)


# -------------------------------------------------------------------------------------------------- bits per dim
def test_bits_per_dim_offset_normalises_the_discrete_distribution():
    """With bins of width 2/255 around x_k = k / 127.5 - 1, sum_k 2^(-D * bpd_k) = sum_k p(x_k) * 2/255 ~ 1 (D = 1).
    The 2/256 offset would give 255/256 of that, off by 0.4%."""
    model = AffineFlow([[0.25]], [0.1])
    pixels = torch.arange(256, dtype=torch.float64).reshape(-1, 1) / 127.5 - 1
    out = log_likelihood(model, pixels, num_inference_steps=200, compute_bits_per_dim=True, dequantize_input=False)
    total = torch.exp2(-out.bits_per_dim).sum().item()
    assert abs(total - 1) < 1.5e-3, total
    assert torch.allclose(out.bits_per_dim, bits_per_dim_from_log_prob(out.log_prob, 1, 2 / 255))
    assert torch.allclose(out.bits_per_dim, -out.log_prob / math.log(2) + math.log2(127.5))


def test_image_models_get_dequantised_bits_per_dim():
    shape = (1, 2, 2)
    identity = AffineFlow(torch.eye(4), torch.zeros(4), sample_shape=shape)  # v = 0: x0 is the dequantised input
    pixels = torch.randint(0, 256, (8, *shape), generator=gen(16)).double() / 127.5 - 1
    out = log_likelihood(identity, pixels, num_inference_steps=2, generator=gen(17))
    offset = out.x0[0] - pixels
    assert offset.abs().max() <= 1 / 255 + 1e-12 and offset.abs().max() > 0.5 / 255
    assert out.bits_per_dim.shape == (8,)
    assert torch.allclose(out.bits_per_dim, -(out.log_prob + 4 * math.log(2 / 255)) / (4 * math.log(2)))
    vectors = log_likelihood(AffineFlow(torch.eye(4), torch.zeros(4)), pixels.reshape(8, 4), num_inference_steps=2)
    assert vectors.bits_per_dim is None and torch.equal(vectors.x0[0], pixels.reshape(8, 4))


# --------------------------------------------------------------------------------- labels, pipeline, real models
def test_class_labels_reach_the_model(affine3):
    x = torch.randn(3, 3, dtype=torch.float64)
    log_likelihood(affine3, x, num_inference_steps=1, class_labels=[0, 2, 1])
    assert affine3.seen_labels.tolist() == [0, 2, 1]


class ContextAffineFlow(AffineFlow):
    """`AffineFlow` whose shift also adds each example's `context` row (a stand-in for a text model's inputs): then
    ``p(x | z, context) = N(b + W z + context, A A^T)``."""

    def forward(self, sample, timestep, z=None, context=None, return_dict=True):
        self.context = context
        return super().forward(sample, timestep, z=z)

    def shift(self, z, batch_size):
        return super().shift(z, batch_size) + self.context


def test_model_kwargs_reach_the_model_row_by_row_for_every_draw():
    model = ContextAffineFlow(A3, B3, W=[[0.5], [0.0], [-0.3]])
    x = torch.randn(4, 3, generator=gen(30), dtype=torch.float64)
    context = torch.randn(4, 3, generator=gen(31), dtype=torch.float64)
    ode = {"num_inference_steps": 100, "solver": "heun"}
    out = log_likelihood(model, x, num_z_samples=3, model_kwargs={"context": context}, generator=gen(32), **ode)
    cov = model.A @ model.A.T
    for k in range(3):  # each draw of z reads its example's context row
        mean = model.b + out.z[k] @ model.W.T + context
        expected = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)
        assert torch.allclose(out.log_prob_per_z[k], expected, atol=2e-4)
    with pytest.raises(
        ValueError,
        match=r"`model_kwargs\['context'\]` must be a tensor with one row per example \(4\), but got \(3, 3\)",
    ):
        log_likelihood(model, x, num_z_samples=1, model_kwargs={"context": context[:3]}, **ode)
    with pytest.raises(ValueError, match="must not hold 'z'"):
        log_likelihood(model, x, num_z_samples=1, model_kwargs={"z": context}, **ode)
    with pytest.raises(TypeError, match="`model_kwargs` must be a dict of tensors, but got list"):
        log_likelihood(model, x, num_z_samples=1, model_kwargs=[context], **ode)


def test_class_conditional_model_with_several_z_draws():
    model = VRFMMLPModel(sample_size=2, latent_dim=2, hidden_dim=16, num_classes=3).eval()
    torch.nn.init.normal_(model.class_embedding.weight, std=1.0)  # make the labels matter
    x = torch.randn(4, 2, generator=gen(20))
    labelled = log_likelihood(
        model, x, num_z_samples=3, num_inference_steps=2, class_labels=[0, 1, 2, 0], generator=gen(21)
    )
    null = log_likelihood(model, x, num_z_samples=3, num_inference_steps=2, class_labels=3, generator=gen(21))
    assert labelled.log_prob_per_z.shape == (3, 4) and torch.isfinite(labelled.log_prob).all()
    assert not torch.allclose(labelled.log_prob, null.log_prob)


def test_pipeline_method_delegates():
    model = VRFMMLPModel(sample_size=2, latent_dim=3, hidden_dim=16).eval()
    pipe = VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler())
    x = torch.randn(5, 2, generator=gen(18))
    direct = log_likelihood(model, x, num_z_samples=4, num_inference_steps=3, generator=gen(19))
    via_pipe = pipe.log_likelihood(x, num_z_samples=4, num_inference_steps=3, generator=gen(19))
    assert torch.equal(direct.log_prob, via_pipe.log_prob)
    assert via_pipe.num_function_evals == 6 and via_pipe.bits_per_dim is None


def test_dopri5_without_torchdiffeq_names_the_extra(affine3, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    with pytest.raises(ImportError, match=r"`ode` extra"):
        log_likelihood(affine3, torch.zeros(1, 3, dtype=torch.float64), solver="dopri5")


# ---------------------------------------------------------------------------------------------------- bad input
class NotAVelocityModel(nn.Module):
    def forward(self, sample, timestep, z=None, class_labels=None):
        return VRFMVelocityOutput(sample=sample)


@pytest.mark.parametrize(
    "change, error, name",
    [
        ({"x": torch.zeros(2, 3)}, ValueError, "`x`"),
        ({"x": torch.zeros(2)}, ValueError, "`x`"),
        ({"x": torch.zeros(0, 2)}, ValueError, "`x`"),
        ({"x": torch.tensor([[0.0, float("nan")]])}, ValueError, "`x`"),
        ({"x": torch.tensor([[0.0, float("inf")]])}, ValueError, "`x`"),
        ({"x": torch.zeros(2, 2, dtype=torch.long)}, TypeError, "`x`"),
        ({"x": [[0.0, 0.0]]}, TypeError, "`x`"),
        ({"z": torch.zeros(2, 5)}, ValueError, "`z`"),
        ({"z": torch.full((2, 3), float("nan"))}, ValueError, "`z`"),
        ({"z": [0.0, 0.0, 0.0]}, TypeError, "`z`"),
        ({"num_z_samples": 0}, ValueError, "`num_z_samples`"),
        ({"num_z_samples": 2.0}, TypeError, "`num_z_samples`"),
        ({"num_z_samples": True}, TypeError, "`num_z_samples`"),
        ({"divergence": "trace"}, ValueError, "`divergence`"),
        ({"solver": "rk4"}, ValueError, "`solver`"),
        ({"num_inference_steps": 0}, ValueError, "`num_inference_steps`"),
        ({"num_inference_steps": 2.5}, TypeError, "`num_inference_steps`"),
        ({"solver": "dopri5", "rtol": -1.0}, ValueError, "`rtol`"),
        ({"generator": 0}, TypeError, "`generator`"),
        ({"enable_grad": "yes"}, TypeError, "`enable_grad`"),
        ({"z_chunk_size": 0}, ValueError, "`z_chunk_size`"),
        ({"compute_bits_per_dim": True, "bin_width": 0.0}, ValueError, "`bin_width`"),
        ({"source_log_prob": "normal"}, TypeError, "`source_log_prob`"),
        ({"source_log_prob": lambda x: x}, ValueError, "`source_log_prob`"),
        ({"class_labels": [0, 1, 2]}, ValueError, "`class_labels`"),
    ],
)
def test_bad_input_is_refused(change, error, name):
    model = VRFMMLPModel(sample_size=2, latent_dim=3, hidden_dim=8).eval()
    kwargs = {"x": torch.zeros(2, 2), "num_inference_steps": 1, **change}
    with pytest.raises(error, match=name):
        log_likelihood(model, **kwargs)


def test_z_for_a_plain_rf_model_and_non_models_are_refused():
    rf = VRFMMLPModel(sample_size=2, latent_dim=0, hidden_dim=8)
    with pytest.raises(ValueError, match="`z`.*latent_dim=0"):
        log_likelihood(rf, torch.zeros(2, 2), z=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="`velocity_model`"):
        log_likelihood(NotAVelocityModel(), torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------------------ benchmark
def test_quick_benchmark_writes_a_well_formed_table(tmp_path):
    benchmark = load_benchmark()
    output = tmp_path / "likelihood_toy.md"
    table = benchmark.main(["--quick", "--output", str(output)])
    assert output.read_text() == table
    lines = table.splitlines()
    header = lines.index("| task | method | parameters | test NLL (nats) | NFE |")
    assert lines[header + 1] == "|---|---|---|---|---|"
    rows = [line for line in lines[header + 2 :] if line.startswith("|")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    assert all(len(row) == 5 for row in cells)
    assert {row[0] for row in cells} == set(benchmark.TASKS)
    for task in benchmark.TASKS:
        methods = [row[1] for row in cells if row[0] == task]
        assert "RF" in methods
        for kind in ("VRFM beta=", "VRFM defaults (", "VRFM defaults, importance"):  # paper's settings, defaults
            rows_of_kind = [method for method in methods if method.startswith(kind) and "K=" in method]
            assert len(rows_of_kind) == len(benchmark.QUICK.z_counts)
    for row in cells:
        mean, error = (float(part) for part in row[3].split("+-"))
        assert math.isfinite(mean) and error >= 0


# ------------------------------------------------------------------------------------- non-finite values (issue 17)
def _nan_model(latent_dim=0):
    model = VRFMMLPModel(sample_size=2, latent_dim=latent_dim).eval()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    return model


@pytest.mark.parametrize("solver", ["euler", "heun", "dopri5"])
def test_nan_weights_give_a_clear_integration_error(solver):
    if solver == "dopri5":
        pytest.importorskip("torchdiffeq")
    with pytest.raises(ValueError, match=r"velocity is not finite \(NaN or inf\) at t=1 of the backward integration"):
        log_likelihood(_nan_model(), torch.randn(3, 2), num_inference_steps=4, solver=solver)


class _BlowsUpEarly(nn.Module):
    """A finite velocity for t >= 0.5 and NaN below: the backward integration meets the NaN halfway."""

    latent_dim = 0
    sample_shape = (2,)

    def forward(self, sample, t, z=None):
        late = (t >= 0.5).reshape(-1, 1)
        return VRFMVelocityOutput(sample=torch.where(late, sample, torch.full_like(sample, float("nan"))))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_a_field_that_turns_non_finite_midway_is_named_at_its_time(solver):
    # checked once, after the loop: the error still names the first time the field was not finite
    with pytest.raises(ValueError, match=r"velocity is not finite \(NaN or inf\) at t=0.25 of the backward"):
        log_likelihood(_BlowsUpEarly(), torch.randn(3, 2), num_inference_steps=4, solver=solver)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_the_backward_integration_makes_the_host_wait_for_nothing_per_step(divergence, monkeypatch):
    model = VRFMMLPModel(sample_size=2, latent_dim=3, hidden_dim=8, num_classes=2).eval()
    x = torch.randn(4, 2, generator=gen(3))
    waits = []
    count_host_reads(monkeypatch, waits)  # what reads host memory without an operator
    per_call = {}
    for steps in (1, 2, 8):  # the first call, uncounted, does once-per-process work (diffusers' lazy imports)
        waits.clear()
        with DeviceWaits(waits, {"on": True}):
            log_likelihood(
                model, x, num_z_samples=2, num_inference_steps=steps, divergence=divergence, class_labels=[0, 1, 1, 0],
                generator=gen(4),
            )  # fmt: skip
        per_call[steps] = collections.Counter(waits)
    # the input checks, the first evaluation's checks of the model's inputs and the one check of the field: the same
    # for 2 steps (4 evaluations) as for 8 (16), so on a GPU the solver queues its steps without waiting for them
    assert per_call[2] == per_call[8], per_call
    assert 0 < sum(per_call[8].values()) < 15, per_call


def test_labels_out_of_range_are_still_refused_by_the_first_evaluation():
    model = VRFMMLPModel(sample_size=2, latent_dim=0, hidden_dim=8, num_classes=2).eval()
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 2\]"):
        log_likelihood(model, torch.zeros(2, 2), num_inference_steps=3, class_labels=[0, 7])


def test_source_log_prob_returning_nan_is_refused():
    model = VRFMMLPModel(sample_size=2, latent_dim=0).eval()

    def broken(x):
        return torch.full((x.shape[0],), float("nan"))

    with pytest.raises(ValueError, match=r"`source_log_prob` returned NaN or \+inf for 3 of 3 source points"):
        log_likelihood(model, torch.randn(3, 2), num_inference_steps=2, source_log_prob=broken)
    # -inf (a point outside the source's support) is a valid log-density: it gives log p = -inf, no error
    outside = log_likelihood(
        model, torch.randn(3, 2), num_inference_steps=2, source_log_prob=lambda x: torch.full((len(x),), -math.inf)
    )
    assert torch.isneginf(outside.log_prob).all()


class _SharpeningFlow(nn.Module):
    """v(x, t) = -8 t^3 x on 1x2x2 images: the exact integral of -div v is 2 per dimension, but one backward Euler step
    evaluates only t = 1 and adds 8 per dimension, a density no 8-bit bin can hold."""

    latent_dim = 0
    sample_shape = (1, 2, 2)

    def forward(self, sample, t, z=None):
        return VRFMVelocityOutput(sample=-8.0 * t.reshape(-1, 1, 1, 1) ** 3 * sample)


def test_negative_bits_per_dim_from_too_few_steps_warns():
    x = torch.zeros(2, 1, 2, 2)
    with pytest.warns(UserWarning, match=r"2 of 2 bits-per-dimension estimates are negative.*num_inference_steps=1"):
        few = log_likelihood(_SharpeningFlow(), x, num_inference_steps=1, solver="euler", dequantize_input=False)
    assert (few.bits_per_dim < 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning once the integral is accurate
        many = log_likelihood(_SharpeningFlow(), x, num_inference_steps=200, solver="heun", dequantize_input=False)
    assert (many.bits_per_dim > 0).all()
    expected_log_prob = 4 * (2.0 - 0.5 * math.log(2 * math.pi))  # log N(0; 0, I) + integral of -div v over 4 dims
    assert many.log_prob == pytest.approx(torch.full((2,), expected_log_prob), abs=1e-3)
