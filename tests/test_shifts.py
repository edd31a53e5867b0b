"""shifts.py: LoRA export is the exact rank-k truncation; merged export loads as an ordinary model; the CLI."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sd
import shifts
import svdiff
import tiny
from conftest import random_deltas_
from support import apply_shifts, exports, fast_layer, shift_files

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]


@pytest.fixture
def trained(tmp_path, bpe_vocab):
    """A tiny SD2 model (fused q/k/v, linear proj_in) with random shifts saved to a file."""
    path = tmp_path / "base.safetensors"
    tiny.write_single_file(path, "sd2")
    model = sd.load(path, vocab=bpe_vocab)
    fast_layer.add_spectral_shifts(model, progress=False)
    random_deltas_(model, 0)
    shift_files.save_shift_file(model, tmp_path / "shifts.safetensors")
    return model, path, tmp_path / "shifts.safetensors"


def test_lora_export_is_the_exact_rank_k_truncation(trained, tmp_path):
    model, _, _ = trained
    k = 3
    total = exports.export_lora(model, tmp_path / "lora.safetensors", rank=k, dtype=torch.float32)
    lora = load_file(str(tmp_path / "lora.safetensors"))
    checked, lost, norm = 0, 0.0, 0.0
    for component in ("unet", "text_encoder"):
        for name, layer in getattr(model, component).named_modules():
            if not isinstance(layer, svdiff.SpectralShift) or layer.kind in ("norm", "embedding"):
                continue
            # the rank-k truncation of ΔW, computed independently by an SVD of ΔW itself
            dW = layer.delta_weight().detach().double().flatten(1)
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            best = (U[:, :k] * S[:k]) @ Vh[:k]
            names = exports.lora_names(model, component, name)
            ups = [lora[n + ".lora_up.weight"].double().flatten(1) for n in names]
            down = lora[names[0] + ".lora_down.weight"].double().flatten(1)
            assert all(float(lora[n + ".alpha"]) == k for n in names)
            ours = torch.cat(ups) @ down
            assert (ours - best).abs().max() <= 1e-5 * max(1.0, best.abs().max().item()), name
            checked += 1
            lost, norm = lost + (dW - best).square().sum().item(), norm + dW.square().sum().item()
    assert checked > 20
    assert total == pytest.approx((lost / norm) ** 0.5, rel=1e-6)  # ‖ΔW - LoRA‖ / ‖ΔW‖ over all layers
    assert any(n.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.") for n in lora)
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_v_proj.") for n in lora)
    assert lora["lora_unet_conv_in.lora_down.weight"].ndim == 4


def test_export_lora_prints_the_total_and_worst_layer_and_each_layer_only_when_asked(trained, tmp_path, capsys):
    model, _, _ = trained
    total = exports.export_lora(model, tmp_path / "a.safetensors", rank=2)
    summary = capsys.readouterr().out.splitlines()
    exports.export_lora(model, tmp_path / "b.safetensors", rank=2, per_layer=True)
    *table, last = capsys.readouterr().out.splitlines()
    errors = {line.split(": relative error ")[0]: float(line.split()[-1]) for line in table}
    assert len(summary) == 1 and len(table) == sum(m.kind in ("linear", "conv") for _, m in shift_files.shifts_by_key(model))
    head, worst = summary[0].removesuffix(" (--per-layer: every layer's)").split(", worst layer ")
    assert head == f"LoRA of {len(table)} layers at rank 2 (written at rank 2): total relative error ‖ΔW − LoRA‖/‖ΔW‖ " \
                   f"{total:.4f}"
    name, err = worst.split()
    assert errors[name] == float(err) == max(errors.values())
    assert last == summary[0].removesuffix(" (--per-layer: every layer's)")


def test_merged_export_loads_as_an_ordinary_model_with_the_shifts_baked_in(trained, tmp_path, bpe_vocab):
    model, base_path, _ = trained
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, tiny.TEXT_WIDTH)
    ids = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        expected_unet, expected_text = model.unet(x, 5, ctx), model.text_encoder(ids)
    exports.export_merged(model, base_path, tmp_path / "merged.safetensors")
    merged = sd.load(tmp_path / "merged.safetensors", vocab=bpe_vocab)
    with torch.no_grad():
        assert (merged.unet(x, 5, ctx) - expected_unet).abs().max() <= 1e-4
        assert (merged.text_encoder(ids) - expected_text).abs().max() <= 1e-4
    base = load_file(str(base_path))
    out = load_file(str(tmp_path / "merged.safetensors"))
    assert set(base) == set(out) and all(base[k].dtype == out[k].dtype for k in base)
    assert torch.equal(base["cond_stage_model.model.text_projection"], out["cond_stage_model.model.text_projection"])


def test_merged_export_refuses_a_source_that_lacks_a_shifted_weight(trained, tmp_path):
    model, base_path, _ = trained
    source = load_file(str(base_path))
    del source["model.diffusion_model.out.2.weight"]
    save_file(source, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 shifted weight \(e.g."):
        exports.export_merged(model, tmp_path / "other.safetensors", tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()


def test_applying_a_file_with_a_key_the_model_lacks_names_it(trained, bpe_vocab):
    _, base_path, path = trained
    tensors, meta = shift_files.read_shift_file(path)
    tensors["model.diffusion_model.nope.weight"] = torch.zeros(3)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="key model.diffusion_model.nope.weight of the shift files is not a weight"):
        apply_shifts.apply_shift_files(sd.load(base_path, vocab=bpe_vocab), [str(path)])


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "shifts.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_cli_info_combine_and_style_mixing(trained, tmp_path):
    _, _, path = trained
    r = cli("info", path)
    assert r.returncode == 0 and "shifted weights" in r.stdout and "fingerprint" in r.stdout
    r = cli("combine", f"{path}:0.5", f"{path}:0.25", "--out", tmp_path / "sum.safetensors")
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(path)), load_file(str(tmp_path / "sum.safetensors"))
    assert all(torch.allclose(b[k], 0.75 * a[k]) for k in a)
    r = cli("combine", path, f"{path}:-1", "--mix", "output_blocks.0-5", "--out", tmp_path / "mix.safetensors")
    assert r.returncode == 0, r.stderr
    mix = load_file(str(tmp_path / "mix.safetensors"))
    up = "model.diffusion_model.output_blocks.1.0.in_layers.2.weight"
    assert torch.equal(mix[up], -a[up])
    assert torch.equal(mix["model.diffusion_model.out.2.weight"], a["model.diffusion_model.out.2.weight"])


def test_cli_errors_are_one_line(trained, tmp_path):
    _, base, path = trained
    r = cli("info", tmp_path / "nope.safetensors")
    assert r.returncode == 1 and "no such shift file" in r.stderr and "Traceback" not in r.stderr
    r = cli("export-merged", path, "--model", tmp_path, "--out", tmp_path / "m.safetensors")
    assert r.returncode == 1 and "folder" in r.stderr and not (tmp_path / "m.safetensors").exists()
    r = cli("combine", path, "--out", tmp_path)
    assert r.returncode == 1 and "is a folder; name the file" in r.stderr and "Traceback" not in r.stderr
    r = cli("combine", path, "--out", tmp_path / "new" / "sum.safetensors")  # its folder is made
    assert r.returncode == 0 and (tmp_path / "new" / "sum.safetensors").is_file(), r.stderr
    # a missing shift file is named (its :SCALE parsed off) before any model is loaded
    r = cli("export-lora", tmp_path / "nope.safetensors:0.5", "--model", tmp_path / "no-model.safetensors",
            "--out", tmp_path / "l.safetensors")
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'nope.safetensors'}: no such shift file"


def test_cli_export_lora_writes_the_scaled_rank_k_truncation_and_counts_what_it_leaves_out(trained, tmp_path,
                                                                                           bpe_vocab):
    model, base, path = trained
    out = tmp_path / "lora.safetensors"
    r = cli("export-lora", f"{path}:0.5", "--model", base, "--vocab", bpe_vocab, "--rank", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    left_out = sum(m.kind in ("norm", "embedding") for _, m in shift_files.shifts_by_key(model))
    assert left_out > 0 and f"warning: {left_out} shifted layers (norm γ, embeddings" in r.stderr
    layers = sum(m.kind in ("linear", "conv") for _, m in shift_files.shifts_by_key(model))
    summary, wrote = r.stdout.splitlines()  # no per-layer table without --per-layer
    assert summary.startswith(f"LoRA of {layers} layers at rank 3 ") and "worst layer" in summary
    assert wrote == f"wrote {out}"
    lora = load_file(str(out))
    assert all(t.dtype == torch.float16 for t in lora.values())
    with torch.no_grad():
        for _, m in shift_files.shifts_by_key(model):
            m.delta.mul_(0.5)
    checked = set()
    for component in ("unet", "text_encoder"):
        for name, layer in getattr(model, component).named_modules():
            if isinstance(layer, svdiff.SpectralShift) and layer.kind in ("linear", "conv"):
                U, S, Vh = torch.linalg.svd(layer.delta_weight().detach().double().flatten(1), full_matrices=False)
                best = (U[:, :3] * S[:3]) @ Vh[:3]
                names = exports.lora_names(model, component, name)
                ours = torch.cat([lora[n + ".lora_up.weight"].double().flatten(1) for n in names]) @ \
                    lora[names[0] + ".lora_down.weight"].double().flatten(1)
                assert (ours - best).abs().max() <= 5e-3 * best.abs().max(), name
                checked |= set(names)
    assert checked == {n.split(".")[0] for n in lora}


def test_cli_export_merged_keeps_an_fp16_checkpoint_fp16_with_the_shifts_baked_in(tmp_path, bpe_vocab):
    base = tmp_path / "base16.safetensors"
    tiny.write_single_file(base, "sd1", dtype=torch.float16)
    model = sd.load(base, vocab=bpe_vocab)
    fast_layer.add_spectral_shifts(model, progress=False)
    random_deltas_(model, 1)
    shift_files.save_shift_file(model, tmp_path / "shifts.safetensors")
    out = tmp_path / "merged.safetensors"
    r = cli("export-merged", tmp_path / "shifts.safetensors", "--model", base, "--vocab", bpe_vocab, "--out", out)
    assert r.returncode == 0, r.stderr
    before, after = load_file(str(base)), load_file(str(out))
    assert set(before) == set(after) and all(after[k].dtype == before[k].dtype for k in before)
    assert any(t.dtype == torch.float16 for t in after.values())
    deltas = load_file(str(tmp_path / "shifts.safetensors"))
    for k, t in before.items():
        if k not in deltas:
            assert torch.equal(after[k], t), k
            continue
        # W_δ = U diag(ReLU(σ + δ)) Vᵀ (γ + δ for norms) from the fp16 weights, in float64, then rounded to fp16
        W, d = t.double(), deltas[k].double()
        if W.ndim == 1:
            expected = W + d
        else:
            U, S, Vh = torch.linalg.svd(W.flatten(1), full_matrices=False)
            expected = ((U * torch.relu(S + d)) @ Vh).reshape(W.shape)
        assert (after[k].double() - expected).abs().max() <= 1e-3 * expected.abs().max(), k


def test_a_rank_limited_file_applies_and_combines_as_trained(tmp_path, bpe_vocab):
    """train.py --rank k writes δ of the k largest singular values: applied to the base model (full-rank shifts),
    the others' δ is 0, which leaves them as they were, so the merged weights equal the rank-k model's; combined
    with a full-rank file, the sum is taken over the first k and the rest comes from the full file alone."""
    base = tmp_path / "base.safetensors"
    tiny.write_single_file(base, "sd1")
    limited = sd.load(base, vocab=bpe_vocab)
    fast_layer.add_spectral_shifts(limited, rank=2, progress=False)
    random_deltas_(limited, 2)
    shift_files.save_shift_file(limited, tmp_path / "rank2.safetensors", rank=2)
    assert shift_files.read_shift_file(tmp_path / "rank2.safetensors")[1]["rank"] == "2"
    full = sd.load(base, vocab=bpe_vocab)
    fast_layer.add_spectral_shifts(full, progress=False)
    random_deltas_(full, 3)
    shift_files.save_shift_file(full, tmp_path / "full.safetensors")

    applied = sd.load(base, vocab=bpe_vocab)
    apply_shifts.apply_shift_files(applied, [str(tmp_path / "rank2.safetensors")])
    svdiff.bake(limited)  # W_δ in place of W, wrappers removed, as apply_shift_files leaves a model
    for component in ("unet", "text_encoder"):
        want = dict(getattr(limited, component).named_parameters())
        got = dict(getattr(applied, component).named_parameters())
        assert got.keys() == want.keys()
        assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)

    combined, meta = shift_files.combine_files([str(tmp_path / "rank2.safetensors"), str(tmp_path / "full.safetensors")])
    assert meta["rank"] == ""  # no limit: the full file's
    for k, m in shift_files.shifts_by_key(full):
        short = shift_files.read_shift_file(tmp_path / "rank2.safetensors")[0][k]
        assert torch.equal(combined[k][:len(short)], short + m.delta.detach()[:len(short)])
        assert torch.equal(combined[k][len(short):], m.delta.detach()[len(short):])


def test_a_named_layer_range_is_whole_name_parts():
    """--mix input_blocks.1 is that block, not blocks 10 and 11 (SD1.5 has 12); a range takes its numbers."""
    key = "model.diffusion_model.{}.0.proj_in.weight".format
    assert shift_files.in_layer_range(key("input_blocks.1"), ["input_blocks.1"])
    assert not shift_files.in_layer_range(key("input_blocks.10"), ["input_blocks.1"])
    assert not shift_files.in_layer_range(key("output_blocks.11"), ["output_blocks.1"])
    assert shift_files.in_layer_range(key("input_blocks.10"), ["input_blocks.4-10"])
    assert not shift_files.in_layer_range(key("input_blocks.11"), ["input_blocks.4-10"])
    assert shift_files.in_layer_range("model.diffusion_model.middle_block.1.proj_in.weight", ["middle_block"])


def shift_file(path, length, fingerprint="0" * 16, rank=""):
    """A shift file of one layer's δ (1, 2, ..., length) with our metadata, written without a model."""
    save_file({"model.diffusion_model.out.2.weight": torch.arange(1.0, length + 1)}, str(path),
              metadata={"format": shift_files.FORMAT, "version": shift_files.VERSION, "family": "sd1", "subset": "all",
                        "rank": rank, "fingerprint": fingerprint})
    return str(path)


def test_info_names_a_full_rank_file_full_rank(tmp_path, capsys):
    shifts.main(["info", shift_file(tmp_path / "full.safetensors", 2)])
    assert "\n  rank: full (every singular value)\n" in capsys.readouterr().out
    shifts.main(["info", shift_file(tmp_path / "four.safetensors", 4, rank="4")])
    assert "\n  rank: 4\n" in capsys.readouterr().out


def test_files_of_two_rank_limits_combine_under_the_larger_one(tmp_path):
    two, four = shift_file(tmp_path / "a.safetensors", 2, rank="2"), shift_file(tmp_path / "b.safetensors", 4, rank="4")
    combined, meta = shift_files.combine_files([two, f"{four}:-1"])
    assert meta["rank"] == "4" and combined["model.diffusion_model.out.2.weight"].tolist() == [0, 0, -3, -4]


def test_combining_files_of_other_base_models_or_mixing_three_is_refused(tmp_path):
    two, four = shift_file(tmp_path / "a.safetensors", 2), shift_file(tmp_path / "b.safetensors", 4)
    other = shift_file(tmp_path / "c.safetensors", 2, fingerprint="1" * 16)
    with pytest.raises(ValueError, match="fingerprint .* differs"):
        shift_files.combine_files([two, other])
    with pytest.raises(ValueError, match="exactly two files"):
        shift_files.combine_files([two, four, two], mix=["output_blocks.0-5"])


def unet_file(path, blocks):
    """A shift file of one δ per named UNet layer (e.g. "output_blocks.3.0.in_layers.2"), written without a model."""
    save_file({f"model.diffusion_model.{b}.weight": torch.ones(2) for b in blocks}, str(path),
              metadata={"format": shift_files.FORMAT, "version": shift_files.VERSION, "family": "sd1", "fingerprint": "0" * 16})
    return path


def test_a_mix_range_that_matches_no_weight_is_an_error_naming_the_blocks_and_writes_nothing(tmp_path):
    a = unet_file(tmp_path / "a.safetensors", ["input_blocks.1.1.proj_in", "output_blocks.3.0.in_layers.2", "out.2"])
    b = unet_file(tmp_path / "b.safetensors", ["output_blocks.5.1.proj_out"])
    r = cli("combine", a, b, "--mix", "output_blocks.0-5", "outputblocks.0-5", "--out", tmp_path / "mix.safetensors")
    assert r.returncode == 1 and r.stdout == "" and not (tmp_path / "mix.safetensors").exists()
    assert r.stderr == ("error: --mix outputblocks.0-5 matches no weight of the files; name a range as NAME.A-B or a "
                        "dotted part of a key, from the files' blocks: unet: input_blocks.1, out.2, "
                        "output_blocks.3-5\n")


def test_a_mix_range_is_checked_from_the_files_keys_alone():
    keys = [{"model.diffusion_model.middle_block.1.proj_in.weight"},
            {"cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
             "cond_stage_model.transformer.text_model.final_layer_norm.weight"}]
    shift_files.check_mix(["middle_block", "layers.0-3", "final_layer_norm"], keys)
    shift_files.check_mix(None, keys)
    with pytest.raises(ValueError, match=r"--mix input_blocks.0-5 matches no weight .* unet: middle_block.1; "
                                         r"text_encoder: layers.3, final_layer_norm$"):
        shift_files.check_mix(["middle_block", "input_blocks.0-5"], keys)


def test_a_spec_is_a_path_and_an_optional_numeric_scale():
    for spec, path, scale in (("a.st", "a.st", 1.0), ("a.st:0.5", "a.st", 0.5), ("a.st:-1", "a.st", -1.0),
                              ("a.st:.25", "a.st", 0.25), ("a.st:1e-3", "a.st", 1e-3), ("C:/b/a.st", "C:/b/a.st", 1.0),
                              ("run:1/a.st:2", "run:1/a.st", 2.0)):
        assert shift_files.parse_spec(spec) == (Path(path), scale), spec


def test_written_files_get_the_users_usual_mode(trained, tmp_path, bpe_vocab):
    """safetensors creates its files 0600; ours get what a plain open() gives, 0666 less the umask (0002: 0664, so
    that neither 0600 nor a hard-coded 0644 passes)."""
    model, base, path = trained
    old = os.umask(0o002)
    try:
        shift_files.save_shift_file(model, tmp_path / "again.safetensors")
        exports.export_lora(model, tmp_path / "lora.safetensors", rank=2)
        cached = sd.load(base, vocab=bpe_vocab)
        fast_layer.add_spectral_shifts(cached, cache=tmp_path / "svd.safetensors", progress=False)
        exports.export_merged(model, base, tmp_path / "merged.safetensors")
    finally:
        os.umask(old)
    for name in ("again", "lora", "svd", "merged"):
        assert stat.S_IMODE((tmp_path / f"{name}.safetensors").stat().st_mode) == 0o664, name
