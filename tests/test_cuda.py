"""The GPU lane: what only a GPU executes — autocast in bf16 and fp16, the fp16 loss scaler, the SVD on the GPU,
drop_weights' CUDA memory, class images in batches of 4, sampling and the VAE in half precision, running out of
GPU memory — through train.py, sample.py, edit.py, bench.py and svdiff.svd, on a tiny SD1 model and on the full
SD1.5 architecture with random weights (written by tests/tiny.py from our own modules: the GPU machine has neither
diffusers nor transformers).

    python -m pytest -m cuda -rA          # on a machine with a GPU; .ci/gpu runs it with bench.py

Without CUDA every test here is skipped, with the reason. SVDIFF_CUDA_LANE_DEVICE=cpu is a dry run of the lane
itself: the tests whose logic is not CUDA's run on the CPU in fp32, the CUDA-only ones are skipped. The figures
measured (image differences of half-precision sampling, loss scales, peak memory, CPU-vs-CUDA δ) are printed and
kept as junit properties (`--junitxml FILE`). The scripts are driven by their flags (in process, for speed, where
the `__main__` handling is not what is tested)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import ddim
import edit
import sample
import sd
import svdiff
import tiny
import train
from conftest import BPE_VOCAB, load_with_shifts, photo
from support import apply_shifts, fast_svd, loading, photos, shift_files, train_args

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]
DEVICE = os.environ.get("SVDIFF_CUDA_LANE_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    CUDA and not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False): the GPU lane runs with `python -m pytest -m cuda` "
           "on a machine with one")]
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA: not part of the CPU dry run (SVDIFF_CUDA_LANE_DEVICE=cpu)")
DTYPES = ("bf16", "fp16", "fp32") if CUDA else ("fp32",)
LR = "1e-2"  # the tiny model's fixed-noise loss falls to 0.83x in 20 steps (CPU, fp32)

# Half-precision sampling against fp32 on the tiny model (10 DDIM steps, guidance 7.5, 2 images), in /255 of a pixel:
# bounds on the mean and on the largest difference. The CPU's half-precision kernels give fp16 mean 0.21, max 2 and
# bf16 mean 1.8, max 19 (base and shifted model alike); a GPU's kernels round and accumulate differently, so the
# bounds leave about 5x that. The test prints what the GPU gives (docs/performance.md keeps it).
HALF_BOUNDS = {"fp16": (1.0, 16), "bf16": (6.0, 64)}


# ---------------------------------------------------------------------------------------------------------------
# The tiny model, its photos, and running the scripts


@pytest.fixture(scope="module")
def lane(tmp_path_factory):
    """A folder with the tiny SD1 model as one file and two subjects' synthetic photos."""
    if not BPE_VOCAB.is_file():
        pytest.fail(f"the GPU lane needs the CLIP vocabulary shipped with the project at {BPE_VOCAB}")
    root = tmp_path_factory.mktemp("cuda-lane")
    tiny.write_ours(root / "model.safetensors")
    rng = np.random.default_rng(0)
    for name, colour, box in (("dog", [220, 40, 40], np.s_[20:50, 30:70]), ("sculpture", [40, 200, 60], np.s_[10:60, 20:40])):
        (root / name).mkdir()
        for i in range(3):
            Image.fromarray(photo(rng, (72 + 8 * i, 96, 3), box, colour)).save(root / name / f"{i}.png")
    return root


def train_args(lane, out, *flags, device=DEVICE, model=None, subjects=("dog",)):
    argv = [f"--model={model or lane / 'model.safetensors'}", f"--vocab={BPE_VOCAB}", f"--device={device}",
            "--resolution=64", "--sample-every=0", f"--out={out}"]
    for s, token in zip(subjects, ("sks", "zwx")):
        argv += [f"--images={lane / s}", f"--token={token}"]
    return argv + [str(f) for f in flags]


def run_train(*args, **kwargs):
    """train.py's flags, in this process: returns the trained model (train.resolve + train.train)."""
    return train.train(train_args.resolve(train_args.parse(train_args(*args, **kwargs), train.Settings())))


def read_log(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


def deltas(model):
    return {k: m.delta.detach().float().cpu() for k, m in shift_files.shifts_by_key(model)}


def fixed_loss(lane, shift_file=None):
    """ε-MSE on the dog photos at FIXED noise and timesteps, in fp32 on the lane's device, with or without a
    shift file (forced: the file may come from weights loaded in half precision)."""
    model = load_with_shifts(lane / "model.safetensors", shift_file, force=True, vocab=BPE_VOCAB, device=DEVICE)
    images, _, _ = photos.load_image_folder(lane / "dog", 64)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        z = model.vae.encode(torch.stack(images).to(DEVICE))[0].repeat(4, 1, 1, 1) * model.vae.cfg.scaling_factor
        noise = torch.randn(z.shape, generator=g).to(DEVICE)
        t = torch.randint(0, 1000, (len(z),), generator=g).to(DEVICE)
        pred = model.unet(ddim.add_noise(z, noise, t, ddim.alphas_cumprod()), t,
                          sd.encode_prompts(model, ["a photo of sks dog"] * len(z)).context)
    return torch.nn.functional.mse_loss(pred.float(), noise).item()


def report(record_property, **figures):
    for k, v in figures.items():
        record_property(k, v)
        print(f"{k}: {v}")


# ---------------------------------------------------------------------------------------------------------------
# train.py


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_lowers_the_loss_round_trips_the_shift_file_and_resumes(lane, dtype, checkpointing):
    out = lane / f"run-{dtype}-{checkpointing}"
    flags = ["--dtype", dtype, "--lr", LR, "--no-prior", "--save-every", 10, "--sample-every", 20,
             "--sample-steps", 2] + ["--grad-checkpointing"] * checkpointing
    model = run_train(lane, out, "--steps", 20, *flags)
    log = read_log(out)
    assert [l["step"] for l in log] == list(range(1, 21))
    assert all(np.isfinite(l["loss"]) for l in log), [l["loss"] for l in log]
    # fp16 only: its gradients are made with a loss scale, logged on every step
    assert all(("loss_scale" in l) == (dtype == "fp16" and CUDA) for l in log)
    assert all(l["loss_scale"] > 0 for l in log if "loss_scale" in l)
    assert (out / "samples" / "step_00020.png").is_file()  # the shifted, unmerged model sampled under autocast

    # the file holds exactly the δ trained, and they lower the loss on the photos
    trained = deltas(model)
    tensors, _ = shift_files.read_shift_file(out / "shifts.safetensors")
    assert tensors.keys() == trained.keys() and all(torch.equal(tensors[k], trained[k]) for k in tensors)
    assert all(torch.isfinite(d).all() for d in trained.values())
    before, after = fixed_loss(lane), fixed_loss(lane, out / "shifts.safetensors")
    assert after < 0.9 * before, (before, after)

    # --resume continues from the saved state to a later final step
    model = run_train(lane, out, "--steps", 25, "--resume", *flags)
    assert [l["step"] for l in read_log(out)] == list(range(1, 26))
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 25
    resumed = deltas(model)
    assert any(not torch.equal(resumed[k], trained[k]) for k in trained)
    assert all(torch.isfinite(d).all() for d in resumed.values())


@cuda_only
def test_fp16_overflow_skips_the_step_and_backs_the_loss_scale_off(lane, record_property):
    """A prior weight of 10⁶ makes the scaled gradients overflow fp16 for sure: each such step is skipped (δ
    unchanged, never NaN) and the scale halves until the gradients fit. The 5 class images are generated in
    fp16, in batches of 4 (then 1)."""
    out = lane / "fp16-overflow"
    model = run_train(lane, out, "--dtype", "fp16", "--steps", 8, "--prior-weight", 1e6, "--num-class-images", 5,
                      "--class-steps", 2)
    class_images = sorted((out / "class_images" / "dog").glob("*.png"))
    assert len(class_images) == 5 and all(Image.open(p).size == (64, 64) for p in class_images)
    log = read_log(out)
    scales = [l["loss_scale"] for l in log]
    report(record_property, fp16_overflow_loss_scales=scales)
    assert scales[0] == 2.0 ** 16 and min(scales) < scales[0], scales
    assert all(np.isfinite(l["loss"]) and np.isfinite(l["prior_loss"]) for l in log)
    assert all(torch.isfinite(d).all() for d in deltas(model).values())


@pytest.mark.parametrize("dtype,checkpointing", [("bf16", True), ("fp16", False)] if CUDA else [("fp32", True)])
def test_two_subjects_with_prior_preservation_train_with_cut_mix_unmix(lane, dtype, checkpointing):
    """Cut-Mix-Unmix with class images: the cross-attention maps recorded under autocast (and, with gradient
    checkpointing, recomputed in the backward pass) give a finite unmix loss on the collage steps."""
    out = lane / f"two-{dtype}"
    model = run_train(lane, out, "--dtype", dtype, "--steps", 20, "--lr", LR, "--num-class-images", 2,
                      "--class-steps", 2, "--cutmix-prob", 0.5, "--sample-every", 20, "--sample-steps", 2,
                      *["--grad-checkpointing"] * checkpointing, subjects=("dog", "sculpture"))
    log = read_log(out)
    collages = [l for l in log if l["unmix_loss"] is not None]
    assert 0 < len(collages) < len(log)
    assert all(np.isfinite(l["unmix_loss"]) and l["unmix_loss"] >= 0 for l in collages)
    assert all(np.isfinite(l["loss"]) and np.isfinite(l["prior_loss"]) and l["prior_loss"] > 0 for l in log)
    for word in ("dog", "sculpture"):
        assert len(list((out / "class_images" / word).glob("*.png"))) == 2
    assert (out / "samples" / "step_00020.png").is_file()
    assert all(torch.isfinite(d).all() for d in deltas(model).values())
    before, after = fixed_loss(lane), fixed_loss(lane, out / "shifts.safetensors")
    assert after < before, (before, after)


@cuda_only
def test_fp32_training_gives_the_same_shifts_on_cpu_and_on_cuda(lane, monkeypatch, record_property):
    """The device does not change the method: 5 steps from the same seed (every random draw comes from one CPU
    generator) give the same losses, to rounding, and the same δ but for AdamW's amplification of rounding: it
    divides each gradient by that element's own running RMS, so an element whose gradient is at rounding level
    moves by about ±lr on either device, in a sign the rounding decides (an H200 against this CPU: losses within
    4e-7, δ within 0.52%). A device-specific mistake (another noise, flip or timestep; a wrong cast) changes the
    losses from the first step. cuDNN's convolutions would use TF32 in fp32 unless told not to (PyTorch's
    default): strict fp32 here, as on the CPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    flags = ["--dtype", "fp32", "--steps", 5, "--lr", LR, "--no-prior", "--flip"]
    on = {device: deltas(run_train(lane, lane / f"fp32-{device}", *flags, device=device)) for device in ("cpu", "cuda")}
    a = torch.cat([on["cpu"][k] for k in sorted(on["cpu"])])
    b = torch.cat([on["cuda"][k] for k in sorted(on["cpu"])])
    relative = ((a - b).norm() / a.norm()).item()
    losses = {d: [l["loss"] for l in read_log(lane / f"fp32-{d}")] for d in ("cpu", "cuda")}
    report(record_property, cpu_vs_cuda_delta_relative=relative, cpu_losses=losses["cpu"], cuda_losses=losses["cuda"])
    assert np.allclose(losses["cpu"], losses["cuda"], rtol=1e-5, atol=0), losses
    assert a.norm() > 0 and relative <= 2e-2, relative


@cuda_only
def test_running_out_of_gpu_memory_is_one_line_naming_the_flags(lane, tmp_path):
    """A real torch.cuda.OutOfMemoryError in each script: a child process first allocates past the card's memory
    (until the allocator refuses), then runs the script, whose first weights no longer fit."""
    fill = ("import runpy, sys, torch\n"
            "held = []\n"
            "for chunk in (2 ** 30, 2 ** 24, 2 ** 19):  # down to under the allocator's smallest segment, 2 MiB\n"
            "    try:\n"
            "        while True: held.append(torch.empty(chunk, dtype=torch.uint8, device='cuda'))\n"
            "    except torch.cuda.OutOfMemoryError: pass\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    model = lane / "model.safetensors"
    commands = {
        "train.py": train_args(lane, tmp_path / "train-out", "--steps", 2, "--no-prior"),
        "sample.py": [f"--model={model}", f"--vocab={BPE_VOCAB}", "--prompt=a dog", "--steps=2", "--height=64",
                      "--width=64", f"--out={tmp_path / 'sample-out'}"],
        "edit.py": [f"--image={lane / 'dog' / '0.png'}", "--prompt=a photo of a dog", "--edit=a photo of a cat",
                    f"--model={model}", f"--vocab={BPE_VOCAB}", "--steps=2", "--sample-steps=2", "--resolution=64",
                    f"--out={tmp_path / 'edit-out'}"]}
    for script, argv in commands.items():
        r = subprocess.run([sys.executable, "-c", fill, str(ROOT / script), *argv], capture_output=True, text=True,
                           cwd=ROOT)
        errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        assert r.returncode == 1 and len(errors) == 1 and "out of GPU memory" in errors[0], (script, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "--" in errors[0], script  # names flags that reduce memory
        assert not (tmp_path / f"{script[:-3]}-out").exists(), script


# ---------------------------------------------------------------------------------------------------------------
# sample.py and edit.py


@pytest.fixture(scope="module")
def trained_bf16(lane):
    """The GPU user's path starts here: shifts trained with the weights loaded (and autocast) in bf16."""
    out = lane / "bf16-for-sampling"
    run_train(lane, out, "--dtype", "bf16" if CUDA else "fp32", "--steps", 20, "--lr", LR, "--no-prior")
    return out / "shifts.safetensors"


def sample_images(lane, dtype, shift_file=None):
    """sample.py's sampling (10 DDIM steps, guidance 7.5, 2 images) with the weights loaded in `dtype` and a shift
    file applied as sample.py applies it, from the SAME initial latents in every precision: drawn in fp32, then
    cast. sample.py draws them in the weights' dtype, as diffusers does, and whether such a half-precision draw
    is the fp32 draw rounded depends on the PyTorch version (on the GPU machine's 2.11 it was not), which would
    make this a comparison of two seeds rather than of two precisions."""
    model = sd.load(lane / "model.safetensors", device=DEVICE, dtype=loading.DTYPES[dtype], vocab=BPE_VOCAB)
    if shift_file:
        apply_shifts.apply_shift_files(model, [str(shift_file)])
    f = sd.latent_factor(model)
    latents = torch.randn((2, model.unet.cfg.in_channels, 64 // f, 64 // f), generator=torch.Generator().manual_seed(0))
    images = sd.text_to_image(model, ["a photo of sks dog"] * 2, steps=10, guidance=7.5,
                              latents=latents.to(DEVICE, loading.DTYPES[dtype]), progress=False)
    return np.stack([np.asarray(im).astype(np.int16) for im in sd.to_pil(images)])


@cuda_only
def test_half_precision_sampling_is_the_fp32_image_within_bounds_also_with_bf16_trained_shifts(
        lane, trained_bf16, record_property):
    """Sampling with the weights, UNet and VAE in fp16 (sample.py's CUDA default) and in bf16 against fp32, from
    the base model and with the shift file trained in bf16 (applied without force: the fingerprint does not depend
    on the precision the weights were loaded in)."""
    figures = {}
    for name, shift_file in (("base", None), ("shifted", trained_bf16)):
        images = {d: sample_images(lane, d, shift_file) for d in ("fp32", "fp16", "bf16")}
        for d in ("fp16", "bf16"):
            diff = np.abs(images[d] - images["fp32"])
            figures[f"{name}_{d}"] = (float(diff.mean()), int(diff.max()))
        figures[name] = images["fp32"]
    report(record_property, half_precision_sampling_mean_max_per_255={k: v for k, v in figures.items()
                                                                       if k not in ("base", "shifted")})
    for name in ("base", "shifted"):
        for d, (mean, largest) in HALF_BOUNDS.items():
            assert figures[f"{name}_{d}"][0] <= mean and figures[f"{name}_{d}"][1] <= largest, (name, d, figures)
    assert np.abs(figures["shifted"] - figures["base"]).mean() > 1  # the shifts changed the images


def test_edit_fine_tunes_inverts_and_edits_then_reuses_its_shifts_in_another_precision(lane, tmp_path):
    """edit.py end to end on the device: fine-tuning under autocast (bf16), merge, inversion and sampling with
    slerp and η in the weights' precision; then the same shift file applied to weights loaded in fp16."""
    common = [f"--image={lane / 'dog' / '0.png'}", "--prompt=a photo of a dog", "--edit=a photo of a dog in a hat",
              f"--model={lane / 'model.safetensors'}", f"--vocab={BPE_VOCAB}", "--sample-steps=4", "--resolution=64",
              "--slerp=0.5", "--eta=0.3", "--seed", "0", "1", f"--device={DEVICE}"]
    first, second = tmp_path / "edit-bf16", tmp_path / "edit-fp16"
    edit.main(common + ["--steps=10", f"--dtype={'bf16' if CUDA else 'fp32'}", f"--out={first}"])
    edit.main(common + [f"--shifts={first / 'shifts.safetensors'}", f"--dtype={'fp16' if CUDA else 'fp32'}",
                        f"--out={second}"])
    for out in (first, second):
        images = [np.asarray(Image.open(p)) for p in sorted(out.glob("edit00_*_seed*.png"))]
        assert len(images) == 2 and all(im.shape == (64, 64, 3) and im.std() > 0 for im in images), out
        assert (out / "comparison.png").is_file() and (out / "shifts.safetensors").is_file()
    assert len(read_log(first)) == 10


# ---------------------------------------------------------------------------------------------------------------
# The SVD on the device


def spectrum(m, n, decay, rank=None, seed=0):
    """An m x n float32 matrix with singular values 10^(-decay·i/r) (rank-limited: zeros past `rank`)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = 10 ** (-decay * torch.arange(r, dtype=torch.float64) / r)
    if rank is not None:
        s[rank:] = 0
    return ((U * s) @ V.T).float()


@pytest.mark.parametrize("W", [
    pytest.param(lambda: torch.randn(320, 2880, generator=torch.Generator().manual_seed(1)), id="conv-320x2880"),
    pytest.param(lambda: torch.randn(11520, 1280, generator=torch.Generator().manual_seed(2)) / 40, id="tall-11520x1280"),
    pytest.param(lambda: spectrum(640, 640, 6), id="ill-conditioned-640"),
    pytest.param(lambda: spectrum(512, 768, 1, rank=100), id="rank-100-of-512x768"),
])
def test_svd_on_the_device_reconstructs_as_on_the_cpu(W):
    """svdiff.svd in float64 on the device (the Gram route, or torch.linalg.svd where it falls back): the same
    singular values and the same reconstruction as on the CPU, orthonormal factors."""
    W = W()
    results = {}
    for device in ("cpu", DEVICE):
        U, S, V = (f.cpu() for f in fast_svd.svd(W.to(device)))
        assert U.dtype == S.dtype == V.dtype == torch.float64
        results[device] = U, S, V
        recon = (U * S) @ V.T
        assert ((recon - W.double()).norm() / W.double().norm()).item() <= 1e-12, device
        eye = torch.eye(S.shape[0], dtype=torch.float64)
        keep = S > S[0] * 1e-6  # the factors of zero singular values are any orthonormal completion
        assert (U[:, keep].T @ U[:, keep] - eye[keep][:, keep]).abs().max() <= fast_svd.ORTHO_TOL, device
        assert (V[:, keep].T @ V[:, keep] - eye[keep][:, keep]).abs().max() <= fast_svd.ORTHO_TOL, device
    (U1, S1, V1), (U2, S2, V2) = results["cpu"], results[DEVICE]
    assert (S1 - S2).abs().max() <= 1e-12 * S1[0]
    assert (((U1 * S1) @ V1.T - (U2 * S2) @ V2.T).norm() / W.double().norm()).item() <= 1e-12


# ---------------------------------------------------------------------------------------------------------------
# The full SD1.5 architecture (random weights): memory at 512 px, and the scripts at full size


def factor_bytes(dtype_bytes=2):
    """Bytes of U and Vᵀ of every `all` matrix of SD1.5's UNet and text encoder, in the weights' dtype."""
    with torch.device("meta"):
        model = bench.build_model(False, "meta", torch.bfloat16)
    total = 0
    for _, m in svdiff.shiftable_modules(model, "all"):
        if m.weight.ndim > 1:
            rows, cols = m.weight.shape[0], m.weight[0].numel()
            total += min(rows, cols) * (rows + cols) * dtype_bytes
    return total


@pytest.mark.slow
@cuda_only
def test_sd15_training_step_at_512px_in_bf16_with_dropped_weights_peaks_under_lora_plus_the_factors(record_property):
    """bench.py's own memory probes (a fresh process each, one training step, max_memory_allocated): SVDiff of
    `all` with fast_layer.drop_weights (as train.py trains) against rank-4 LoRA, + the bf16 U/Vᵀ it must hold."""
    peak = {}
    for probe in ("svdiff-drop-w", "lora"):
        r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--child", probe, "--device", "cuda",
                            "--resolution", "512"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        peak[probe] = json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"]
    factors = factor_bytes()
    report(record_property, sd15_512px_bf16_peak_bytes=peak, sd15_factor_bytes_bf16=factors)
    assert peak["svdiff-drop-w"] <= peak["lora"] + factors, (peak, factors)


@pytest.fixture(scope="module")
def sd15(lane):
    """SD1.5's architecture with random weights as one fp16 file, 512 px photos, and one SVD cache for all runs."""
    tiny.write_ours(lane / "sd15.safetensors", "sd15", torch.float16, device=DEVICE)
    rng = np.random.default_rng(1)
    (lane / "512" / "dog").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(photo(rng, (512, 640, 3), np.s_[100:300, 200:400], [220, 40, 40])).save(
            lane / "512" / "dog" / f"{i}.png")
    return lane / "sd15.safetensors", lane / "sd15-svd.safetensors"


def sd15_args(lane, sd15, out, *flags):
    model, cache = sd15
    return train_args(lane, out, "--resolution", 512, "--svd-cache", cache, *flags, model=model, subjects=("512/dog",))


@pytest.mark.slow
@cuda_only
def test_sd15_architecture_trains_in_bf16_resumes_and_its_shifts_sample_in_fp16(lane, sd15):
    out = lane / "sd15-bf16"
    flags = ["--dtype", "bf16", "--grad-checkpointing", "--no-prior", "--save-every", 5]
    train.train(train_args.resolve(train_args.parse(sd15_args(lane, sd15, out, "--steps", 10, *flags), train.Settings())))
    torch.cuda.empty_cache()
    train.train(train_args.resolve(train_args.parse(sd15_args(lane, sd15, out, "--steps", 12, "--resume", *flags), train.Settings())))
    torch.cuda.empty_cache()
    log = read_log(out)
    assert [l["step"] for l in log] == list(range(1, 13)) and all(np.isfinite(l["loss"]) for l in log)
    tensors, _ = shift_files.read_shift_file(out / "shifts.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values()) and any(t.abs().sum() > 0 for t in tensors.values())
    sample.main([f"--model={sd15[0]}", "--prompt=a photo of sks dog", "--steps=4", "--num-images=1",
                 f"--shifts={out / 'shifts.safetensors'}", f"--svd-cache={sd15[1]}", "--dtype=fp16",
                 f"--device={DEVICE}", f"--out={lane / 'sd15-samples'}", f"--vocab={BPE_VOCAB}"])
    image = np.asarray(Image.open(lane / "sd15-samples" / "000.png"))
    assert image.shape == (512, 512, 3) and image.std() > 0


@pytest.mark.slow
@cuda_only
def test_sd15_architecture_trains_in_fp16_with_prior_preservation_and_loss_scaling(lane, sd15, record_property):
    out = lane / "sd15-fp16"
    model = train.train(train_args.resolve(train_args.parse(sd15_args(
        lane, sd15, out, "--dtype", "fp16", "--steps", 8, "--num-class-images", 4, "--class-steps", 2), train.Settings())))
    assert len(list((out / "class_images" / "dog").glob("*.png"))) == 4  # one batch of 4 at 512 px, in fp16
    log = read_log(out)
    report(record_property, sd15_fp16_loss_scales=[l["loss_scale"] for l in log],
           sd15_fp16_losses=[l["loss"] for l in log])
    assert all(np.isfinite(l["loss"]) and np.isfinite(l["prior_loss"]) and l["loss_scale"] > 0 for l in log)
    assert all(torch.isfinite(d).all() for d in deltas(model).values())
