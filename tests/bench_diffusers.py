"""Our UNet's sampling step against diffusers' UNet2DConditionModel of the same architecture, side by side.

    python tests/bench_diffusers.py [--device cpu|cuda] [--resolution 256] [--steps 3] [--tiny]

bench.py's timing rules (taking turns, medians, batch 2 as with classifier-free guidance); it lives with the tests
because diffusers is a test-only dependency: the program never imports it. Prints one JSON line with
`base_vs_diffusers_sampling` (ours ÷ diffusers).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import sd  # noqa: E402


def diffusers_unet(model):
    """diffusers' UNet of the architecture of `model.unet` (its own random weights: speed does not depend on them)."""
    from diffusers import UNet2DConditionModel
    cfg = model.unet.cfg
    channels = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    levels = range(len(channels))
    down = tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels))
    unet = UNet2DConditionModel(block_out_channels=channels, down_block_types=down, up_block_types=up,
                                layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                                attention_head_dim=cfg.num_heads, norm_num_groups=cfg.norm_groups)
    p = next(model.unet.parameters())
    return unet.to(p.device, p.dtype).eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="repetitions (x3: the ratio is near 1)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model, for a smoke test")
    a = p.parse_args(argv)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = bench.build_model(a.tiny, a.device, dtype)
    theirs = diffusers_unet(model)
    x_t, t, _ = bench.make_batch(model, a.resolution, a.device)
    with torch.no_grad(), bench.autocast(a.device):
        context = sd.encode_prompts(model, bench.PROMPTS).context
        times = bench.alternate({"ours": lambda: model.unet(x_t, t[:1], context),
                                 "diffusers": lambda: theirs(x_t, t[:1], encoder_hidden_states=context)},
                                3 * a.steps, a.device)
    ratio = bench.median(times["ours"]) / bench.median(times["diffusers"])
    print(json.dumps({"base_vs_diffusers_sampling": ratio, "seconds": times, "device": a.device,
                      "resolution": a.resolution}))
    return ratio


if __name__ == "__main__":
    main()
