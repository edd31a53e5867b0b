"""svdiff.py: Eq. 2 in all its forms agrees, shifts files are portable, and the counts are the paper's."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import clip_text
import sd
import shifts
import svdiff
import tiny
from support import fast_layer, fast_svd, fingerprint, loading, shift_files, svd_cache
import unet as unet_lib

LAYERS = {
    "linear-few-tokens": (lambda: nn.Linear(48, 32), (3, 7, 48)),
    "linear-many-tokens": (lambda: nn.Linear(32, 96), (600, 32)),
    "conv3x3": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 6, 6)),
    "conv1x1": (lambda: nn.Conv2d(16, 8, 1), (2, 16, 5, 5)),
    "conv-stride2": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1), (2, 8, 9, 9)),
}


def shifted(make, seed=0):
    torch.manual_seed(seed)
    base = make().requires_grad_(False)
    return base, fast_layer.FastSpectralShift(base)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", list(LAYERS))
def test_zero_shift_is_the_identity(name):
    make, shape = LAYERS[name]
    base, layer = shifted(make)
    x = torch.randn(shape)
    layer.mode = "dense"
    assert torch.equal(layer(x), base(x))  # bit-exact: W + 0
    layer.mode = "factored"
    assert rel(layer(x), base(x)) <= 1e-6  # the SVD's rounding only


@pytest.mark.parametrize("name", list(LAYERS))
def test_fast_paths_equal_the_naive_formula_in_values_and_gradients(name):
    make, shape = LAYERS[name]
    _, layer = shifted(make)
    x = torch.randn(shape)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(layer.delta.shape) * layer.sigma)
    results = {}
    for mode in ("naive", "dense", "factored", "auto"):
        layer.mode = mode
        layer.delta.grad = None
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results[mode] = (y.detach(), layer.delta.grad.clone())
    for mode in ("dense", "factored", "auto"):
        assert rel(results[mode][0], results["naive"][0]) <= 1e-5, mode
        assert rel(results[mode][1], results["naive"][1]) <= 1e-5, mode


def test_auto_picks_factored_for_convs_and_dense_for_square_layers_with_many_tokens():
    _, conv = shifted(LAYERS["conv3x3"][0])
    assert conv.cheapest(torch.randn(2, 8, 6, 6)) == "factored"
    _, square = shifted(lambda: nn.Linear(64, 64))
    # square: dense 3·T·n² + 2·n³ vs factored 4·T·n², so dense wins once T > 2n
    assert square.cheapest(torch.randn(1, 2, 64)) == "factored"
    assert square.cheapest(torch.randn(1, 200, 64)) == "dense"


def test_relu_clamps_singular_values_pushed_below_zero():
    base, layer = shifted(lambda: nn.Linear(6, 6))
    with torch.no_grad():
        layer.delta.copy_(-2 * layer.sigma)  # every σ + δ < 0 -> all singular values 0
    assert layer.naive_weight().abs().max() <= 1e-6
    assert (base.weight + layer.delta_weight()).abs().max() <= 1e-5
    with torch.no_grad():
        layer.delta.copy_(torch.tensor([-10.0, 0, 0, 0, 0, 0.5]))
    s = torch.linalg.svdvals((base.weight + layer.delta_weight()).double())
    expected = torch.cat([layer.sigma[1:5], layer.sigma[5:] + 0.5, torch.zeros(1)]).double().sort(descending=True).values
    assert torch.allclose(s, expected, atol=1e-5)


@pytest.mark.parametrize("norm", [nn.GroupNorm(4, 8), nn.LayerNorm(8)])
def test_norm_scale_gets_a_full_length_additive_shift(norm):
    with torch.no_grad():
        norm.weight.normal_()  # not the default γ = 1, on which γ·(1 + δ) equals γ + δ
    layer = fast_layer.FastSpectralShift(norm.requires_grad_(False))
    assert layer.delta.shape == (8,)
    x = torch.randn(2, 8, 3, 3) if isinstance(norm, nn.GroupNorm) else torch.randn(2, 5, 8)
    assert torch.allclose(layer(x), norm(x), atol=1e-6)
    d = torch.randn(8)
    import copy
    shifted_norm = copy.deepcopy(norm)
    with torch.no_grad():
        layer.delta.copy_(d)
        shifted_norm.weight.add_(d)
    assert torch.allclose(layer(x), shifted_norm(x), atol=1e-6)


def test_embedding_shift_equals_the_shifted_table():
    base = nn.Embedding(50, 12).requires_grad_(False)
    layer = fast_layer.FastSpectralShift(base)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(12))
    ids = torch.randint(0, 50, (2, 7))
    assert rel(layer(ids), layer.naive_weight()[ids]) <= 1e-5


def test_rank_limit_shifts_only_the_largest_singular_values():
    base, _ = shifted(lambda: nn.Linear(24, 16))
    layer = fast_layer.FastSpectralShift(base, rank=4)
    assert layer.delta.shape == (4,)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(4))
    x = torch.randn(5, 24)
    layer.mode = "dense"
    y_dense = layer(x)
    layer.mode = "factored"
    assert rel(layer(x), y_dense) <= 1e-5
    layer.mode = "naive"  # (the rest of W is not in the k factors: naive keeps it)
    assert rel(layer(x), y_dense) <= 1e-5
    full = fast_layer.FastSpectralShift(base)
    with torch.no_grad():
        full.delta.zero_()
        full.delta[:4] = layer.delta
    full.mode = "naive"
    assert rel(full(x), y_dense) <= 1e-5


def test_merging_twice_is_merging_once_and_unmerge_brings_the_live_shift_back():
    make, shape = LAYERS["linear-few-tokens"]
    base, layer = shifted(make)
    W, x = base.weight.clone(), torch.randn(shape)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(layer.delta.shape) * layer.sigma)
        y = layer(x)
        layer.merge()
        layer.merge()  # a no-op: ΔW is not added twice
        assert rel(layer(x), y) <= 1e-5
        layer.unmerge()
        assert torch.equal(base.weight, W)
        assert rel(layer(x), y) <= 1e-5  # W back, and the layer computes W_δ from δ again
        layer.delta.zero_()
        assert rel(layer(x), base(x)) <= 1e-6


def test_rank_limited_layers_keep_the_weight_they_read(tmp_path, bpe_vocab):
    """With --rank k a layer computes W x plus the shift of its k largest σ: it reads W at any token count, so
    drop_weights frees none of it."""
    model = tiny_model(tmp_path, bpe_vocab)
    fast_layer.add_spectral_shifts(model, rank=2, progress=False)
    assert fast_layer.drop_weights(model) == 0
    assert not any(m.dropped for _, m in shift_files.shifts_by_key(model))


def tiny_model(tmp_path, bpe_vocab, family="sd1"):
    path = tmp_path / f"{family}.safetensors"
    if not path.exists():
        tiny.write_single_file(path, family)
    return sd.load(path, vocab=bpe_vocab)


def other_tiny_model(tmp_path, bpe_vocab, family="sd1"):
    """The tiny model of `tiny_model` with one UNet weight changed: another base model of the same architecture."""
    from safetensors.torch import load_file, save_file
    tiny_model(tmp_path, bpe_vocab, family)
    ckpt = load_file(str(tmp_path / f"{family}.safetensors"))
    key = next(k for k in sorted(ckpt) if k.startswith(loading.UNET_PREFIX) and ckpt[k].ndim > 1)
    ckpt[key] = ckpt[key] * 3
    save_file(ckpt, str(tmp_path / f"other-{family}.safetensors"))
    return sd.load(tmp_path / f"other-{family}.safetensors", vocab=bpe_vocab)


def test_merge_and_unmerge_are_bit_exact(tmp_path, bpe_vocab):
    model = tiny_model(tmp_path, bpe_vocab)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    fast_layer.add_spectral_shifts(model, progress=False)
    for _, m in shift_files.shifts_by_key(model):
        with torch.no_grad():
            m.delta.normal_(0, 0.1)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, tiny.TEXT_WIDTH)
    with torch.no_grad():
        y_shifted = model.unet(x, 10, ctx)
        svdiff.merge(model)
        y_merged = model.unet(x, 10, ctx)
        svdiff.unmerge(model)
    assert rel(y_merged, y_shifted) <= 1e-5
    svdiff.remove_spectral_shifts(model)
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dropping_unread_weights_keeps_training_fingerprint_and_merge(tmp_path, bpe_vocab):
    model, kept = tiny_model(tmp_path, bpe_vocab), tiny_model(tmp_path, bpe_vocab)
    for m in (model, kept):
        fast_layer.add_spectral_shifts(m, progress=False)
    base_print = fingerprint.fingerprint(model)
    for (_, a), (_, b) in zip(shift_files.shifts_by_key(model), shift_files.shifts_by_key(kept)):
        with torch.no_grad():
            a.delta.copy_(torch.randn(a.delta.shape) * 0.1)
            b.delta.copy_(a.delta)
    assert fast_layer.drop_weights(model) > 0
    dropped = [m for _, m in shift_files.shifts_by_key(model) if m.dropped]
    assert any(m.kind == "conv" for m in dropped) and all(m.factored_always() for m in dropped)
    assert fingerprint.fingerprint(model) == base_print
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, tiny.TEXT_WIDTH)
    outputs = []
    for m in (model, kept):  # the training path reads no dropped W: same values, same gradients
        loss = m.unet(x, 10, ctx).square().mean()
        loss.backward()
        grads = [s.delta.grad for k, s in shift_files.shifts_by_key(m) if k.startswith(loading.UNET_PREFIX)]
        outputs.append((loss.detach(), torch.cat(grads)))
    assert rel(outputs[0][0], outputs[1][0]) <= 1e-6 and rel(outputs[0][1], outputs[1][1]) <= 1e-5
    shift_files.save_shift_file(model, tmp_path / "s.safetensors")  # same fingerprint: applies to the kept model
    shift_files.load_shift_file(kept, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="merge first"):
        svdiff.remove_spectral_shifts(model)
    with torch.no_grad():
        svdiff.merge(model), svdiff.merge(kept)
        assert rel(model.unet(x, 10, ctx), kept.unet(x, 10, ctx)) <= 1e-5  # W_δ from the factors
    with pytest.raises(ValueError, match="reload the model"):
        svdiff.unmerge(model)


def test_shift_file_round_trip_keys_and_errors(tmp_path, bpe_vocab):
    model = tiny_model(tmp_path, bpe_vocab, "sd2")
    fast_layer.add_spectral_shifts(model, progress=False)
    for _, m in shift_files.shifts_by_key(model):
        with torch.no_grad():
            m.delta.normal_()
    path = tmp_path / "shifts.safetensors"
    shift_files.save_shift_file(model, path)
    tensors, meta = shift_files.read_shift_file(path)
    assert meta["family"] == "sd2" and meta["format"] == shift_files.FORMAT
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in tensors
    assert "cond_stage_model.model.positional_embedding" in tensors
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in tensors
    assert tensors["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (tiny.TEXT_WIDTH,)
    other = tiny_model(tmp_path, bpe_vocab, "sd2")
    fast_layer.add_spectral_shifts(other, progress=False)
    shift_files.load_shift_file(other, path)
    assert all(torch.equal(a.delta, b.delta) for (_, a), (_, b) in zip(shift_files.shifts_by_key(model), shift_files.shifts_by_key(other)))

    scaled = tiny_model(tmp_path, bpe_vocab, "sd2")
    fast_layer.add_spectral_shifts(scaled, progress=False)
    shift_files.load_shift_file(scaled, path, scale=-0.5)
    assert all(torch.equal(b.delta, -0.5 * a.delta)
               for (_, a), (_, b) in zip(shift_files.shifts_by_key(model), shift_files.shifts_by_key(scaled)))

    other = other_tiny_model(tmp_path, bpe_vocab, "sd2")  # another base model: refused unless forced
    fast_layer.add_spectral_shifts(other, progress=False)
    with pytest.raises(ValueError, match="different base model"):
        shift_files.load_shift_file(other, path)
    shift_files.load_shift_file(other, path, force=True)
    sd1 = tiny_model(tmp_path, bpe_vocab, "sd1")  # another family: refused even when forced
    fast_layer.add_spectral_shifts(sd1, subset="unet", progress=False)
    with pytest.raises(ValueError, match="shifts for an sd2 model, but the base model is sd1"):
        shift_files.load_shift_file(sd1, path, force=True)

    from safetensors.torch import save_file
    bad = dict(tensors)
    bad["model.diffusion_model.nope.weight"] = torch.zeros(3)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="model.diffusion_model.nope.weight"):
        shift_files.load_shift_file(model, tmp_path / "bad.safetensors")
    bad = dict(tensors)
    k = "model.diffusion_model.out.2.weight"
    bad[k] = torch.zeros(bad[k].shape[0] + 1)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="out.2.weight"):
        shift_files.load_shift_file(model, tmp_path / "bad.safetensors")


def test_param_groups_use_the_authors_learning_rates(tmp_path, bpe_vocab):
    model = tiny_model(tmp_path, bpe_vocab)
    fast_layer.add_spectral_shifts(model, progress=False)
    groups = {g["name"]: g for g in svdiff.param_groups(model)}
    assert groups["matrix"]["lr"] == 1e-3 and groups["1d"]["lr"] == 1e-6
    assert all(p.ndim == 1 for g in groups.values() for p in g["params"])
    n_norm = sum(isinstance(m.base, (nn.GroupNorm, nn.LayerNorm)) for _, m in shift_files.shifts_by_key(model))
    assert len(groups["1d"]["params"]) == n_norm > 0
    trainable = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("delta") for n in trainable)


def test_sd15_counts_are_the_papers():
    """On the meta device (no memory): all = 398,197 floats (UNet 322,856 + text 75,341); Table 1 subsets."""
    with torch.device("meta"):
        model = sd.StableDiffusion(unet_lib.UNet(unet_lib.UNetConfig()), None,
                                   clip_text.build_text_encoder(clip_text.TextConfig()), None, "sd1", "epsilon")

    def count(subset):
        return sum(svdiff.shift_length(m) for _, m in svdiff.shiftable_modules(model, subset))
    assert (count("all"), count("unet"), count("text")) == (398_197, 322_856, 75_341)
    assert (count("1d"), count("2d"), count("4d")) == (100_160, 140_416, 82_280)
    assert (count("cross-attn"), count("cross-attn-kv")) == (43_776, 18_816)
    assert count("up") + count("down") + count("mid") < count("unet")


def test_the_keys_of_a_shift_file_select_exactly_its_layers():
    with torch.device("meta"):
        model = sd.StableDiffusion(unet_lib.UNet(unet_lib.UNetConfig()), None,
                                   clip_text.build_text_encoder(clip_text.TextConfig()), None, "sd1", "epsilon")
    keys = {"model.diffusion_model.middle_block.1.proj_in.weight",
            "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"}
    names = shift_files.names_by_key(model)
    chosen = svdiff.shiftable_modules(model, names={names[k] for k in keys})
    assert {shift_files.key_of(model, n) for n, _ in chosen} == keys and len(chosen) == 2


def write_all_shifts(model, folder):
    """A shift file of every δ of `all` (zeros, the original key names) in fp32 and in fp16: their sizes."""
    from safetensors.torch import save_file
    tensors = {shift_files.key_of(model, n): torch.zeros(svdiff.shift_length(m))
               for n, m in svdiff.shiftable_modules(model)}
    meta = {"format": shift_files.FORMAT, "version": shift_files.VERSION, "family": model.family, "subset": "all", "rank": "",
            "fingerprint": "0" * 16}
    save_file(tensors, str(folder / "s.safetensors"), metadata=meta)
    save_file({k: v.half() for k, v in tensors.items()}, str(folder / "h.safetensors"), metadata=meta)
    return os.path.getsize(folder / "s.safetensors"), os.path.getsize(folder / "h.safetensors")


def test_sd15_all_shift_file_size(tmp_path):
    """Every δ of SD1.5 `all` in fp32, with the original key names: within 1.65 MiB."""
    with torch.device("meta"):
        model = sd.StableDiffusion(unet_lib.UNet(unet_lib.UNetConfig()), None,
                                   clip_text.build_text_encoder(clip_text.TextConfig()), None, "sd1", "epsilon")
    size, half_size = write_all_shifts(model, tmp_path)
    assert size <= 1.65 * 2 ** 20, size
    assert half_size < 0.55 * size


def sdxl_on_meta():
    """SDXL base 1.0's UNet and both text encoders at full size, on the meta device (no memory)."""
    from test_sdxl import BIGG, SDXL_UNET, VIT_L
    with torch.device("meta"):
        return sd.StableDiffusion(
            unet_lib.UNet(unet_lib.config_from_diffusers(SDXL_UNET)), None,
            clip_text.build_text_encoder(clip_text.config_from_diffusers(VIT_L, sdxl=True)), None, "sdxl", "epsilon",
            text_encoder_2=clip_text.build_text_encoder(clip_text.config_from_diffusers(BIGG, sdxl=True)))


def test_sdxl_counts_are_those_of_its_architecture():
    """`all` = 1,520,706 floats (docs/models.md): UNet 1,203,880 + ViT-L 68,429 + bigG 248,397, each equal to a count over
    diffusers'/transformers' own modules of the same architecture, less what SDXL does not run (ViT-L's last layer
    and final norm) and what our layout fuses (bigG's q/k/v: one matrix of min(3C, C) = C values, not three of C)
    or keeps as a bare parameter (bigG's text_projection: not shifted)."""
    from diffusers import UNet2DConditionModel
    from test_sdxl import BIGG, SDXL_UNET, VIT_L
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    model = sdxl_on_meta()

    def count(subset, component=None):
        return sum(svdiff.shift_length(m) for n, m in svdiff.shiftable_modules(model, subset)
                   if component in (None, n.partition(".")[0]))

    def theirs(root, skip=lambda name: False):
        return sum(svdiff.shift_length(m) for n, m in root.named_modules()
                   if isinstance(m, svdiff.SHIFTABLE) and getattr(m, "weight", None) is not None and not skip(n))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vit_l = CLIPTextModel(CLIPTextConfig(**VIT_L))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG))
    assert count("unet") == theirs(unet) == 1_203_880
    assert count("text", "text_encoder") == theirs(vit_l, lambda n: ".layers.11." in n or "final_layer_norm" in n) \
        == 68_429
    assert count("text", "text_encoder_2") == theirs(big_g) - 32 * 2 * 1280 - 1280 == 248_397
    assert count("all") == count("unet") + count("text") == 1_520_706
    assert count("cross-attn") == 332_800 and count("up") + count("down") + count("mid") < count("unet")


def test_sdxl_all_shift_file_size_and_info(tmp_path, capsys):
    """Every δ of SDXL `all` in fp32 with the single file's key names: 5.98 MiB (docs/models.md), half in fp16; `shifts.py
    info` counts them per component."""
    model = sdxl_on_meta()
    size, half_size = write_all_shifts(model, tmp_path)
    assert any(k.startswith("conditioner.embedders.1.model.") and k.endswith("in_proj_weight")
               for k in shift_files.read_shift_file(tmp_path / "s.safetensors")[0])
    assert size <= 6.0 * 2 ** 20, size
    assert half_size < 0.55 * size
    shifts.main(["info", str(tmp_path / "s.safetensors")])
    lines = capsys.readouterr().out.splitlines()
    for component, prefix, values in (("unet", "model.diffusion_model.", "1,203,880"),
                                      ("text_encoder", "conditioner.embedders.0.transformer.", "68,429"),
                                      ("text_encoder_2", "conditioner.embedders.1.model.", "248,397")):
        assert any(l.startswith(f"  {component} ({prefix}*): ") and f" {values} values" in l for l in lines), lines


def test_slerp_is_shoemakes_formula_per_sample_from_end_to_end():
    """Eq. 7 against sin-weights computed in float64 with numpy, each sample of the batch at its own angle."""
    z, n = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.allclose(svdiff.slerp(0.0, z, n), z, atol=1e-5)
    assert torch.allclose(svdiff.slerp(1.0, z, n), n, atol=1e-5)
    n[1] = -0.5 * z[1] + 0.3 * n[1]  # a wide angle in the second sample, a right-ish one in the first
    for alpha in (0.25, 0.5):
        ours = svdiff.slerp(alpha, z, n).double().numpy()
        for a, b, o in zip(z.double().numpy(), n.double().numpy(), ours):
            theta = np.arccos(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
            ref = (np.sin((1 - alpha) * theta) * a + np.sin(alpha * theta) * b) / np.sin(theta)
            assert np.abs(o - ref).max() <= 1e-5


def test_slerp_between_orthogonal_latents_of_equal_norm_keeps_the_norm():
    """On the great circle through a and b, a point at α is |a| (cos(απ/2) e1 + sin(απ/2) e2) with e1, e2 the
    unit vectors of a and b: the norm of noise is kept where a straight line (lerp) would shrink it by up to √2."""
    a = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    b = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    fa, fb = a.flatten(1), b.flatten(1)
    fb -= (fa * fb).sum(1, keepdim=True) / fa.square().sum(1, keepdim=True) * fa  # orthogonal to a, per sample
    fb *= fa.norm(dim=1, keepdim=True) / fb.norm(dim=1, keepdim=True)            # and of a's norm
    a, b = a.float(), b.float()
    for alpha in np.linspace(0, 1, 9):
        out = svdiff.slerp(float(alpha), a, b).flatten(1).double()
        assert torch.allclose(out.norm(dim=1), fa.norm(dim=1), rtol=1e-5)
        rotated = np.cos(alpha * np.pi / 2) * fa + np.sin(alpha * np.pi / 2) * fb
        assert (out - rotated).abs().max() <= 1e-5


def test_slerp_of_parallel_latents_is_their_lerp():
    """cos θ of a latent with itself rounds to just above 1 in float32 for some samples: clamped, never NaN."""
    z = torch.randn(16, 4, 8, 8)
    assert torch.allclose(svdiff.slerp(0.3, z, z), z, atol=1e-5)
    assert torch.allclose(svdiff.slerp(0.3, z, 2 * z), 1.3 * z, atol=1e-5)


def test_prior_preservation_loss_is_instance_plus_weighted_prior():
    p, t, pp, pt = (torch.randn(2, 4, 8, 8) for _ in range(4))
    loss, prior = svdiff.prior_preservation_loss(p, t, pp, pt, 0.5)
    assert torch.allclose(loss, ((p - t) ** 2).mean() + 0.5 * ((pp - pt) ** 2).mean())
    assert torch.allclose(prior, ((pp - pt) ** 2).mean())


@pytest.mark.parametrize("W", [torch.randn(40, 90), torch.randn(90, 40),
                               torch.randn(30, 30) @ torch.diag(torch.logspace(0, -12, 30)),  # ill-conditioned
                               torch.zeros(5, 7)])
def test_svd_is_exact_and_orthonormal_on_every_route(W):
    U, S, V = fast_svd.svd(W)
    assert ((U * S) @ V.T - W.double()).norm() <= 1e-6 * max(W.norm().item(), 1e-30)
    eye = torch.eye(V.shape[1], dtype=V.dtype)
    assert (V.T @ V - eye).abs().max() <= 1e-6 and (U.T @ U - eye).abs().max() <= 1e-6
    assert (S[:-1] >= S[1:]).all()


def test_svd_cache_is_reused_for_the_same_base_and_ignored_for_another(tmp_path, bpe_vocab, capsys):
    cache = tmp_path / "svd.safetensors"
    model = tiny_model(tmp_path, bpe_vocab)
    fast_layer.add_spectral_shifts(model, subset="cross-attn", cache=cache, progress=False)
    assert cache.is_file()
    again = tiny_model(tmp_path, bpe_vocab)
    assert svd_cache.load_svd_cache(cache, again)  # same base weights: the factors are reused
    fast_layer.add_spectral_shifts(again, subset="cross-attn", cache=cache, progress=False)
    for (_, a), (_, b) in zip(shift_files.shifts_by_key(model), shift_files.shifts_by_key(again)):
        assert torch.equal(a.U, b.U) and torch.equal(a.sigma, b.sigma) and torch.equal(a.Vh, b.Vh)
    assert svd_cache.load_svd_cache(cache, other_tiny_model(tmp_path, bpe_vocab)) == {}
    assert "other base weights" in capsys.readouterr().err
    from safetensors.torch import load_file, save_file
    meta = shift_files.read_shift_file(cache)[1]
    save_file(load_file(str(cache)), str(cache), metadata=dict(meta, layout="U,S,V"))  # an older layout
    assert svd_cache.load_svd_cache(cache, again) == {} and "older layout" in capsys.readouterr().err


def test_shift_file_without_fingerprint_warns_and_applies(tmp_path, bpe_vocab):
    from safetensors.torch import save_file
    model = tiny_model(tmp_path, bpe_vocab)
    fast_layer.add_spectral_shifts(model, subset="cross-attn-kv", progress=False)
    foreign = {k: torch.full_like(m.delta, 0.01) for k, m in shift_files.shifts_by_key(model)}
    save_file(foreign, str(tmp_path / "foreign.safetensors"))
    with pytest.warns(UserWarning, match="no base-model fingerprint"):
        shift_files.load_shift_file(model, tmp_path / "foreign.safetensors")
    assert all(torch.all(m.delta == 0.01) for _, m in shift_files.shifts_by_key(model))
