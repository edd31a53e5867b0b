"""unet.py equals diffusers' UNet2DConditionModel, in both key layouts; attention paths and switches agree."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

import tiny
import unet as unet_lib

# a third shape: one res block per level, three levels, attention only in the middle level
GENERAL = dict(tiny.unet_config("sd1"), layers_per_block=1, block_out_channels=(32, 32, 64),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
CONFIGS = {"sd1": tiny.unet_config("sd1"), "sd2": tiny.unet_config("sd2"), "general": GENERAL}


def inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 77, tiny.TEXT_WIDTH, generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_layout_matches_diffusers_through_its_own_converter(name):
    dcfg = CONFIGS[name]
    cfg = unet_lib.config_from_diffusers(dcfg)
    ours = tiny.randomize_(unet_lib.UNet(cfg), 0)
    oracle = UNet2DConditionModel(**dcfg).eval()
    ckpt = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    oracle.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dict(oracle.config)), strict=True)
    x, ctx = inputs()
    with torch.no_grad():
        err = (ours(x, 500, ctx) - oracle(x, 500, encoder_hidden_states=ctx).sample).abs().max().item()
    assert err <= 1e-4, f"max abs diff {err:.2e}"
    family = "sd2" if cfg.head_dim else "sd1"
    assert unet_lib.config_from_shapes({k: tuple(v.shape) for k, v in ours.state_dict().items()}, family) == cfg


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("t", [7, torch.tensor(7), torch.tensor([7, 980])])
def test_diffusers_layout_loads_by_the_rename_rule(name, t):
    dcfg = CONFIGS[name]
    cfg = unet_lib.config_from_diffusers(dcfg)
    oracle = tiny.randomize_(UNet2DConditionModel(**dcfg), 3)
    ours = unet_lib.UNet(cfg).eval()
    ours.load_state_dict({unet_lib.diffusers_to_original(k, cfg): v for k, v in oracle.state_dict().items()},
                         strict=True)
    x, ctx = inputs()
    with torch.no_grad():
        err = (ours(x, t, ctx) - oracle(x, t, encoder_hidden_states=ctx).sample).abs().max().item()
    assert err <= 1e-4, f"max abs diff {err:.2e}"


@pytest.mark.parametrize("size", [(7, 9), (5, 6), (13, 13)])
def test_latent_sides_that_are_not_multiples_of_8_match_diffusers(size):
    """520 px images give 65-pixel latents: the way up must interpolate to each skip's size, as diffusers does."""
    dcfg = CONFIGS["general"]
    cfg = unet_lib.config_from_diffusers(dcfg)
    oracle = tiny.randomize_(UNet2DConditionModel(**dcfg), 3)
    ours = unet_lib.UNet(cfg).eval()
    ours.load_state_dict({unet_lib.diffusers_to_original(k, cfg): v for k, v in oracle.state_dict().items()})
    x, ctx = torch.randn(1, 4, *size), torch.randn(1, 77, tiny.TEXT_WIDTH)
    with torch.no_grad():
        err = (ours(x, 7, ctx) - oracle(x, 7, encoder_hidden_states=ctx).sample).abs().max().item()
    assert err <= 1e-4, f"max abs diff {err:.2e}"


def test_unknown_diffusers_key_is_an_error():
    with pytest.raises(ValueError, match="cannot be mapped"):
        unet_lib.diffusers_to_original("class_embedding.linear_1.weight", unet_lib.UNetConfig())


def test_recorded_cross_attention_equals_sdpa_path_and_carries_gradients():
    cfg = unet_lib.config_from_diffusers(tiny.unet_config("sd1"))
    model = tiny.randomize_(unet_lib.UNet(cfg), 0)
    x, ctx = inputs()
    fast = model(x, 300, ctx)
    model.record_cross_attention(True)
    slow = model(x, 300, ctx)
    assert (fast - slow).abs().max() <= 1e-5
    maps = model.cross_attention_probs()
    n_attn2 = sum(name.endswith("attn2") for name, _ in model.named_modules())
    assert len(maps) == n_attn2 > 0
    for name, p in maps:
        assert p.shape[0] == 2 and p.shape[1] == 8 and p.shape[-1] == 77 and p.shape[2] in (64, 16)
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
    sum(p[..., 1].pow(2).mean() for _, p in maps).backward()
    assert model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.grad.abs().sum() > 0
    model.record_cross_attention(False)
    assert model.cross_attention_probs() == []


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = unet_lib.config_from_diffusers(tiny.unet_config("sd1"))
    model = tiny.randomize_(unet_lib.UNet(cfg), 0).train()
    x, ctx = inputs()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        model(x, 300, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sd2_with_upcast_attention_stays_close(dtype):
    cfg = unet_lib.config_from_diffusers(tiny.unet_config("sd2"))
    model = tiny.randomize_(unet_lib.UNet(cfg), 0)
    x, ctx = inputs()
    with torch.no_grad():
        ref = model(x, 300, ctx)
        out = model.to(dtype)(x.to(dtype), 300, ctx.to(dtype)).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
