"""Shift files of svdiff-pytorch (mkshing/svdiff-pytorch): applied by --shifts exactly as that implementation computes
them, converted to our format wherever the layers coincide, and bad files refused in one line."""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import sd
import tiny
from conftest import require_bpe_vocab
from support import apply_shifts, fast_layer, shift_files, svdiff_pytorch

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]
SHIFTED = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)  # its SVDLinear, SVDConv2d, ...


# An independent re-implementation of svdiff-pytorch's layers, on the diffusers / transformers models: every
# weight W (a conv kernel as c_out x c_in·kh·kw, a norm's γ as 1 x C) is W' = U diag(ReLU(σ + s·δ)) Vᵀ.

def their_matrix(W):
    return W.reshape(1, -1) if W.ndim == 1 else W.flatten(1)


def their_files(oracle, folder, seed=0):
    """spectral_shifts.safetensors and spectral_shifts_te.safetensors as its training writes them: one random δ per
    shifted module, keyed by the module path + '.delta' (transformers' CLIPTextModel under 'text_model.')."""
    g = torch.Generator().manual_seed(seed)
    for part, prefix, name in (("unet", "", "spectral_shifts"), ("text_encoder", "text_model.", "spectral_shifts_te")):
        deltas = {}
        for n, m in oracle[part].named_modules():
            if isinstance(m, SHIFTED):
                M = their_matrix(m.weight.detach())
                r = min(M.shape)  # δ about half the size of the typical σ: some σ + δ < 0, clipped by the ReLU
                deltas[f"{prefix}{n}.delta"] = torch.randn(r, generator=g) * 0.5 * M.norm() / r ** 0.5
        save_file(deltas, str(folder / f"{name}.safetensors"))
    return folder / "spectral_shifts.safetensors"


def their_model(oracle, path, scale=1.0, skip=()):
    """The diffusers models with svdiff-pytorch's W' in every shifted module (but those whose key contains `skip`)."""
    deltas = load_file(str(path)) | load_file(str(path).replace(".safetensors", "_te.safetensors"))
    out = {part: copy.deepcopy(oracle[part]) for part in ("unet", "text_encoder")}
    with torch.no_grad():
        for part, prefix in (("unet", ""), ("text_encoder", "text_model.")):
            for n, m in out[part].named_modules():
                key = f"{prefix}{n}.delta"
                if isinstance(m, SHIFTED) and not any(s in key for s in skip):
                    U, S, Vh = torch.linalg.svd(their_matrix(m.weight).double(), full_matrices=False)
                    W = (U * torch.relu(S + scale * deltas[key].double())) @ Vh
                    m.weight.copy_(W.reshape(m.weight.shape))
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def outputs(unet, text_encoder, diffusers):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, tiny.TEXT_WIDTH, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        if diffusers:
            return unet(x, 7, ctx).sample, text_encoder(ids).last_hidden_state
        return unet(x, 7, ctx), text_encoder(ids)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def files(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    oracle = tiny.write_single_file(tmp / "base.safetensors", family)
    (tmp / "run").mkdir()
    return family, tmp / "base.safetensors", oracle, their_files(oracle, tmp / "run")


def test_their_file_through_shifts_equals_their_forward(files):
    """--shifts FILE:SCALE with the _te file beside it: W' = U diag(ReLU(σ + s·δ)) Vᵀ, norms as 1 x C, and SD2's text
    q/k/v as their three matrices (one fused in_proj in ours)."""
    family, base, oracle, path = files
    model = sd.load(base, vocab=require_bpe_vocab())
    with pytest.warns(UserWarning, match="fingerprint"):
        apply_shifts.apply_shift_files(model, [f"{path}:0.7"])
    ref = their_model(oracle, path, scale=0.7)
    ours, theirs = outputs(model.unet, model.text_encoder, False), outputs(ref["unet"], ref["text_encoder"], True)
    errors = rel(ours[0], theirs[0]), rel(ours[1], theirs[1])
    assert max(errors) <= 1e-5, errors
    plain = outputs(oracle["unet"], oracle["text_encoder"], True)  # and the shifts did something, everywhere
    assert rel(plain[0], theirs[0]) > 1e-2 and rel(plain[1], theirs[1]) > 1e-2


def test_converted_file_gives_their_outputs_where_conversion_is_exact(files, tmp_path):
    family, base, oracle, path = files
    r = subprocess.run([sys.executable, str(ROOT / "shifts.py"), "convert", str(path), "--model", str(base),
                        "--vocab", str(require_bpe_vocab()), "--out", str(tmp_path / "ours.safetensors")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    tensors, meta = shift_files.read_shift_file(tmp_path / "ours.safetensors")
    assert meta["format"] == shift_files.FORMAT and meta["family"] == family and meta["fingerprint"]
    assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in tensors)
    model = sd.load(base, vocab=require_bpe_vocab())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own file now: its fingerprint is this model's
        apply_shifts.apply_shift_files(model, [str(tmp_path / "ours.safetensors")])
    if family == "sd1":
        assert "warning" not in r.stderr
        ref = their_model(oracle, path)
    else:  # SD2's q/k/v: one fused matrix in our format, left out and named
        layers = tiny.text_config("sd2").num_hidden_layers
        assert f"warning: {3 * layers} layers" in r.stderr and "q/k/v" in r.stderr and "--shifts" in r.stderr
        assert not any("in_proj" in k for k in tensors)
        ref = their_model(oracle, path, skip=("q_proj", "k_proj", "v_proj"))
    ours, theirs = outputs(model.unet, model.text_encoder, False), outputs(ref["unet"], ref["text_encoder"], True)
    errors = rel(ours[0], theirs[0]), rel(ours[1], theirs[1])
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("files", ["sd2"], indirect=True)
def test_sd2_text_qkv_shifted_by_both_kinds_of_file_is_refused(files, tmp_path):
    """Ours shifts the fused in_proj's singular values, theirs those of its q/k/v blocks: no sum of the two is
    either."""
    _, base, _, path = files
    model = sd.load(base, vocab=require_bpe_vocab())
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    fast_layer.add_spectral_shifts(model, names={shift_files.names_by_key(model)[key]}, progress=False)
    shift_files.save_shift_file(model, tmp_path / "ours.safetensors")
    with pytest.raises(ValueError, match="in_proj_weight: shifted by an svdiff shift file and, as q/k/v"):
        apply_shifts.apply_shift_files(sd.load(base, vocab=require_bpe_vocab()),
                                 [str(tmp_path / "ours.safetensors"), str(path)])


def test_norm_delta_is_one_number_on_the_1xC_matrix(tmp_path):
    """A norm's δ is the shift of γ's one singular value ‖γ‖: γ' = ReLU(‖γ‖ + s·δ)·γ/‖γ‖, below zero γ' = 0."""
    gamma = torch.tensor([3.0, -4.0])  # ‖γ‖ = 5
    assert torch.allclose(svdiff_pytorch.svdiff_pytorch_weight(gamma, torch.tensor([1.0])), gamma * 6 / 5)
    assert torch.equal(svdiff_pytorch.svdiff_pytorch_weight(gamma, torch.tensor([-7.0])), torch.zeros(2))


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.mark.parametrize("case", ["neither", "te-alone", "other-architecture"])
def test_bad_files_are_one_line(files, tmp_path, case):
    family, base, oracle, path = files
    if case == "neither":
        bad = tmp_path / "bad.safetensors"
        save_file({"some.layer.lora_down.weight": torch.zeros(2, 2)}, str(bad))
        words = "keys of neither"
    elif case == "te-alone":
        bad = path.with_name("spectral_shifts_te.safetensors")
        words = "pass its UNet file"
    else:  # a file made on the other family's model
        other = "sd2" if family == "sd1" else "sd1"
        bad = their_files(dict(unet=tiny._oracle_unet(other), text_encoder=tiny._oracle_text(other)), tmp_path)
        words = "another architecture"
    out = tmp_path / "out"
    r = run("sample.py", "--model", base, "--vocab", require_bpe_vocab(), "--prompt", "x", "--steps", "1",
            "--height", "64", "--width", "64", "--num-images", "1", "--device", "cpu", "--out", out, "--shifts", bad)
    assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists(), r.stderr
    r = run("shifts.py", "convert", bad, "--model", base, "--vocab", require_bpe_vocab(), "--out", out)
    assert r.returncode == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
