"""bench.py on a tiny model: every method trains, every figure is reported, and the baselines are what they claim.
No timing is asserted here: speed claims come from bench.py runs (docs/performance.md)."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import bench
import clip_text
import svdiff
from support import svd_cache
import unet as unet_lib


def test_lora_rank4_on_sd15_attention_has_the_diffusers_parameter_count():
    """q/k/v/out of every attn1 and attn2 of the SD1.5 UNet, r·(in + out) each (meta device: no memory)."""
    with torch.device("meta"):
        unet = unet_lib.UNet(unet_lib.UNetConfig())
    assert len(bench.lora_layers(unet)) == 16 * 2 * 4
    assert bench.lora_param_count(unet) == 797_184


def test_sdxl_arch_is_sdxl_base_and_its_lora_is_diffusers_dreambooth_lora_sdxls():
    """--arch sdxl builds SDXL base 1.0's UNet and both text encoders (our configs from its config.json files, as
    sd.load reads them), and the LoRA baseline adapts exactly the layers diffusers' DreamBooth-LoRA-SDXL does
    (to_q/to_k/to_v/to_out.0 of every attention), with its parameter count (meta device: no memory)."""
    from diffusers import UNet2DConditionModel
    from test_sdxl import BIGG, SDXL_UNET, VIT_L
    unet_cfg, text_cfgs = bench.configs("sdxl", tiny=False)
    assert unet_cfg == unet_lib.config_from_diffusers(SDXL_UNET)
    assert text_cfgs == [clip_text.config_from_diffusers(cfg, sdxl=True) for cfg in (VIT_L, BIGG)]
    model = bench.build_model(False, "meta", torch.bfloat16, "sdxl")
    assert model.family == "sdxl" and model.text_encoder_2.cfg.projection_dim == 1280
    assert sum(p.numel() for p in model.unet.parameters()) == 2_567_463_684  # tests/test_sdxl.py: the official count
    with torch.device("meta"):
        theirs = [m for n, m in UNet2DConditionModel(**SDXL_UNET).named_modules()
                  if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))]
    assert len(bench.lora_layers(model.unet)) == len(theirs) == 70 * 2 * 4  # 70 transformer blocks
    assert bench.lora_param_count(model.unet) == sum(4 * (m.in_features + m.out_features) for m in theirs)


def test_lora_starts_as_the_frozen_layer_and_trains_only_its_factors():
    base = nn.Linear(16, 8).requires_grad_(False)
    lora = bench.LoRA(base)
    x = torch.randn(3, 16)
    assert torch.equal(lora(x), base(x))  # B = 0
    lora(x).square().sum().backward()
    assert lora.up.grad.abs().sum() > 0 and base.weight.grad is None


@pytest.mark.parametrize("arch", bench.ARCHS)
def test_methods_share_one_model_and_switch_what_trains(tmp_path, arch):
    model = bench.build_model(True, "cpu", torch.float32, arch)
    methods = bench.Methods(model, tmp_path / "svd.safetensors", "cpu")
    attn = "input_blocks.1.1.transformer_blocks.0.attn2.to_k" if arch == "sd15" else \
        "input_blocks.3.1.transformer_blocks.1.attn2.to_k"  # tiny SDXL: attention at level 1 only, 2 blocks deep
    batch = bench.make_batch(model, 64, "cpu")
    for method, kind in (("svdiff", svdiff.SpectralShift), ("lora", bench.LoRA), ("full", nn.Linear),
                         ("naive", svdiff.SpectralShift)):
        methods.use(method)
        assert isinstance(model.unet.get_submodule(attn), kind), method
        assert all(p.requires_grad == (method == "full") for p in methods.weights()), method
        before = [p.detach().clone() for g in methods.optimizer(method).param_groups for p in g["params"]]
        bench.train_step(methods, method, batch)
        after = [p.detach() for g in methods.optimizer(method).param_groups for p in g["params"]]
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"{method} trained nothing"


@pytest.mark.parametrize("arch", bench.ARCHS)
def test_tiny_run_reports_every_figure_and_ends_with_the_json_summary(tmp_path, arch):
    out = subprocess.run([sys.executable, str(bench.Path(bench.__file__)), "--arch", arch, "--tiny", "--steps", "1",
                          "--resolution", "64", "--train-steps", "2", "--json", str(tmp_path / "bench.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(bench.SUMMARY_KEYS) <= set(summary)
    assert all(isinstance(summary[k], (int, float)) and summary[k] > 0 for k in bench.SUMMARY_KEYS)
    assert summary["svd_vs_lapack"] > 0  # ours ÷ torch.linalg.svd on a sample of the matrices, same run
    everything = json.loads((tmp_path / "bench.json").read_text())
    assert set(everything["peak_bytes"]) == set(bench.PROBES)
    peak = everything["peak_bytes"]
    assert peak["full"] > peak["model"] and peak["svdiff"] > peak["model"]  # each child measures only itself
    model = bench.build_model(True, "cpu", torch.float32, arch)
    assert everything["shift_floats"] == sum(svdiff.shift_length(m) for _, m in svdiff.shiftable_modules(model))
    assert (everything["arch"], summary["arch"]) == (arch, arch)
    assert len(everything["checkpointed_seconds"]) == 2  # --train-steps, timed after the first step
    assert "| SVDiff, fast path (auto) |" in out.stdout and "ours ÷ torch.linalg.svd" in out.stdout
    assert "--grad-checkpointing" in out.stdout and out.stdout.startswith(bench.ARCH_NAMES[arch] + " (tiny)")
    assert 1 <= everything["svd_sample_matrices"] < everything["svd_matrices"]
    assert all(s > 0 for s in everything["svd_sample_seconds"].values())


def test_bad_arguments_get_one_line_and_exit_1():
    for args in (["--resolution", "60"], ["--parts", "training,speed"], ["--steps", "0"], ["--train-steps", "0"]):
        out = subprocess.run([sys.executable, str(bench.Path(bench.__file__)), "--tiny", *args],
                             capture_output=True, text=True)
        assert out.returncode == 1 and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1, args


def test_full_sdxl_on_the_cpu_is_refused_with_one_line():
    """10 GB for its UNet in fp32 and hours of SVD: the full SDXL bench is for a GPU; its tiny form runs here."""
    out = subprocess.run([sys.executable, str(bench.Path(bench.__file__)), "--arch", "sdxl", "--device", "cpu"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1 and "--tiny" in out.stderr
    assert out.stderr.startswith("error: --arch sdxl") and not out.stdout


def test_our_unet_against_diffusers_runs_beside_bench(capsys):
    """tests/bench_diffusers.py: the comparison with diffusers' UNet lives with the tests (diffusers is test-only)."""
    import bench_diffusers
    ratio = bench_diffusers.main(["--tiny", "--steps", "1", "--resolution", "64", "--device", "cpu"])
    assert ratio > 0 and json.loads(capsys.readouterr().out)["base_vs_diffusers_sampling"] == ratio


def test_child_parts_alone_first_write_the_svd_cache_they_read(tmp_path):
    """--parts memory without the svd part: a child writes the cache before the probes, so no probe's peak holds
    the cold SVD's float64 work; an --svd-cache that is not a cache (a checkpoint named by mistake) is refused."""
    cache = tmp_path / "svd.safetensors"
    out = subprocess.run([sys.executable, str(bench.Path(bench.__file__)), "--tiny", "--steps", "1", "--resolution",
                          "64", "--parts", "memory", "--svd-cache", str(cache)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert cache.is_file() and svd_cache.check_svd_cache(cache) is None
    (tmp_path / "model.safetensors").write_bytes(b"not a cache")
    out = subprocess.run([sys.executable, str(bench.Path(bench.__file__)), "--tiny", "--svd-cache",
                          str(tmp_path / "model.safetensors")], capture_output=True, text=True)
    assert out.returncode == 1 and "is not an SVD cache" in out.stderr
    assert (tmp_path / "model.safetensors").read_bytes() == b"not a cache"
