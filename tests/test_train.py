"""train.py on a tiny model: it learns, writes the promised files, resumes, and refuses bad input clearly."""
import json
import os
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ddim
import sd
import svdiff
import tiny
import train
from support import fingerprint, photos, shift_files, train_args

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import photo, tiny_model_folder
    root = tiny_model_folder(tmp_path_factory, "train")
    (root / "dog").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # three generated "photos": a red square on noise, different sizes and modes
        im = Image.fromarray(photo(rng, (72 + 8 * i, 96, 3), np.s_[20:50, 30:70], [220, 40, 40]))
        (im.convert("RGBA") if i == 1 else im.convert("P") if i == 2 else im).save(root / "dog" / f"{i}.png")
    return root


def run(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})})


def common(setup, out, steps=30, *extra):
    return ["--images", setup / "dog", "--token", "sks", "--model", setup / "model", "--resolution", "64",
            "--steps", steps, "--no-prior", "--sample-every", 1000, "--sample-steps", 2, "--out", out, *extra]


def instance_loss(setup, shift_file=None, model=None):
    """The diffusion loss (ε-MSE, or v-MSE for a v-prediction model) on the instance images at FIXED noise and
    timesteps, with or without the trained shifts."""
    from conftest import load_with_shifts
    model = load_with_shifts(model or setup / "model", shift_file)
    images, _, _ = photos.load_image_folder(setup / "dog", 64)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        z = model.vae.encode(torch.stack(images))[0].repeat(4, 1, 1, 1) * model.vae.cfg.scaling_factor
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (len(z),), generator=g)
        ctx = sd.encode_prompts(model, ["a photo of sks dog"] * len(z)).context
        pred = model.unet(ddim.add_noise(z, noise, t, ddim.alphas_cumprod()), t, ctx)
    target = noise if model.prediction_type == "epsilon" else ddim.velocity(z, noise, t, ddim.alphas_cumprod())
    return torch.nn.functional.mse_loss(pred, target).item()


def test_training_lowers_the_instance_loss_and_writes_the_promised_files(setup):
    out = setup / "run"
    r = run(*common(setup, out, 30, "--lr", "5e-3", "--save-every", 10, "--sample-every", 15))
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = instance_loss(setup), instance_loss(setup, out / "shifts.safetensors")
    assert after < 0.9 * before, (before, after)

    tensors, meta = shift_files.read_shift_file(out / "shifts.safetensors")
    model = sd.load(setup / "model")
    expected = {shift_files.key_of(model, n): svdiff.shift_length(m)
                for n, m in svdiff.shiftable_modules(model, "all")}
    assert {k: v.shape[0] for k, v in tensors.items()} == expected
    assert meta["fingerprint"] == fingerprint.fingerprint(model)
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log] == list(range(1, 31))
    assert set(log[0]) >= {"step", "loss", "prior_loss", "lr", "seconds"}
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 30 and config["class_word"] == ["dog"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00015.png", "step_00030.png"]
    state = torch.load(out / "resume.pt", weights_only=True)
    assert state["step"] == 30


def test_prior_preservation_generates_and_reuses_class_images(setup):
    out = setup / "prior"
    args = ["--images", setup / "dog", "--token", "sks", "--model", setup / "model", "--resolution", "64",
            "--steps", 2, "--num-class-images", 2, "--class-steps", 2, "--sample-every", 1000, "--sample-steps", 1,
            "--out", out]
    r = run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((out / "class_images" / "dog").glob("*.png"))) == 2
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert all(l["prior_loss"] > 0 for l in log)
    r = run(*args, "--overwrite")
    assert r.returncode == 0 and "generating" not in r.stdout  # cached class images are reused
    # a damaged file in the class folder is skipped with a warning, as in --images
    (out / "class_images" / "dog" / "000-broken.png").write_bytes(b"not an image")
    r = run(*args, "--overwrite")
    assert r.returncode == 0 and "000-broken.png (UnidentifiedImageError)" in r.stderr, r.stderr[-2000:]


def test_killed_run_resumes_to_the_same_final_step_and_log(setup):
    out = setup / "resumed"
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                          *map(str, common(setup, out, 40, "--save-every", 10))], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if (out / "resume.pt").is_file() and torch.load(out / "resume.pt", weights_only=True)["step"] >= 10:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    saved = torch.load(out / "resume.pt", weights_only=True)["step"]
    assert 10 <= saved < 40, saved
    assert run(*common(setup, out, 40)).returncode == 1  # an existing run is not overwritten silently
    r = run(*common(setup, out, 40, "--save-every", 10, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log] == list(range(1, 41))
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 40


def resume_delta(out):
    return torch.load(out / "resume.pt", weights_only=True)["delta"]


def losses(out):
    return [(l["step"], l["loss"], l["prior_loss"]) for l in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def test_resumed_run_ends_bit_exact_as_the_uninterrupted_run_from_the_fp32_delta(setup):
    """Stopped at step 4 (its log's last line cut off mid-write) and resumed to 6, with --half shift files (so
    resuming from the file's fp16 δ would show) and every source of randomness in play (--flip, latent sampling,
    noise, timesteps)."""
    flags = ["--save-every", 2, "--half", "--flip", "--lr", "5e-3"]
    whole, part = setup / "whole", setup / "part"
    assert run(*common(setup, whole, 6, *flags)).returncode == 0
    assert run(*common(setup, part, 4, *flags)).returncode == 0
    with open(part / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut off by the crash (dropped, as every line after the last save)
    r = run(*common(setup, part, 6, *flags, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = resume_delta(whole), resume_delta(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(part) == losses(whole) and [s for s, _, _ in losses(part)] == list(range(1, 7))
    (fa, ma), (fb, mb) = (shift_files.read_shift_file(o / "shifts.safetensors") for o in (whole, part))
    assert ma == mb and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert any(not torch.equal(d.half().float(), d) for d in a.values())  # the fp16 file would have differed


def test_resume_refuses_a_shift_file_of_another_step(setup):
    from safetensors.torch import save_file
    out = setup / "mismatched"
    assert run(*common(setup, out, 4, "--save-every", 2)).returncode == 0
    tensors, meta = shift_files.read_shift_file(out / "shifts.safetensors")
    save_file(tensors, str(out / "shifts.safetensors"), metadata=dict(meta, step="2"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = run(*common(setup, out, 6, "--resume"))
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "do not belong together" in errors[0], r.stderr[-2000:]
    assert "--overwrite" in errors[0] and "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def diverge_at(monkeypatch, step, value):
    """AdamW whose `step`-th step sets every δ to `value` (as an exploding run would)."""
    real = torch.optim.AdamW.step
    calls = []

    def step_then_diverge(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == step:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(value)
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_diverge)


@pytest.mark.parametrize("value,words,kept", [(1e30, "loss became", 3), (float("nan"), "δ became non-finite at step 3", 2)])
def test_a_diverging_run_stops_saying_so_and_only_finite_shifts_are_ever_saved(setup, monkeypatch, value, words, kept):
    """δ_3 = 1e30 is finite (saved as step 3) but gives an infinite loss at step 4: the run stops, and says the kept
    file holds those shifts. δ_3 = NaN is caught before any save: the kept file is step 2's, bit-exact as a clean
    2-step run's."""
    clean = setup / "clean2"
    if not (clean / "resume.pt").is_file():
        assert run(*common(setup, clean, 2, "--save-every", 1)).returncode == 0
    out = setup / f"diverged-{value}"
    a = train_args.resolve(train_args.parse(list(map(str, common(setup, out, 5, "--save-every", 1, "--overwrite"))),
                                            train.Settings()))
    diverge_at(monkeypatch, 3, value)
    with pytest.raises(ValueError, match=words) as e:
        train.train(a)
    assert f"step {kept}" in str(e.value)  # the message names the kept file's step
    assert ("holds those very shifts" in str(e.value)) == (kept == 3)
    tensors, meta = shift_files.read_shift_file(out / "shifts.safetensors")
    assert meta["step"] == str(kept) and torch.load(out / "resume.pt", weights_only=True)["step"] == kept
    assert all(torch.isfinite(t).all() for t in tensors.values())
    reference, _ = shift_files.read_shift_file(clean / "shifts.safetensors")
    assert all(torch.equal(tensors[k], reference[k]) for k in reference) == (kept == 2)


def test_sd2_v_prediction_trains_on_the_v_target_and_lowers_the_v_loss(setup, tmp_path, monkeypatch):
    """A tiny SD2 model whose scheduler says v_prediction: the target handed to the loss is
    v = √ᾱ_t ε - √(1-ᾱ_t) x_0 of the very z, ε, t that were noised, and a short run lowers the v-MSE."""
    from conftest import require_bpe_vocab
    folder = tmp_path / "sd2"
    tiny.write_folder(folder, "sd2", require_bpe_vocab(), prediction_type="v_prediction")
    out = tmp_path / "run"
    a = train_args.resolve(train_args.parse(list(map(str, [
        "--images", setup / "dog", "--token", "sks", "--model", folder, "--resolution", 64, "--steps", 25,
        "--lr", "5e-3", "--no-prior", "--sample-every", 0, "--out", out])), train.Settings()))
    seen = []
    real_add_noise, real_loss = ddim.add_noise, svdiff.prior_preservation_loss
    monkeypatch.setattr(ddim, "add_noise", lambda z, noise, t, al: seen.append([z, noise, t]) or real_add_noise(z, noise, t, al))
    monkeypatch.setattr(svdiff, "prior_preservation_loss",
                        lambda pred, target, *rest: seen[-1].append(target) or real_loss(pred, target, *rest))
    train.train(a)
    monkeypatch.undo()
    A = ddim.alphas_cumprod()
    for z, noise, t, target in seen:
        al = A[t].reshape(-1, 1, 1, 1)
        assert torch.allclose(target, al.sqrt() * noise - (1 - al).sqrt() * z, atol=1e-6)
    assert not torch.allclose(seen[0][3], seen[0][1])  # not the ε target
    before, after = instance_loss(setup, model=folder), instance_loss(setup, out / "shifts.safetensors", model=folder)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("case,words", [
    ("missing folder", "no such folder"),
    ("empty folder", "no usable images"),
    ("model neither a path nor a Hub id", "not a Hugging Face Hub id"),
    ("resolution", "multiple of 8"),
    ("nan", "with the shifts of step 1"),
    ("learning rate", "--lr must be a positive finite number"),
    ("rank", "--rank must be at least 1"),
    ("sample steps", "--sample-steps must be between 1 and 1000"),
    ("class steps", "--class-steps must be between 1 and 1000"),
    ("device name", "--device 'gpu' is not a device"),
    ("empty token", "--token is empty"),
    ("svd cache is a checkpoint", "is not an SVD cache"),
    ("svd cache is not safetensors", "is not an SVD cache"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(setup, tmp_path, case, words):
    out = tmp_path / "out"
    args = common(setup, out, 3)
    env = {}
    if case == "missing folder":
        args[1] = tmp_path / "nope"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "broken.jpg").write_bytes(b"not an image")
        args[1] = tmp_path / "empty"
    elif case == "model neither a path nor a Hub id":
        args[args.index("--model") + 1] = tmp_path / "nope.safetensors"
    elif case == "resolution":
        args[args.index("--resolution") + 1] = "100"
    elif case == "learning rate":
        args += ["--lr", "1e39"]  # beyond float32
    elif case in ("rank", "sample steps", "class steps", "device name"):
        args += {"rank": ["--rank", "0"], "sample steps": ["--sample-steps", "1001"],
                 "class steps": ["--class-steps", "0"], "device name": ["--device", "gpu"]}[case]
    elif case == "empty token":
        args[args.index("--token") + 1] = " "
    elif case.startswith("svd cache"):  # a checkpoint named by mistake: never overwritten
        from safetensors.torch import save_file
        cache = tmp_path / "v1-5.safetensors"
        if case.endswith("checkpoint"):
            save_file({"model.diffusion_model.out.2.weight": torch.ones(3)}, str(cache))
        else:
            cache.write_bytes(b"PK not a safetensors file")
        args += ["--svd-cache", cache]
        kept = cache.read_bytes()
    elif case == "nan":
        args += ["--lr", "1e30", "--save-every", "1"]  # δ_1 = ±1e30: finite, but its loss is not
    r = run(*args, env=env)
    assert r.returncode == 1, r.stderr[-2000:]
    assert words in r.stderr and "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1
    if case.startswith("svd cache"):
        assert cache.read_bytes() == kept
    if case != "nan":
        assert not out.exists()
    else:  # δ_1 = ±1e30 is finite, so step 1 was saved; the line says that file holds the shifts that failed
        assert "stopped" in errors[0] and "(step 1), holds those very shifts" in errors[0]


def test_common_word_token_warns(setup, tmp_path):
    args = common(setup, tmp_path / "out", 1)
    args[args.index("--token") + 1] = "dog"
    r = run(*args)
    assert r.returncode == 0 and "common word" in r.stderr and "sks" in r.stderr


def test_out_of_gpu_memory_names_the_flags_that_reduce_memory(setup, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(sd, "load", out_of_memory)  # train.py's `import sd` finds this module
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, common(setup, tmp_path / "out", 3))])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "out of GPU memory" in err and "--grad-checkpointing" in err


@pytest.mark.parametrize("flag,good,bad", [
    ("--cutmix-prob", ["0", "1"], ["-0.1", "1.1"]),
    ("--steps", ["1"], ["0"]),
    ("--batch-size", ["1"], ["0"]),
    ("--save-every", ["1"], ["0"]),
    ("--num-class-images", ["1"], ["0"]),
    ("--class-steps", ["1", "1000"], ["0", "1001"]),
    ("--sample-steps", ["1", "1000"], ["0", "1001"]),
    ("--sample-every", ["0"], ["-1"]),
    ("--resolution", ["8"], ["0", "-8", "12"]),
    ("--rank", ["1"], ["0"]),
    ("--lr", ["1e-9"], ["0", "-1e-3", "inf", "nan"]),
    ("--lr-1d", ["0"], ["-1e-6", "inf"]),
    ("--prior-weight", ["0"], ["-1", "nan"]),
    ("--unmix-weight", ["0"], ["-1", "inf"]),
])
def test_each_flags_bounds_are_accepted_and_one_past_them_refused(setup, tmp_path, flag, good, bad):
    """check_args' limits exactly where --help says they are (0 is a valid --cutmix-prob, --prior-weight or
    --sample-every; a resolution of 0 is not the default), before anything is loaded or written."""
    check = lambda value: train_args.check_args(train_args.parse(list(map(str, common(setup, tmp_path / "out", 3,
                                                                                 f"{flag}={value}"))), train.Settings()))
    for value in good:
        check(value)
    for value in bad:
        with pytest.raises(ValueError, match=flag):
            check(value)
    assert not (tmp_path / "out").exists()


def test_no_prior_is_lambda_0_and_resume_with_overwrite_is_refused(setup, tmp_path):
    argv = lambda *extra: list(map(str, ["--images", setup / "dog", "--token", "sks", "--model", setup / "model",
                                         "--out", tmp_path / "out", *extra]))
    assert train_args.resolve(train_args.parse(argv("--prior-weight", 2, "--no-prior"), train.Settings())).prior_weight == 0
    assert train_args.resolve(train_args.parse(argv("--prior-weight", 2), train.Settings())).prior_weight == 2
    with pytest.raises(ValueError, match="--resume and --overwrite contradict"):
        train_args.resolve(train_args.parse(argv("--resume", "--overwrite"), train.Settings()))


def test_the_prior_loss_is_weighted_by_prior_weight(setup, tmp_path):
    """Eq. 3: loss = instance loss + λ · prior loss. The first step of two runs that differ only in λ draws the same
    batch with δ = 0: the same prior loss, and loss - λ · prior_loss the same instance loss."""
    logged = {}
    for weight in (0.5, 3.0):
        a = train_args.resolve(train_args.parse(list(map(str, [
            "--images", setup / "dog", "--token", "sks", "--model", setup / "model", "--resolution", 64, "--steps", 1,
            "--prior-weight", weight, "--num-class-images", 1, "--class-steps", 1, "--class-dir", tmp_path / "class",
            "--sample-every", 0, "--out", tmp_path / str(weight)])), train.Settings()))
        train.train(a)
        line = json.loads((tmp_path / str(weight) / "log.jsonl").read_text().splitlines()[0])
        logged[weight] = line["loss"], line["prior_loss"]
    (loss_a, prior_a), (loss_b, prior_b) = logged[0.5], logged[3.0]
    assert prior_a == prior_b > 0 and loss_a != loss_b
    assert loss_a - 0.5 * prior_a == pytest.approx(loss_b - 3.0 * prior_b, rel=1e-5)


@pytest.mark.parametrize("no_captions", [False, True])
def test_each_row_is_prompted_with_its_own_images_caption(setup, tmp_path, monkeypatch, no_captions):
    """A .txt caption belongs to its image: with the VAE's variance made 0 a row's latent IS its image's mean,
    which says which image the row drew, and its prompt is that image's caption (the instance prompt for an image
    without one); with --no-captions, the instance prompt for every row."""
    import shutil
    import vae as vae_lib
    (tmp_path / "dog").mkdir()
    captions = ["a sks dog on grass", "a sks dog in the snow", None]
    for i, caption in enumerate(captions):
        shutil.copy(setup / "dog" / f"{i}.png", tmp_path / "dog" / f"{i}.png")
        if caption:
            (tmp_path / "dog" / f"{i}.txt").write_text(caption)
    a = train_args.resolve(train_args.parse(list(map(str, [
        "--images", tmp_path / "dog", "--token", "sks", "--model", setup / "model", "--resolution", 64, "--steps", 4,
        "--batch-size", 2, "--no-prior", "--sample-every", 0, "--seed", 1, "--out", tmp_path / "out"]
        + ["--no-captions"] * no_captions)), train.Settings()))
    real_encode, real_prompts, real_noise = vae_lib.VAE.encode, sd.encode_prompts, ddim.add_noise
    monkeypatch.setattr(vae_lib.VAE, "encode", lambda self, x: (real_encode(self, x)[0],
                                                                torch.full_like(real_encode(self, x)[1], -60.0)))
    rows = []
    monkeypatch.setattr(ddim, "add_noise", lambda z, noise, t, al: rows.append([z]) or real_noise(z, noise, t, al))
    monkeypatch.setattr(sd, "encode_prompts", lambda model, prompts, **sizes: rows[-1].append(prompts) or
                        real_prompts(model, prompts, **sizes))
    model = train.train(a)
    monkeypatch.undo()
    images, _, _ = photos.load_image_folder(tmp_path / "dog", 64)
    with torch.no_grad():
        means = torch.cat([model.vae.encode(x[None])[0] for x in images]) * model.vae.cfg.scaling_factor
    drawn = []
    for z, prompts in rows:
        for row, prompt in zip(z, prompts):
            (i,), = ((means - row).abs().flatten(1).amax(-1) < 1e-4).nonzero().tolist()
            assert prompt == ("a photo of sks dog" if no_captions else captions[i] or "a photo of sks dog")
            drawn.append(i)
    assert set(drawn) == {0, 1, 2}, drawn


def test_shifts_and_samples_are_written_every_n_steps_and_at_the_end(setup, tmp_path, monkeypatch):
    saved = []
    real_save = shift_files.save_shift_file
    monkeypatch.setattr(shift_files, "save_shift_file", lambda *args, step, **kw: saved.append(step) or
                        real_save(*args, step=step, **kw))
    train.train(train_args.resolve(train_args.parse(list(map(str, common(setup, tmp_path / "out", 5, "--save-every", 2,
                                                                    "--sample-every", 2, "--sample-steps", 1))), train.Settings())))
    assert saved == [2, 4, 5]
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir()) == \
        ["step_00002.png", "step_00004.png", "step_00005.png"]


def test_each_draw_is_a_sample_of_the_vae_posterior_times_its_scale(setup, tmp_path, monkeypatch):
    """z = (mean + exp(logvar / 2) ε) · scaling_factor, as diffusers' latent_dist.sample(): with the VAE's logvar
    made log 0.25 (σ = 0.5) the draws of one image scatter about its mean with standard deviation 0.5 · scale."""
    import shutil
    import vae as vae_lib
    (tmp_path / "one").mkdir()
    shutil.copy(setup / "dog" / "0.png", tmp_path / "one" / "0.png")
    a = train_args.resolve(train_args.parse(list(map(str, ["--images", tmp_path / "one", *common(setup, tmp_path / "out", 3)[2:],
                                                      "--batch-size", 2])), train.Settings()))
    real_encode, real_noise = vae_lib.VAE.encode, ddim.add_noise
    monkeypatch.setattr(vae_lib.VAE, "encode", lambda self, x: (real_encode(self, x)[0],
                                                                torch.full_like(real_encode(self, x)[1], 0.25).log()))
    drawn = []
    monkeypatch.setattr(ddim, "add_noise", lambda z, noise, t, al: drawn.append(z) or real_noise(z, noise, t, al))
    model = train.train(a)
    monkeypatch.undo()
    scale = model.vae.cfg.scaling_factor
    with torch.no_grad():
        mean = model.vae.encode(photos.load_image_folder(tmp_path / "one", 64)[0][0][None])[0]
    deviation = torch.cat(drawn) / scale - mean
    assert abs(deviation.mean()) < 0.05 and abs(deviation.std() - 0.5) < 0.05, (deviation.mean(), deviation.std())


def test_resume_without_model_continues_on_the_runs_own_base_model(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train.train(train_args.resolve(train_args.parse(list(map(str, common(setup, out, 1))), train.Settings())))
    monkeypatch.setenv("SVDIFF_MODEL", str(tmp_path / "another-model.safetensors"))
    a = train_args.resolve(train_args.parse(list(map(str, ["--images", setup / "dog", "--token", "sks", "--out", out,
                                                      "--resume", "--steps", 2])), train.Settings()))
    assert a.model == str((setup / "model").resolve())
