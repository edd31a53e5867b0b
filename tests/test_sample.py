"""sample.py gives diffusers' StableDiffusionPipeline images for the same seed; bad input is one clear line."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
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
