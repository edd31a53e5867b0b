"""sample.py gives diffusers' StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) images for the same seed, with
shift files too; bad input is one clear line."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sd
import tiny
from support import fast_layer, fast_svd, fingerprint, loading, shift_files

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]


def pipeline(folder, oracle):
    """diffusers' pipeline of the oracle models with the tokenizers in `folder` and DDIM from its scheduler config
    (SDXL's is EulerDiscrete's: DDIM made from it, as a diffusers user would make it)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    if "text_encoder_2" in oracle:
        return StableDiffusionXLPipeline(**oracle, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                                         tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
                                         scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusionPipeline(vae=oracle["vae"], text_encoder=oracle["text_encoder"],
                                   tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=oracle["unet"],
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def assert_images_equal(out, ref):
    """Our PNGs in `out` against the pipeline's images in [0, 1]: at most 2/255 apart."""
    ref = (ref * 255).round().astype(np.int16)
    for i in range(len(ref)):
        ours = np.asarray(Image.open(out / f"{i:03d}.png")).astype(np.int16)
        assert ours.shape == ref[i].shape and np.abs(ours - ref[i]).max() <= 2, \
            f"image {i}: max diff {np.abs(ours - ref[i]).max()}/255"


@pytest.mark.parametrize("family", ["sd1", "sd2"])  # sd2: v-prediction
@pytest.mark.parametrize("eta,guidance", [(0.0, 7.5), (0.5, 1.0), (0.5, 7.5)])
def test_images_equal_stable_diffusion_pipeline(tmp_path, bpe_vocab, family, eta, guidance):
    folder = tmp_path / "model"
    oracle = tiny.write_folder(folder, family, bpe_vocab)
    prompt, negative = "a photo of an astronaut riding a horse", "blurry"
    sample.main(["--model", str(folder), "--prompt", prompt, "--negative-prompt", negative, "--steps", "4",
                 "--guidance", str(guidance), "--eta", str(eta), "--seed", "3", "--height", "64", "--width", "64",
                 "--num-images", "3", "--device", "cpu", "--out", str(tmp_path / "out")])
    pipe = pipeline(folder, oracle)
    ref = pipe(prompt, negative_prompt=negative if guidance > 1 else None, num_inference_steps=4,
               guidance_scale=guidance, eta=eta, height=64, width=64, num_images_per_prompt=3, output_type="np",
               generator=torch.Generator("cpu").manual_seed(3)).images
    assert_images_equal(tmp_path / "out", ref)
    assert (tmp_path / "out" / "grid.png").is_file()


def sdxl_model(tmp_path, bpe_vocab, layout):
    """(what --model takes, the folder with the tokenizers and scheduler config, the oracle) of a tiny SDXL."""
    if layout == "folder":
        return tmp_path / "model", tmp_path / "model", tiny.write_sdxl_folder(tmp_path / "model", bpe_vocab)
    oracle = tiny.write_sdxl_single_file(tmp_path / "sd_xl.safetensors")
    tiny.write_sdxl_tokenizers(tmp_path, bpe_vocab)  # the pipeline's; ours come from the shipped vocabulary
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny.SDXL_SCHEDULER))
    return tmp_path / "sd_xl.safetensors", tmp_path, oracle


@pytest.mark.parametrize("layout", ["single file", "folder"])
@pytest.mark.parametrize("eta,guidance,negative,sizes", [
    (0.0, 7.5, "", None),  # no negative prompt: zeros, as the pipeline's negative_prompt=None (images 64 x 96:
                           # (h, w) everywhere)
    (0.5, 1.0, "", None),
    (0.5, 5.0, "blurry", ((96, 128), (16, 8), (64, 48))),  # a negative prompt; micro-conditioning flags
])
def test_sdxl_images_equal_stable_diffusion_xl_pipeline(tmp_path, bpe_vocab, layout, eta, guidance, negative, sizes):
    model, folder, oracle = sdxl_model(tmp_path, bpe_vocab, layout)
    prompt = "a photo of an astronaut riding a horse"  # no "!": diffusers' tokenizer_2 reads it as id 0, ours as
                                                      # open_clip does (test_sdxl.py)
    flags = [f for name, pair in zip(("--original-size", "--crops-coords-top-left", "--target-size"), sizes or ())
             for f in (name, *map(str, pair))]
    sample.main(["--model", str(model), "--vocab", str(bpe_vocab), "--prompt", prompt, "--negative-prompt", negative,
                 "--steps", "4", "--guidance", str(guidance), "--eta", str(eta), "--seed", "3", "--height", "64",
                 "--width", "96", "--num-images", "2", "--device", "cpu", "--out", str(tmp_path / "out"), *flags])
    micro = dict(zip(("original_size", "crops_coords_top_left", "target_size"), sizes)) if sizes else {}
    ref = pipeline(folder, oracle)(prompt, negative_prompt=negative or None, num_inference_steps=4,
                                   guidance_scale=guidance, eta=eta, height=64, width=96, num_images_per_prompt=2,
                                   output_type="np", generator=torch.Generator("cpu").manual_seed(3), **micro).images
    assert_images_equal(tmp_path / "out", ref)
    config = json.loads((tmp_path / "out" / "sample_config.json").read_text())
    assert (config["original_size"], config["crops_coords_top_left"], config["target_size"]) == \
        tuple(list(p) for p in sizes or ((64, 96), (0, 0), (64, 96)))  # (h, w), as the pipeline's defaults


def test_default_size_is_the_models_and_micro_conditioning_is_sdxls(tmp_path, bpe_vocab, monkeypatch):
    """--height/--width default to 512 (SD 1.x/2.x) or 1024 (SDXL), from the model's family; the size flags of
    SDXL's label_emb are refused for a model without one, before the model is loaded or anything is written."""
    a = sample.parse_args(["--prompt", "p", "--crops-coords-top-left", "8", "0"])
    sample.resolve_sizes(a, "sdxl")
    assert (a.height, a.width, a.original_size, a.crops_coords_top_left, a.target_size) == \
        (1024, 1024, [1024, 1024], [8, 0], [1024, 1024])
    a = sample.parse_args(["--prompt", "p", "--height", "512", "--width", "768"])  # (h, w) pairs, as diffusers'
    sample.resolve_sizes(a, "sdxl")
    assert (a.original_size, a.crops_coords_top_left, a.target_size) == ([512, 768], [0, 0], [512, 768])
    for family in ("sd1", "sd2"):
        a = sample.parse_args(["--prompt", "p", "--width", "640"])
        sample.resolve_sizes(a, family)
        assert (a.height, a.width, a.original_size, a.target_size) == (512, 640, None, None)
    model = tmp_path / "m.safetensors"
    tiny.write_single_file(model, "sd1")
    monkeypatch.setattr(sd, "load", lambda *args, **kwargs: pytest.fail("loaded before the flags were checked"))
    with pytest.raises(ValueError, match="--original-size: SDXL's micro-conditioning, but the model is sd1"):
        sample.main(["--model", str(model), "--prompt", "x", "--original-size", "64", "64", "--device", "cpu"])
    monkeypatch.undo()
    r = run_cli("--model", str(model), "--prompt", "x", "--target-size", "64", "64", "--out", str(tmp_path / "out"),
                "--device", "cpu")
    assert r.returncode == 1 and "--target-size: SDXL's micro-conditioning, but the model is sd1" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A tiny SD1 folder and a shift file of random δ on its cross-attention k/v."""
    from conftest import tiny_model_folder
    root = tiny_model_folder(tmp_path_factory, "sample")
    model = sd.load(root / "model")
    fast_layer.add_spectral_shifts(model, subset="cross-attn-kv", progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in shift_files.shifts_by_key(model):
            m.delta.copy_(torch.randn(m.delta.shape, generator=g) * m.sigma.mean())
    shift_files.save_shift_file(model, root / "shifts.safetensors", subset="cross-attn-kv")
    return root


def run_sample(root, out, *extra):
    sample.main(["--model", str(root / "model"), "--prompt", "a photo of a dog", "--steps", "2", "--height", "64",
                 "--width", "64", "--device", "cpu", "--out", str(out), *map(str, extra)])
    return [np.asarray(Image.open(p), dtype=int) for p in sorted(out.glob("[0-9][0-9][0-9].png"))]


def test_smaller_batches_give_the_images_of_one_batch_at_eta_0(shifted, tmp_path):
    """Only float rounding differs (batched GEMMs sum in another order): ~2e-5 before rounding, so a pixel may
    round the other way, by 1/255. Other latents would differ everywhere."""
    whole = run_sample(shifted, tmp_path / "whole", "--num-images", 3)
    batched = run_sample(shifted, tmp_path / "batched", "--num-images", 3, "--batch-size", 2)
    assert len(whole) == len(batched) == 3
    for i, (a, b) in enumerate(zip(whole, batched)):
        assert np.abs(a - b).max() <= 1, f"image {i}: max diff {np.abs(a - b).max()}/255"
    assert np.abs(whole[0] - whole[1]).max() > 10  # the images differ from each other: the test can tell them apart


def test_sample_config_holds_the_resolved_arguments(shifted, tmp_path):
    run_sample(shifted, tmp_path / "out", "--num-images", 2, "--seed", 7, "--shifts", shifted / "shifts.safetensors")
    config = json.loads((tmp_path / "out" / "sample_config.json").read_text())
    assert set(config) == set(vars(sample.parse_args(["--model", "m", "--prompt", "p", "--out", "o"])))  # every flag
    assert config["prompt"] == "a photo of a dog" and config["seed"] == 7 and config["num_images"] == 2
    assert config["shifts"] == [str(shifted / "shifts.safetensors")]
    # the defaults that depend on the device, the model or other flags, as they were used
    assert config["dtype"] == "fp32" and config["batch_size"] == 2 and config["prediction_type"] == "epsilon"


def test_svd_cache_is_written_by_the_first_shifts_run_and_reused_by_the_next(shifted, tmp_path, monkeypatch):
    calls = []
    svd = fast_svd.svd
    monkeypatch.setattr(fast_svd, "svd", lambda w: calls.append(1) or svd(w))
    cache = tmp_path / "svd.safetensors"
    args = ["--num-images", 1, "--shifts", shifted / "shifts.safetensors", "--svd-cache", cache]
    first = run_sample(shifted, tmp_path / "first", *args)
    assert cache.is_file() and len(calls) > 0
    calls.clear()
    again = run_sample(shifted, tmp_path / "again", *args)
    assert calls == []  # every factor came from the cache
    assert np.array_equal(first[0], again[0])


def test_one_image_is_counted_as_one(shifted, tmp_path, capsys):
    run_sample(shifted, tmp_path / "out", "--num-images", 1, "--steps", 1)
    assert f"wrote 1 image and grid.png to {tmp_path / 'out'}" in capsys.readouterr().out


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.mark.parametrize("args,words", [
    (["--height", "100"], "--height must be a positive multiple of 8"),
    (["--width", "0"], "--width must be a positive multiple of 8"),
    (["--original-size", "0", "64"], "--original-size takes two positive numbers"),
    (["--crops-coords-top-left", "-1", "0"], "--crops-coords-top-left takes two non-negative numbers"),
    (["--steps", "0"], "between 1 and 1000"),
    (["--steps", "1001"], "between 1 and 1000"),
])
def test_bad_arguments_are_one_clear_line(tmp_path, args, words):
    out = tmp_path / "out"
    r = run_cli("--model", str(tmp_path), "--prompt", "x", "--out", str(out), *args)
    assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_single_file_without_vocabulary_and_unwritable_out(tmp_path):
    model = tmp_path / "m.safetensors"
    tiny.write_single_file(model, "sd1")
    r = run_cli("--model", str(model), "--prompt", "x", "--out", str(tmp_path / "out"), "--vocab",
                str(tmp_path / "missing.gz"), "--device", "cpu")
    assert r.returncode == 1 and "vocab" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = run_cli("--model", str(model), "--prompt", "x", "--out", str(model / "sub"), "--device", "cpu")
    assert r.returncode == 1 and "not writable" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_shift_files_through_sample_equal_diffusers_on_weights_shifted_in_float64(tmp_path, bpe_vocab, family):
    """Two random δ files with scales, applied by sample.py --shifts, vs diffusers run on W_δ = U diag(ReLU(σ +
    Σ sᵢδᵢ)) Vᵀ that this test computes itself in float64 from the original-layout weights (γ + Σ sᵢδᵢ for norms).
    SD2 and SDXL's bigG: the fused q/k/v `in_proj_weight` is one matrix, as in the file; SDXL: both text encoders."""
    from safetensors.torch import load_file, save_file
    model_path = tmp_path / "model.safetensors"
    tiny.write_single_file(model_path, family)
    ckpt = load_file(str(model_path))
    import sd
    import svdiff
    base = sd.load(model_path, vocab=bpe_vocab)
    meta = {"format": shift_files.FORMAT, "version": shift_files.VERSION, "family": family, "subset": "all", "rank": "",
            "fingerprint": fingerprint.fingerprint(base)}
    keys = [shift_files.key_of(base, n) for n, _ in svdiff.shiftable_modules(base)]
    assert {loading.split_checkpoint_key(k, family)[0] for k in keys} == \
        {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    g = torch.Generator().manual_seed(5)
    files, scales = [], [0.7, -0.4]
    for i in range(2):
        deltas = {}
        for k in keys:
            w = ckpt[k].double()
            size = w.shape[0] if w.ndim == 1 else min(w.shape[0], w[0].numel())
            deltas[k] = torch.randn(size, generator=g) * (0.05 if w.ndim == 1 else 0.3 * w.flatten(1).norm().item() / size ** 0.5)
        save_file(deltas, str(tmp_path / f"d{i}.safetensors"), metadata=meta)
        files.append(deltas)
    shifted = dict(ckpt)
    for k in keys:
        d = sum(s * f[k].double() for s, f in zip(scales, files))
        w = ckpt[k].double()
        if w.ndim == 1:
            shifted[k] = (w + d).float()
            continue
        U, S, Vh = torch.linalg.svd(w.flatten(1), full_matrices=False)
        shifted[k] = ((U * torch.relu(S + d)) @ Vh).reshape(w.shape).float()
    oracle = tiny.oracle_from_checkpoint(shifted, family)
    if family == "sdxl":
        tiny.write_sdxl_tokenizers(tmp_path, bpe_vocab)
    else:
        tiny.write_tokenizer_files(tmp_path / "tokenizer", bpe_vocab, family)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        tiny.json.dumps(tiny.SDXL_SCHEDULER if family == "sdxl" else tiny.SCHEDULER))

    sample.main(["--model", str(model_path), "--vocab", str(bpe_vocab), "--prompt", "a photo of a dog",
                 "--steps", "3", "--guidance", "7.5", "--seed", "1", "--height", "64", "--width", "64",
                 "--num-images", "2", "--device", "cpu", "--out", str(tmp_path / "out"),
                 "--shifts", f"{tmp_path / 'd0.safetensors'}:{scales[0]}", f"{tmp_path / 'd1.safetensors'}:{scales[1]}"])
    ref = pipeline(tmp_path, oracle)("a photo of a dog", num_inference_steps=3, guidance_scale=7.5, height=64,
                                     width=64, num_images_per_prompt=2, output_type="np",
                                     generator=torch.Generator("cpu").manual_seed(1)).images
    assert_images_equal(tmp_path / "out", ref)


def test_default_out_is_a_new_numbered_folder_never_an_earlier_one(tmp_path):
    for name in ("000", "007", "notes"):
        (tmp_path / "out" / name).mkdir(parents=True)
    (tmp_path / "out" / "007" / "grid.png").write_text("earlier")
    assert sample.new_folder(tmp_path / "out") == tmp_path / "out" / "008"
    assert sample.new_folder(tmp_path / "out") == tmp_path / "out" / "009"
    assert sample.new_folder(tmp_path / "fresh") == tmp_path / "fresh" / "000"
    assert (tmp_path / "out" / "009").is_dir() and (tmp_path / "out" / "007" / "grid.png").read_text() == "earlier"
