"""edit.py: DDIM inversion maths, parity with diffusers' schedulers on a tiny UNet, and the command end to end."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import ddim
import edit
import sd
import svdiff
import tiny
from support import edit_args, shift_files

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]
A = ddim.alphas_cumprod()
EXACT = 1e-5  # docs/usage.md's bound on the inversion round trip of an exact model


# ---------------------------------------------------------------------------------------------------------------
# Inversion maths (the fake models are exact, so what is measured is the loops themselves)


def perfect_denoiser(z0, prediction_type):
    """The exact model of a data set holding one point z0: ε(z, t) = (z - √ᾱ_t z0) / √(1-ᾱ_t) (or its v)."""
    def model(z, t):
        eps = (z - A[t].sqrt() * z0) / (1 - A[t]).sqrt()
        return eps if prediction_type == "epsilon" else A[t].sqrt() * eps - (1 - A[t]).sqrt() * z0
    return model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 200, 1000])
def test_inversion_then_sampling_returns_the_data_point_of_an_exact_model(steps, prediction_type):
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))  # SD latents are ~unit scale
    model = perfect_denoiser(z0, prediction_type)
    z_T = svdiff.ddim_invert(model, z0, steps, A, prediction_type, progress=False)
    # the exact ODE path from z0 (sampling ends at ᾱ_0, so inversion starts there): √ᾱ_t z0 + √(1-ᾱ_t) ε*
    eps = (1 - A[0].sqrt()) / (1 - A[0]).sqrt() * z0
    T = ddim.timesteps(steps)[0]
    assert (z_T - (A[T].sqrt() * z0 + (1 - A[T]).sqrt() * eps)).abs().max() <= 1e-4
    back = ddim.sample(model, z_T, steps, A, prediction_type=prediction_type, progress=False)
    assert (back - z0).abs().max() <= EXACT  # float32 rounding only (docs/usage.md: measured ≤ 2.6e-6)


def test_evaluating_the_model_one_step_ahead_as_diffusers_pipelines_do_is_not_exact():
    """The other convention (model at the target level, the latent still at the source) is first-order accurate
    only: on the same unit-scale latents the round trip misses z0 by 100x the exact bound or more (docs/usage.md:
    4e-2, 1.4e-2, 5e-3), less with more steps."""
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = perfect_denoiser(z0, "epsilon")
    errors = [(ddim.sample(model, svdiff.ddim_invert(model, z0, n, A, progress=False, model_at="target"), n, A,
                           progress=False) - z0).abs().max().item() for n in (10, 50, 200)]
    assert errors[2] > 100 * EXACT and errors[2] < errors[1] < errors[0], errors


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers on a real tiny UNet


@pytest.fixture(scope="module", params=["sd1", "sd2"])  # sd2: v-prediction
def tiny_model(request, tmp_path_factory):
    from conftest import require_bpe_vocab
    folder = tmp_path_factory.mktemp(request.param) / "model"
    return folder, tiny.write_folder(folder, request.param, require_bpe_vocab())


@pytest.mark.parametrize("eta,model_at", [(0.0, "source"), (0.5, "source"), (0.0, "target")])
def test_inversion_and_sampling_equal_diffusers_schedulers(tiny_model, eta, model_at):
    """edit.py's image -> z* -> z_T -> edited image equals diffusers' AutoencoderKL, DDIMInverseScheduler (built
    from SD's scheduler config, as diffusers' SD pipelines build it) and StableDiffusionPipeline with DDIMScheduler
    on the same tiny UNet, driven at the source level of each inversion step (our default) or one step ahead at
    the target level (diffusers' pipelines). Each stage starts from the same input: a random UNet is no
    consistent denoiser, and its inversion amplifies a 1e-8 difference in z* some 500-fold over 8 steps."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    folder, oracle = tiny_model
    model = sd.load(folder)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompt, steps = "a photo of a cat wearing a hat", 8
    a = SimpleNamespace(slerp=None, sample_steps=steps, guidance=3.0, eta=eta, resolution=64)

    z = edit.encode_image(model, image)
    z_T = edit.invert(model, z, prompt, steps, model_at, progress=False)
    ours = edit.edit_image(model, z_T, prompt, 5, a, progress=False)

    pipe = StableDiffusionPipeline(vae=oracle["vae"], text_encoder=oracle["text_encoder"], unet=oracle["unet"],
                                   tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                                   scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref_z = pipe.vae.encode(image[None]).latent_dist.mean * pipe.vae.config.scaling_factor
        context = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
        inverse.set_timesteps(steps)
        ref_T = z.clone()
        for t in inverse.timesteps:
            at = max(int(t) - 1000 // steps, 0) if model_at == "source" else t
            ref_T = inverse.step(pipe.unet(ref_T, at, context).sample, t, ref_T).prev_sample
        kw = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=3.0, eta=eta, height=64, width=64)
        ref_latents = pipe(latents=z_T.clone(), generator=torch.Generator().manual_seed(5), output_type="latent",
                           **kw).images
        ref = pipe.image_processor.postprocess(pipe.vae.decode(ref_latents / pipe.vae.config.scaling_factor).sample,
                                               output_type="pt")
        # our sampled latents: sd.text_to_image's loop (it returns only the decoded image), stopped before decoding
        both = sd.encode_negative(model, "", 1).cat(sd.encode_prompts(model, [prompt]))
        denoise = lambda x, t: ddim.guidance(*model.unet(torch.cat([x, x]), t, *both).chunk(2), 3.0)
        latents = ddim.sample(denoise, z_T, steps, A, eta, torch.Generator().manual_seed(5), model.prediction_type,
                              progress=False)

    assert (z - ref_z).abs().max() <= 1e-5
    assert (z_T - ref_T).abs().max() <= 1e-5
    assert (latents - ref_latents).abs().max() <= 1e-5
    assert (ours - ref).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import photo, tiny_model_folder
    root = tiny_model_folder(tmp_path_factory, "edit")
    rng = np.random.default_rng(0)
    Image.fromarray(photo(rng, (72, 96, 3), np.s_[20:50, 30:70], [220, 40, 40])).save(root / "cat.png")
    (root / "cat.txt").write_text("a caption that --prompt must win over")
    return root


def run(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "edit.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})})


def common(setup, out, *extra):
    return ["--image", setup / "cat.png", "--prompt", "a photo of a {cat}", "--edit", "a photo of a cat wearing a hat",
            "--edit", "a dog", "--model", setup / "model", "--resolution", 64, "--steps", 2, "--sample-steps", 2,
            "--out", out, *extra]


EDITS = ["edit00_a-photo-of-a-cat-wearing-a-hat_seed0.png", "edit00_a-photo-of-a-cat-wearing-a-hat_seed3.png",
         "edit01_a-dog_seed0.png", "edit01_a-dog_seed3.png"]


@pytest.fixture(scope="module")
def trained(setup):
    out = setup / "trained"
    r = run(*common(setup, out, "--seed", 0, 3, "--eta", 0.5, "--svd-cache", setup / "svd.safetensors"))
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def test_edit_fine_tunes_then_writes_shifts_one_image_per_edit_and_seed_and_a_comparison(trained, setup):
    out, _ = trained
    assert sorted(p.name for p in out.iterdir()) == sorted(
        EDITS + ["comparison.png", "config.json", "edit_config.json", "log.jsonl", "resume.pt", "shifts.safetensors"])
    assert all(Image.open(out / name).size == (64, 64) for name in EDITS)
    rows, cols = 2, 3  # one row per seed: the input, then the two edits, each with its prompt under it
    w, h = Image.open(out / "comparison.png").size
    assert w == cols * 64 and h > rows * 64
    # fine-tuned on the literal prompt (not the .txt caption), no prior, text encoder included
    config = json.loads((out / "config.json").read_text())
    assert config["prior_weight"] == 0 and config["subset"] == "all" and config["no_captions"]
    assert config["instance_prompt"].format() == "a photo of a {cat}" and config["steps"] == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    tensors, _ = shift_files.read_shift_file(out / "shifts.safetensors")
    assert any(k.startswith("cond_stage_model.") for k in tensors) and any(t.abs().max() > 0 for t in tensors.values())
    edit_config = json.loads((out / "edit_config.json").read_text())
    assert edit_config["inversion_steps"] == 2 and edit_config["seed"] == [0, 3]
    # η > 0: the seeds give different images
    assert np.asarray(Image.open(out / EDITS[0])).tolist() != np.asarray(Image.open(out / EDITS[1])).tolist()


def test_rerun_with_shifts_skips_fine_tuning_and_gives_the_same_edits(trained, setup):
    first, _ = trained
    out = setup / "reused"
    r = run(*common(setup, out, "--seed", 0, 3, "--eta", 0.5, "--shifts", first / "shifts.safetensors",
                    "--svd-cache", setup / "svd.safetensors"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train:" not in r.stderr  # no training bar (and, below, no log.jsonl)
    assert sorted(p.name for p in out.iterdir()) == sorted(EDITS + ["comparison.png", "edit_config.json",
                                                                    "shifts.safetensors"])
    assert (out / "shifts.safetensors").read_bytes() == (first / "shifts.safetensors").read_bytes()
    for name in EDITS:  # the trained model merged in memory == the base model with the saved shifts merged
        diff = np.abs(np.asarray(Image.open(out / name), dtype=int) - np.asarray(Image.open(first / name), dtype=int))
        assert diff.max() <= 1, name


def edits(setup, trained, out, *extra):
    """In-process edit.py with the trained shifts (no fine-tuning) and one edit: {seed: image} for seeds 0 and 3."""
    first, _ = trained
    edit.main(list(map(str, ["--image", setup / "cat.png", "--prompt", "a photo of a cat", "--edit", "a dog",
                             "--model", setup / "model", "--resolution", 64, "--sample-steps", 2, "--seed", 0, 3,
                             "--shifts", first / "shifts.safetensors", "--svd-cache", setup / "svd.safetensors",
                             "--out", out, *extra])))
    return {s: np.asarray(Image.open(out / edit.output_name(0, "a dog", s)), dtype=int) for s in (0, 3)}


@pytest.fixture(scope="module")
def plain(setup, trained):
    """η = 0, no slerp, inversion: docs/usage.md's deterministic case."""
    return edits(setup, trained, setup / "plain")


def test_without_eta_slerp_or_noise_every_seed_gives_the_same_edit(plain):
    assert np.array_equal(plain[0], plain[3])


def test_slerp_0_is_no_slerp_and_slerp_mixes_in_each_seeds_noise(setup, trained, plain, tmp_path):
    zero = edits(setup, trained, tmp_path / "zero", "--slerp", 0)
    assert all(np.abs(zero[s] - plain[s]).max() <= 1 for s in (0, 3))  # slerp(0, z_T, ε) = z_T up to rounding
    half = edits(setup, trained, tmp_path / "half", "--slerp", 0.5)
    assert np.abs(half[0] - plain[0]).mean() > 5 and np.abs(half[0] - half[3]).mean() > 5


def test_no_inversion_starts_from_each_seeds_noise(setup, trained, plain, tmp_path):
    noise = edits(setup, trained, tmp_path / "noise", "--no-inversion")
    assert np.abs(noise[0] - plain[0]).mean() > 5 and np.abs(noise[0] - noise[3]).mean() > 5


def test_each_edit_is_inverted_on_its_own_prompt_with_the_inversion_flags(setup, trained, tmp_path, monkeypatch):
    """Eq. 6: z_T is inverted conditioned on the TARGET prompt of each edit, not the input's --prompt, with
    --inversion-steps (not --sample-steps) and --inversion-model-at."""
    calls = []
    real = edit.invert
    monkeypatch.setattr(edit, "invert", lambda model, z, prompt, steps, model_at="source", **kw:
                        calls.append((prompt, steps, model_at)) or real(model, z, prompt, steps, model_at, **kw))
    first, _ = trained
    edit.main(list(map(str, ["--image", setup / "cat.png", "--prompt", "a photo of a cat", "--edit", "a dog",
                             "--edit", "a cat in a hat", "--model", setup / "model", "--resolution", 64,
                             "--sample-steps", 2, "--inversion-steps", 3, "--inversion-model-at", "target",
                             "--shifts", first / "shifts.safetensors", "--svd-cache", setup / "svd.safetensors",
                             "--out", tmp_path / "out"])))
    assert calls == [("a dog", 3, "target"), ("a cat in a hat", 3, "target")]
    assert json.loads((tmp_path / "out" / "edit_config.json").read_text())["inversion_steps"] == 3


@pytest.mark.parametrize("flag,good,bad", [
    ("--sample-steps", ["1", "1000"], ["0", "1001"]),
    ("--inversion-steps", ["1", "1000"], ["0", "1001"]),
    ("--slerp", ["0", "1"], ["-0.1", "1.1"]),
    ("--eta", ["0"], ["-0.1"]),
    ("--seed", ["0"], ["-1"]),
])
def test_each_flags_bounds_are_accepted_and_one_past_them_refused(setup, tmp_path, flag, good, bad):
    resolve = lambda value: edit.resolve(edit_args.parse(list(map(str, common(setup, tmp_path / "out")))
                                                         + [f"{flag}={value}"]))
    for value in good:
        resolve(value)
    for value in bad:
        with pytest.raises(ValueError, match=flag):
            resolve(value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,words", [
    ("missing image", "no such folder or image file"),
    ("unreadable image", "cannot be read as an image"),
    ("folder as image", "is a folder; edit.py edits one photo"),
    ("empty prompt", "--prompt is empty"),
    ("empty edit", "--edit prompt is empty"),
    ("no edit", "no --edit"),
    ("model neither a path nor a Hub id", "not a Hugging Face Hub id"),
    ("resolution", "multiple of 8"),
    ("unwritable out", "not writable"),
    ("existing out", "--overwrite"),
    ("slerp", "--slerp must be between 0"),
    ("slerp without inversion", "choose one"),
    ("missing shifts", "--shifts"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(setup, tmp_path, case, words):
    out = tmp_path / "out"
    args = common(setup, out)
    env = {}
    if case == "missing image":
        args[1] = tmp_path / "nope.jpg"
    elif case == "unreadable image":
        (tmp_path / "broken.jpg").write_bytes(b"not an image")
        args[1] = tmp_path / "broken.jpg"
    elif case == "folder as image":
        args[1] = args[1].parent
    elif case == "empty prompt":
        args[3] = " "
    elif case == "empty edit":
        args[5] = ""
    elif case == "no edit":
        del args[4:8]
    elif case == "model neither a path nor a Hub id":
        args[args.index("--model") + 1] = tmp_path / "nope.safetensors"
    elif case == "resolution":
        args[args.index("--resolution") + 1] = "100"
    elif case == "unwritable out":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
        args[args.index("--out") + 1] = out
    elif case == "existing out":
        out.mkdir()
        (out / "keep.png").write_text("earlier")
    elif case == "slerp":
        args += ["--slerp", "1.5"]
    elif case == "slerp without inversion":
        args += ["--slerp", "0.5", "--no-inversion"]
    elif case == "missing shifts":
        args += ["--shifts", tmp_path / "nope.safetensors"]
    r = run(*args, env=env)
    assert r.returncode == 1, r.stderr[-2000:]
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.startswith("error:")]) == 1
    if case == "existing out":
        assert [p.name for p in out.iterdir()] == ["keep.png"]
    else:
        assert not out.exists()
