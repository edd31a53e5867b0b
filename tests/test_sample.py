"""sample.py gives diffusers' StableDiffusionPipeline images for the same seed; bad input is one clear line."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import shifts
import tiny

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]


def pipeline(folder, oracle):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    return StableDiffusionPipeline(vae=oracle["vae"], text_encoder=oracle["text_encoder"],
                                   tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=oracle["unet"],
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


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
    ref = (ref * 255).round().astype(np.int16)
    for i in range(3):
        ours = np.asarray(Image.open(tmp_path / "out" / f"{i:03d}.png")).astype(np.int16)
        assert np.abs(ours - ref[i]).max() <= 2, f"image {i}: max diff {np.abs(ours - ref[i]).max()}/255"
    assert (tmp_path / "out" / "grid.png").is_file()


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.mark.parametrize("args,words", [
    (["--height", "100"], "multiples of 8"),
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


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_shift_files_through_sample_equal_diffusers_on_weights_shifted_in_float64(tmp_path, bpe_vocab, family):
    """Two random δ files with scales, applied by sample.py --shifts, vs diffusers run on W_δ = U diag(ReLU(σ +
    Σ sᵢδᵢ)) Vᵀ that this test computes itself in float64 from the original-layout weights (γ + Σ sᵢδᵢ for norms)."""
    from safetensors.torch import load_file, save_file
    model_path = tmp_path / "model.safetensors"
    tiny.write_single_file(model_path, family)
    ckpt = load_file(str(model_path))
    import sd
    import svdiff
    base = sd.load(model_path, vocab=bpe_vocab)
    meta = {"format": shifts.FORMAT, "version": shifts.VERSION, "family": family, "subset": "all", "rank": "",
            "fingerprint": svdiff.fingerprint(base)}
    keys = [sd.checkpoint_key(c, n + ".weight", family) for c, n, _ in svdiff.shiftable_modules(base)]
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
    tiny.write_tokenizer_files(tmp_path / "tokenizer", bpe_vocab, family)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(tiny.json.dumps(tiny.SCHEDULER))

    sample.main(["--model", str(model_path), "--vocab", str(bpe_vocab), "--prompt", "a photo of a dog",
                 "--steps", "3", "--guidance", "7.5", "--seed", "1", "--height", "64", "--width", "64",
                 "--num-images", "2", "--device", "cpu", "--out", str(tmp_path / "out"),
                 "--shifts", f"{tmp_path / 'd0.safetensors'}:{scales[0]}", f"{tmp_path / 'd1.safetensors'}:{scales[1]}"])
    ref = pipeline(tmp_path, oracle)("a photo of a dog", num_inference_steps=3, guidance_scale=7.5, height=64,
                                     width=64, num_images_per_prompt=2, output_type="np",
                                     generator=torch.Generator("cpu").manual_seed(1)).images
    ref = (ref * 255).round().astype(np.int16)
    for i in range(2):
        ours = np.asarray(Image.open(tmp_path / "out" / f"{i:03d}.png")).astype(np.int16)
        assert np.abs(ours - ref[i]).max() <= 2, f"image {i}: max diff {np.abs(ours - ref[i]).max()}/255"


def test_default_out_is_a_new_numbered_folder_never_an_earlier_one(tmp_path):
    for name in ("000", "007", "notes"):
        (tmp_path / "out" / name).mkdir(parents=True)
    (tmp_path / "out" / "007" / "grid.png").write_text("earlier")
    assert sample.new_folder(tmp_path / "out") == tmp_path / "out" / "008"
    assert sample.new_folder(tmp_path / "out") == tmp_path / "out" / "009"
    assert sample.new_folder(tmp_path / "fresh") == tmp_path / "fresh" / "000"
    assert (tmp_path / "out" / "009").is_dir() and (tmp_path / "out" / "007" / "grid.png").read_text() == "earlier"
