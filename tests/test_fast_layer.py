"""What the scripts run is the method as svdiff.py writes it: FastSpectralShift (support/fast_layer.py: the cheaper of
two paths per call, W dropped where never read) and the fast SVD (support/fast_svd.py) give svdiff.SpectralShift's
outputs and gradients, on every kind of layer and on a whole model."""
import copy

import pytest
import torch
import torch.nn as nn

import sd
import svdiff
import tiny
from support import fast_layer, fast_svd

KINDS = {
    "linear-few-tokens": (lambda: nn.Linear(48, 32), (3, 7, 48), None),
    "linear-many-tokens": (lambda: nn.Linear(32, 96), (600, 32), None),
    "conv3x3": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 6, 6), None),
    "conv1x1": (lambda: nn.Conv2d(16, 8, 1), (2, 16, 5, 5), None),
    "conv-stride2": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1), (2, 8, 9, 9), None),
    "linear-rank-4": (lambda: nn.Linear(24, 16), (5, 24), 4),
    "conv3x3-rank-3": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 6, 6), 3),
    "embedding": (lambda: nn.Embedding(50, 12), "ids", None),
    "groupnorm": (lambda: nn.GroupNorm(4, 8), (2, 8, 3, 3), None),
    "layernorm": (lambda: nn.LayerNorm(8), (2, 5, 8), None),
}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def pair(kind, dtype, seed=0):
    """The readable layer and the fast one on copies of one random module, with the same random δ."""
    make, shape, rank = KINDS[kind]
    torch.manual_seed(seed)
    base = make().to(dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.normal_()  # (a norm's default γ = 1 would hide γ · δ mistaken for γ + δ)
    readable = svdiff.SpectralShift(base, rank=rank)
    fast = fast_layer.FastSpectralShift(copy.deepcopy(base), rank=rank)
    with torch.no_grad():
        scale = readable.sigma.mean() if readable.kind != "norm" else 0.3
        readable.delta.copy_(torch.randn(readable.delta.shape) * scale)
        fast.delta.copy_(readable.delta)
    x = torch.randint(0, 50, (2, 7)) if shape == "ids" else torch.randn(shape, dtype=dtype)
    return readable, fast, x


def outputs_and_gradients(layer, x):
    """The output, and the gradients of δ and of the input under one fixed random projection of the output."""
    layer.delta.grad = None
    x = x.clone().requires_grad_(x.is_floating_point())
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return y.detach(), layer.delta.grad.clone(), None if x.grad is None else x.grad.clone()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", fast_layer.MODES)
def test_the_fast_layer_gives_the_readable_layers_outputs_and_gradients(kind, mode):
    """In float64 (so that what is compared is the algebra, not float32's rounding): ≤ 1e-6 relative, every mode."""
    readable, fast, x = pair(kind, torch.float64)
    fast.mode = mode
    for ours, theirs in zip(outputs_and_gradients(fast, x), outputs_and_gradients(readable, x)):
        if theirs is not None:
            assert rel(ours, theirs) <= 1e-6, (kind, mode, rel(ours, theirs))


@pytest.mark.parametrize("kind", ["linear-many-tokens", "conv3x3", "linear-rank-4"])
def test_in_float32_the_two_agree_to_its_rounding(kind):
    readable, fast, x = pair(kind, torch.float32)
    for ours, theirs in zip(outputs_and_gradients(fast, x), outputs_and_gradients(readable, x)):
        assert rel(ours, theirs) <= 1e-5, kind


def test_a_dropped_weight_changes_no_output_or_gradient():
    readable, fast, x = pair("conv3x3", torch.float64)
    assert fast.factored_always()
    fast.drop_weight()
    assert fast.dropped
    for ours, theirs in zip(outputs_and_gradients(fast, x), outputs_and_gradients(readable, x)):
        assert rel(ours, theirs) <= 1e-6


@pytest.mark.parametrize("shape", [(32, 48), (96, 32), (16, 72)])
def test_the_fast_svd_gives_the_readable_svds_factors(shape):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (U1, S1, V1), (U2, S2, V2) = svdiff.svd(W), fast_svd.svd(W)
    assert (S1 - S2).abs().max() <= 1e-12 * S1[0]
    assert rel((U2 * S2) @ V2.T, (U1 * S1) @ V1.T) <= 1e-12
    # the singular vectors themselves, up to each one's sign (σ here are distinct)
    signs = torch.sign((U1 * U2).sum(0))
    assert rel(U2 * signs, U1) <= 1e-9 and rel(V2 * signs, V1) <= 1e-9


def test_a_whole_model_trains_the_same_through_either_path(tmp_path):
    """The tiny SD1 model with every weight shifted (`all`), the same δ: the scripts' model (fast SVD, fast layers,
    dropped weights) and svdiff.py's give the same prediction and the same gradients of every δ."""
    tiny.write_ours(tmp_path / "model.safetensors")
    models = [sd.load(tmp_path / "model.safetensors", dtype=torch.float64) for _ in range(2)]
    svdiff.add_spectral_shifts(models[0], "all", progress=False)
    fast_layer.add_spectral_shifts(models[1], "all", progress=False)
    assert fast_layer.drop_weights(models[1]) > 0
    g = torch.Generator().manual_seed(0)
    deltas = {name: torch.randn(m.delta.shape, generator=g, dtype=torch.float64) * 0.1
              for name, m in svdiff.shifts(models[0])}
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 500])
    results = []
    for model in models:
        with torch.no_grad():
            for name, m in svdiff.shifts(model):
                m.delta.copy_(deltas[name] * (m.sigma.mean() if m.kind != "norm" else 1))
        cond = sd.encode_prompts(model, ["a photo of sks dog"] * 2)
        y = model.unet(x, t, cond.context)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        results.append((y.detach(), {name: m.delta.grad for name, m in svdiff.shifts(model)}))
    (y0, g0), (y1, g1) = results
    assert rel(y1, y0) <= 1e-6
    # All gradients as one vector: the UNet's GroupNorm takes its statistics in fp32 even in a float64 model (SD's
    # GroupNorm32), so a layer whose gradient is at that rounding's level (the time embeddings', 1e-9 here) differs
    # by as much as it is, in either path
    assert g0.keys() == g1.keys()
    assert rel(torch.cat([g1[k] for k in g0]), torch.cat([g0[k] for k in g0])) <= 1e-6
