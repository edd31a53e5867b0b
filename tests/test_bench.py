"""bench.py on a tiny model: every method trains, every figure is reported, and the baselines are what they claim.
No timing is asserted here: speed claims come from bench.py runs (README "Performance")."""
import json
import subprocess
import sys

import torch
import torch.nn as nn

import bench
import svdiff
import unet as unet_lib


def test_lora_rank4_on_sd15_attention_has_the_diffusers_parameter_count():
    """q/k/v/out of every attn1 and attn2 of the SD1.5 UNet, r·(in + out) each (meta device: no memory)."""
    with torch.device("meta"):
        unet = unet_lib.UNet(unet_lib.UNetConfig())
    assert len(bench.lora_layers(unet)) == 16 * 2 * 4
    assert bench.lora_param_count(unet) == 797_184


def test_lora_starts_as_the_frozen_layer_and_trains_only_its_factors():
    base = nn.Linear(16, 8).requires_grad_(False)
    lora = bench.LoRA(base)
    x = torch.randn(3, 16)
    assert torch.equal(lora(x), base(x))  # B = 0
    lora(x).square().sum().backward()
    assert lora.up.grad.abs().sum() > 0 and base.weight.grad is None


def test_methods_share_one_model_and_switch_what_trains(tmp_path):
    model = bench.build_model(True, "cpu", torch.float32)
    methods = bench.Methods(model, tmp_path / "svd.safetensors", "cpu")
    attn = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
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


def test_tiny_run_reports_every_figure_and_ends_with_the_json_summary(tmp_path):
    out = subprocess.run([sys.executable, str(bench.Path(bench.__file__)), "--tiny", "--steps", "1", "--resolution",
                          "64", "--json", str(tmp_path / "bench.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(bench.SUMMARY_KEYS) <= set(summary)
    assert all(isinstance(summary[k], (int, float)) and summary[k] > 0 for k in bench.SUMMARY_KEYS)
    assert summary["svd_vs_lapack"] > 0  # ours ÷ torch.linalg.svd on a sample of the matrices, same run
    everything = json.loads((tmp_path / "bench.json").read_text())
    assert set(everything["peak_bytes"]) == set(bench.PROBES)
    peak = everything["peak_bytes"]
    assert peak["full"] > peak["model"] and peak["svdiff"] > peak["model"]  # each child measures only itself
    assert everything["shift_floats"] == sum(svdiff.shift_length(m) for _, _, m in
                                             svdiff.shiftable_modules(bench.build_model(True, "cpu", torch.float32)))
    assert "| SVDiff, fast path (auto) |" in out.stdout and "ours ÷ torch.linalg.svd" in out.stdout
    assert 1 <= everything["svd_sample_matrices"] < everything["svd_matrices"]
    assert all(s > 0 for s in everything["svd_sample_seconds"].values())


def test_bad_arguments_get_one_line_and_exit_1():
    for args in (["--resolution", "60"], ["--parts", "training,speed"], ["--steps", "0"]):
        out = subprocess.run([sys.executable, str(bench.Path(bench.__file__)), "--tiny", *args],
                             capture_output=True, text=True)
        assert out.returncode == 1 and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1, args


def test_our_unet_against_diffusers_runs_beside_bench(capsys):
    """tests/bench_diffusers.py: the comparison with diffusers' UNet lives with the tests (diffusers is test-only)."""
    import bench_diffusers
    ratio = bench_diffusers.main(["--tiny", "--steps", "1", "--resolution", "64", "--device", "cpu"])
    assert ratio > 0 and json.loads(capsys.readouterr().out)["base_vs_diffusers_sampling"] == ratio
