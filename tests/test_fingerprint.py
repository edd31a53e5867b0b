"""The base model's fingerprint names its weights, not how they were loaded: one fingerprint for fp32, bf16 and fp16
loads of a single file and of its diffusers folder (SD1, SD2, SDXL), so a shift file trained in one precision applies
in another; another model of the same architecture (one weight changed, in the UNet or any text encoder) is refused,
through the command line too."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sd
import tiny
from support import fast_layer, fingerprint, loading, svd_cache

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# sd2: q/k/v fused in the single file, apart in the folder; sdxl: the same for bigG, whose projection is also
# transposed in the folder, and a second text encoder
@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def layouts(request, tmp_path_factory):
    """(root, family): one tiny model as a single file, as its diffusers folder (the same numbers, converted by
    diffusers) and as that folder stored in fp16."""
    from conftest import require_bpe_vocab
    root = tmp_path_factory.mktemp(request.param)
    oracle = tiny.write_single_file(root / "model.safetensors", request.param)
    tiny.save_folder(root / "folder", oracle, request.param, require_bpe_vocab())
    tiny.save_folder(root / "folder16", oracle, request.param, require_bpe_vocab(), dtype=torch.float16)
    return root, request.param


def test_one_fingerprint_for_every_load_precision_and_both_layouts(layouts, bpe_vocab):
    root, _ = layouts
    prints = {(where, dtype): fingerprint.fingerprint(sd.load(root / where, dtype=dtype, vocab=bpe_vocab))
              for where in ("model.safetensors", "folder", "folder16") for dtype in DTYPES}
    assert len(set(prints.values())) == 1, prints


@pytest.mark.parametrize("where,change", [("unet", "tensor"), ("unet", "element"), ("text", "element")])
def test_one_changed_weight_is_another_model(layouts, bpe_vocab, tmp_path, where, change):
    """"text": one weight of each text encoder in turn (SDXL: both, bigG's projection too)."""
    root, family = layouts
    ckpt = load_file(str(root / "model.safetensors"))
    if where == "unet":
        keys = [next(k for k, v in sorted(ckpt.items()) if k.startswith(loading.UNET_PREFIX) and v.ndim == 2)]
    else:
        keys = [next(k for k, v in sorted(ckpt.items()) if k.startswith(prefix) and v.ndim == 2)
                for prefix, _ in loading.TEXT_ENCODERS[family].values()]
        keys += [k for k in ckpt if k.endswith(".text_projection") and family == "sdxl"]
    base = {dtype: fingerprint.fingerprint(sd.load(root / "model.safetensors", dtype=dtype, vocab=bpe_vocab))
            for dtype in DTYPES}
    for key in keys:
        other = dict(ckpt)
        if change == "tensor":  # as another fine-tune of the same architecture would
            other[key] = ckpt[key] + 0.01 * torch.randn(ckpt[key].shape)
        else:  # one number, changed well above fp16's rounding
            other[key] = ckpt[key].clone()
            other[key][0, 0] += 0.01
        save_file(other, str(tmp_path / "other.safetensors"))
        for dtype in DTYPES:
            assert fingerprint.fingerprint(sd.load(tmp_path / "other.safetensors", dtype=dtype, vocab=bpe_vocab)) != \
                base[dtype], key


def test_svd_cache_made_from_an_fp32_load_serves_a_bf16_load(layouts, bpe_vocab, tmp_path):
    root, _ = layouts
    cache = tmp_path / "svd.safetensors"
    fast_layer.add_spectral_shifts(sd.load(root / "model.safetensors", vocab=bpe_vocab), subset="cross-attn",
                               cache=cache, progress=False)
    half = sd.load(root / "folder", dtype=torch.bfloat16)
    assert len(svd_cache.load_svd_cache(cache, half)) > 0


def test_fingerprint_of_a_model_built_in_memory_is_taken_before_weights_are_dropped(layouts, bpe_vocab):
    root, _ = layouts
    loaded = sd.load(root / "model.safetensors", vocab=bpe_vocab)
    built = sd.StableDiffusion(loaded.unet, None, loaded.text_encoder, None, loaded.family, "epsilon",
                               text_encoder_2=loaded.text_encoder_2)
    assert fingerprint.fingerprint(built) == fingerprint.fingerprint(loaded)  # digested from the weights in memory
    fast_layer.add_spectral_shifts(built, progress=False)
    fast_layer.drop_weights(built)
    assert fingerprint.fingerprint(built) == fingerprint.fingerprint(loaded)


def test_fingerprint_of_a_model_shifted_before_its_first_use_is_that_of_its_base_weights(layouts, bpe_vocab):
    """Digested only once shifts were added and trained, by drop_weights before it frees W: the wrapped weights
    under their own names, δ left out."""
    from conftest import random_deltas_
    root, _ = layouts
    loaded = sd.load(root / "model.safetensors", vocab=bpe_vocab)
    built = sd.StableDiffusion(loaded.unet, None, loaded.text_encoder, None, loaded.family, "epsilon",
                               text_encoder_2=loaded.text_encoder_2)
    fast_layer.add_spectral_shifts(built, progress=False)
    random_deltas_(built, 0)
    assert fast_layer.drop_weights(built) > 0
    assert fingerprint.fingerprint(built) == fingerprint.fingerprint(loaded)


# ---------------------------------------------------------------------------------------------------------------
# Through the commands: train in fp32 (file in fp16), sample in bf16 and fp16; another base model is refused


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import photo, require_bpe_vocab
    root = tmp_path_factory.mktemp("trained")
    tiny.write_single_file(root / "model.safetensors", "sd1")
    (root / "dog").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(photo(rng, (64, 64, 3), np.s_[16:48, 16:48], [220, 40, 40])).save(root / "dog" / f"{i}.png")
    r = run("train.py", "--images", root / "dog", "--token", "sks", "--model", root / "model.safetensors",
            "--vocab", require_bpe_vocab(), "--resolution", 64, "--steps", 4, "--lr", "5e-3", "--no-prior",
            "--sample-every", 0, "--half", "--device", "cpu", "--out", root / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    return root


def sample(root, out, *extra):
    from conftest import require_bpe_vocab
    return run("sample.py", "--model", root / "model.safetensors", "--vocab", require_bpe_vocab(), "--prompt",
               "a photo of sks dog", "--steps", 2, "--height", 64, "--width", 64, "--num-images", 1, "--device", "cpu",
               "--out", out, *extra)


def test_half_shift_file_trained_in_fp32_applies_in_bf16_and_fp16(trained):
    shift_file = trained / "run" / "shifts.safetensors"
    assert {t.dtype for t in load_file(str(shift_file)).values()} == {torch.float16}  # --half
    images = {}
    for dtype in ("fp32", "bf16", "fp16"):
        for shifted in (False, True):
            out = trained / f"sample-{dtype}-{shifted}"
            r = sample(trained, out, "--dtype", dtype, *(["--shifts", shift_file] if shifted else []))
            assert r.returncode == 0, r.stderr[-2000:]
            images[dtype, shifted] = np.asarray(Image.open(out / "000.png"), dtype=int)
    for dtype in ("fp32", "bf16", "fp16"):  # applied: the shifted image is not the base model's
        assert np.abs(images[dtype, True] - images[dtype, False]).max() > 0, dtype


def test_shift_file_on_another_base_model_is_refused_naming_force_which_applies_it(trained, tmp_path):
    ckpt = load_file(str(trained / "model.safetensors"))
    key = next(k for k in sorted(ckpt) if k.startswith(loading.UNET_PREFIX) and ckpt[k].ndim == 4)
    ckpt[key] = ckpt[key] * 1.01
    other = tmp_path / "other"
    other.mkdir()
    save_file(ckpt, str(other / "model.safetensors"))
    shift_file = trained / "run" / "shifts.safetensors"
    r = sample(other, tmp_path / "out", "--shifts", shift_file)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "different base model" in errors[0] and "--force" in errors[0] and "--model" in errors[0]
    assert not (tmp_path / "out").exists()
    r = sample(other, tmp_path / "out", "--shifts", shift_file, "--force")
    assert r.returncode == 0, r.stderr[-2000:]


def test_combine_half_writes_fp16(trained, tmp_path):
    shift_file = trained / "run" / "shifts.safetensors"
    r = run("shifts.py", "combine", f"{shift_file}:0.5", "--half", "--out", tmp_path / "half.safetensors")
    assert r.returncode == 0, r.stderr
    half, full = load_file(str(tmp_path / "half.safetensors")), load_file(str(shift_file))
    assert {t.dtype for t in half.values()} == {torch.float16}
    assert all(torch.equal(half[k], (0.5 * full[k].float()).half()) for k in full)


def test_svd_cache_made_from_a_bf16_load_is_recomputed_for_an_fp32_load(layouts, bpe_vocab, tmp_path, capsys):
    """The same weights, but the bf16 load's factors are those of the rounded W: a more precise load recomputes
    them (and keeps its own), a load as coarse or coarser uses them."""
    root, _ = layouts
    cache = tmp_path / "svd.safetensors"
    fast_layer.add_spectral_shifts(sd.load(root / "folder", dtype=torch.bfloat16), subset="cross-attn", cache=cache,
                               progress=False)
    assert svd_cache.load_svd_cache(cache, sd.load(root / "folder", dtype=torch.bfloat16))
    fp32 = sd.load(root / "folder")
    assert svd_cache.load_svd_cache(cache, fp32) == {} and "made from torch.bfloat16" in capsys.readouterr().err
    fast_layer.add_spectral_shifts(fp32, subset="cross-attn", cache=cache, progress=False)
    assert svd_cache.load_svd_cache(cache, sd.load(root / "folder", dtype=torch.float16))  # now fp32 factors
