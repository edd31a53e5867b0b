"""train.py and edit.py on a tiny SDXL: each training row's micro-conditioning is its own image's original size and
crop (diffusers' DreamBooth-SDXL rule, flipped and not), the family's defaults (1024 px, gradient checkpointing), a
short run lowers the loss and its shift file (both text encoders) applies through sample.py, --resume continues bit
for bit, both text encoders train, Cut-Mix-Unmix on the levels that have attention, prior preservation, and edit.py
end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ddim
import edit
import sd
import svdiff
import tiny
import train
from support import edit_args, fingerprint, loading, photos, shift_files, train_args
import vae as vae_lib

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]
R = 64  # the tests' resolution (SDXL's default is 1024)
# (h, w) of the dog "photos": no resize and an odd margin (its mirrored crop starts one pixel further), a portrait,
# a downscale by 2 (odd margin again) and an upscale by 2 (so every resized size is exact)
SIZES = [(64, 101), (96, 64), (128, 190), (32, 47)]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A tiny SDXL single file, photos of two subjects of the SIZES, and a shared SVD cache."""
    from conftest import photo, require_bpe_vocab
    require_bpe_vocab()  # the single file's tokenizers are built from the shipped vocabulary
    root = tmp_path_factory.mktemp("sdxl_train")
    tiny.write_single_file(root / "model.safetensors", "sdxl")
    rng = np.random.default_rng(0)
    for name, colour in (("dog", [220, 40, 40]), ("sculpture", [40, 40, 220])):
        (root / name).mkdir()
        for i, (h, w) in enumerate(SIZES):
            box = np.s_[h // 4:3 * h // 4, w // 5:w // 2]  # off-centre: an image and its mirror image differ
            Image.fromarray(photo(rng, (h, w, 3), box, colour)).save(root / name / f"{i}.png")
    return root


def args(xl, out, *extra):
    return ["--images", xl / "dog", "--token", "sks", "--model", xl / "model.safetensors", "--resolution", R,
            "--sample-every", 0, "--svd-cache", xl / "svd.safetensors", "--out", out, *extra]


def resolved(*argv):
    return train_args.resolve(train_args.parse(list(map(str, argv)), train.Settings()))


def run(script, *argv):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT)


def expected_crop(h, w, resolution=R):
    """diffusers' DreamBooth-SDXL rule for an image of h x w: original_size (h, w) before resizing; the crop's
    (top, left) in the image resized by torchvision's Resize(R) (shorter side R, the longer truncated), where its
    CenterCrop cuts (half the margin, rounded half to even); flipped, the left offset in the mirrored resized
    image: from the other side."""
    H, W = (int(resolution * h / w), resolution) if w <= h else (resolution, int(resolution * w / h))
    top, left = int(round((H - resolution) / 2.0)), int(round((W - resolution) / 2.0))
    return (h, w), (top, left), (top, W - resolution - left)


# ---------------------------------------------------------------------------------------------------------------
# The images' sizes and crops


def test_load_image_gives_each_images_original_size_and_crop_corners(xl, tmp_path):
    images, _, crops = photos.load_image_folder(xl / "dog", R)
    assert [tuple(c) for c in crops] == [expected_crop(h, w) for h, w in SIZES]
    # the corners are where the pixels come from: the unresized image, and its mirror image for a flipped draw
    original = torch.from_numpy(np.array(Image.open(xl / "dog" / "0.png"))).permute(2, 0, 1).float() / 127.5 - 1
    (top, left), (_, left_flipped) = crops[0].top_left, crops[0].flipped_top_left
    assert left_flipped != left
    assert torch.equal(images[0], original[:, top:top + R, left:left + R])
    assert torch.equal(images[0].flip(-1), original.flip(-1)[:, top:top + R, left_flipped:left_flipped + R])
    # the size after the EXIF orientation: a 101 x 64 file shown turned by 90°
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(xl / "dog" / "0.png").save(tmp_path / "turned.jpg", exif=exif)
    _, crop, _ = photos.load_image(tmp_path / "turned.jpg", R)
    assert tuple(crop) == expected_crop(101, 64)
    # sizes where torchvision's truncation and rounding differ from round() and floor: a longer side of 96.67 ->
    # 96 (margin 32 -> 16), margins 31 -> 16 and 33 -> 16 (half to even), an upscaled 45 x 71 -> 64 x 100
    for h, w in [(96, 145), (128, 190), (64, 97), (45, 71), (145, 96)]:
        Image.new("RGB", (w, h), (90, 120, 30)).save(tmp_path / "size.png")
        assert tuple(photos.load_image(tmp_path / "size.png", R)[1]) == expected_crop(h, w)


# ---------------------------------------------------------------------------------------------------------------
# Training


def test_each_rows_time_ids_are_its_own_images_original_size_and_crop_flipped_or_not(xl, tmp_path, monkeypatch):
    """Captured as train.py hands them to sd.encode_prompts, next to the latents each row was drawn from: with the
    VAE's variance made 0, a row's latent IS its image's (or its mirror image's) mean, which says which image and
    whether flipped. Instance rows: that image's original size and crop corner (the mirrored one when flipped);
    class rows, generated at R x R (prior preservation on SDXL makes them): (R, R) and (0, 0); target (R, R)."""
    out = tmp_path / "run"
    a = resolved(*args(xl, out, "--steps", 5, "--batch-size", 2, "--flip", "--num-class-images", 2,
                       "--class-steps", 1, "--no-grad-checkpointing", "--seed", 1))
    real_encode, real_prompts, real_noise = vae_lib.VAE.encode, sd.encode_prompts, ddim.add_noise
    monkeypatch.setattr(vae_lib.VAE, "encode", lambda self, x: (real_encode(self, x)[0],
                                                                torch.full_like(real_encode(self, x)[1], -60.0)))
    calls = []
    modes = lambda model: (model.unet.training, model.text_encoder.training, model.text_encoder_2.training)
    monkeypatch.setattr(sd, "encode_prompts", lambda model, prompts, **sizes: calls.append(
        ("prompts", sizes, modes(model))) or real_prompts(model, prompts, **sizes))
    monkeypatch.setattr(ddim, "add_noise", lambda z, noise, t, al: calls.append(("z", z)) or
                        real_noise(z, noise, t, al))
    model = train.train(a)
    monkeypatch.undo()

    # each step noises its latents, then encodes its prompts (the class images' generation came before)
    steps = [(z, calls[i + 1][1]) for i, (kind, z, *_) in enumerate(calls) if kind == "z"]
    assert len(steps) == 5 and all(calls[i + 1][0] == "prompts" for i, (kind, *_) in enumerate(calls) if kind == "z")
    # both text encoders train with the UNet (and the model comes back in eval mode)
    assert [calls[i + 1][2] for i, (kind, *_) in enumerate(calls) if kind == "z"] == [(True, True, True)] * 5
    assert modes(model) == (False, False, False)
    images, _, _ = photos.load_image_folder(xl / "dog", R)
    with torch.no_grad():
        means = torch.stack([torch.cat([model.vae.encode(x[None])[0], model.vae.encode(x[None].flip(-1))[0]])
                             for x in images]) * model.vae.cfg.scaling_factor  # [image, flipped, 4, 8, 8]
    drawn = set()
    for z, sizes in steps:
        assert sizes["target_size"] == (R, R)
        for row in range(2):  # instance rows
            distance = (means - z[row]).abs().flatten(2).amax(-1)
            (i, flipped), = (distance < 1e-4).nonzero().tolist()
            original, corner, flipped_corner = expected_crop(*SIZES[i])
            assert sizes["original_size"][row].tolist() == list(original)
            assert sizes["crop_top_left"][row].tolist() == list(flipped_corner if flipped else corner)
            drawn.add((i, flipped))
        for row in (2, 3):  # class rows
            assert sizes["original_size"][row].tolist() == [R, R] and sizes["crop_top_left"][row].tolist() == [0, 0]
    # flipped and unflipped draws, and a flipped draw of an image whose mirrored crop has another corner
    assert {f for _, f in drawn} == {0, 1} and drawn & {(0, 1), (2, 1)}, drawn
    class_images = sorted((out / "class_images" / "dog").glob("*.png"))
    assert len(class_images) == 2 and all(Image.open(p).size == (R, R) for p in class_images)
    assert all(l["prior_loss"] > 0 for l in map(json.loads, (out / "log.jsonl").read_text().splitlines()))


def test_sdxl_defaults_are_1024_px_and_gradient_checkpointing(xl, tmp_path_factory):
    """Known before anything is loaded (loading.peek_family: the single file's header, a folder's layout); a flag
    given wins; SD 1.x keeps 512 px and no checkpointing. edit.py resolves the same."""
    from conftest import require_bpe_vocab, tiny_model_folder
    out = tmp_path_factory.mktemp("defaults") / "out"
    base = ["--images", xl / "dog", "--token", "sks", "--out", out]
    folder = tmp_path_factory.mktemp("xl_folder") / "model"
    tiny.write_sdxl_folder(folder, require_bpe_vocab())
    for model in (xl / "model.safetensors", folder):
        assert loading.peek_family(model) == "sdxl"
        a = resolved(*base, "--model", model)
        assert (a.resolution, a.grad_checkpointing) == (1024, True)
    a = resolved(*base, "--model", folder, "--resolution", 512, "--no-grad-checkpointing")
    assert (a.resolution, a.grad_checkpointing) == (512, False)
    sd1 = tiny_model_folder(tmp_path_factory, "sd1") / "model"
    a = resolved(*base, "--model", sd1)
    assert loading.peek_family(sd1) == "sd1" and (a.resolution, a.grad_checkpointing) == (512, False)
    e = edit_args.parse(list(map(str, ["--image", xl / "dog" / "0.png", "--prompt", "a dog", "--edit", "a cat",
                                       "--model", xl / "model.safetensors", "--out", out])))
    t = edit.resolve(e)
    assert (e.resolution, e.grad_checkpointing, t.resolution, t.grad_checkpointing) == (1024, True, 1024, True)
    assert not out.exists()  # nothing written


def fixed_loss(xl, shift_file=None):
    """The ε-MSE on the dog photos at FIXED noise and timesteps, each conditioned on its own sizes, with or without
    the trained shifts."""
    from conftest import load_with_shifts
    model = load_with_shifts(xl / "model.safetensors", shift_file)
    images, _, crops = photos.load_image_folder(xl / "dog", R)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        z = model.vae.encode(torch.stack(images))[0].repeat(3, 1, 1, 1) * model.vae.cfg.scaling_factor
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (len(z),), generator=g)
        cond = sd.encode_prompts(model, ["a photo of sks dog"] * len(z),
                                 original_size=torch.tensor([c.original_size for c in crops]).repeat(3, 1),
                                 crop_top_left=torch.tensor([c.top_left for c in crops]).repeat(3, 1),
                                 target_size=(R, R))
        pred = model.unet(ddim.add_noise(z, noise, t, ddim.alphas_cumprod()), t, cond.context, cond.y)
    return torch.nn.functional.mse_loss(pred, noise).item()


@pytest.fixture(scope="module")
def trained(xl):
    """A short SDXL run, gradient checkpointing on (the default)."""
    out = xl / "run"
    r = run("train.py", *args(xl, out, "--steps", 20, "--lr", "5e-3", "--no-prior"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_short_sdxl_run_lowers_the_loss_and_records_the_resolved_flags(xl, trained):
    before, after = fixed_loss(xl), fixed_loss(xl, trained / "shifts.safetensors")
    assert after < 0.9 * before, (before, after)
    config = json.loads((trained / "config.json").read_text())
    assert (config["resolution"], config["grad_checkpointing"]) == (R, True)


def test_sdxl_shift_file_holds_both_text_encoders_and_applies_through_sample_py(xl, trained, tmp_path):
    from conftest import load_with_shifts
    tensors, meta = shift_files.read_shift_file(trained / "shifts.safetensors")
    model = sd.load(xl / "model.safetensors")
    expected = {shift_files.key_of(model, n): svdiff.shift_length(m)
                for n, m in svdiff.shiftable_modules(model, "all")}
    assert {k: v.shape[0] for k, v in tensors.items()} == expected
    for prefix in ("model.diffusion_model.", "conditioner.embedders.0.", "conditioner.embedders.1."):
        assert any(k.startswith(prefix) and t.abs().max() > 0 for k, t in tensors.items()), prefix
    assert meta["fingerprint"] == fingerprint.fingerprint(model)
    # round trip: the file's δ are the run's own (resume.pt keeps them in fp32)
    state = torch.load(trained / "resume.pt", weights_only=True)["delta"]
    shifted = load_with_shifts(xl / "model.safetensors", trained / "shifts.safetensors")
    assert all(torch.equal(m.delta.detach(), state[k]) for k, m in shift_files.shifts_by_key(shifted))
    # sample.py (its base model from the file's metadata) gives the images of the shifted model
    common = ["--prompt", "a photo of sks dog", "--steps", 2, "--height", R, "--width", R, "--num-images", 1,
              "--seed", 3, "--svd-cache", xl / "svd.safetensors"]
    r = run("sample.py", *common, "--shifts", trained / "shifts.safetensors", "--out", tmp_path / "with")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("sample.py", *common, "--model", xl / "model.safetensors", "--out", tmp_path / "base")
    assert r.returncode == 0, r.stderr[-3000:]
    with torch.no_grad():
        want = sd.text_to_image(shifted, ["a photo of sks dog"], steps=2, height=R, width=R, progress=False,
                                generator=torch.Generator().manual_seed(3))
    want = (want[0].permute(1, 2, 0).numpy() * 255).round()
    got, base = (np.asarray(Image.open(tmp_path / d / "000.png"), dtype=float) for d in ("with", "base"))
    assert np.abs(got - want).max() <= 2 and np.abs(base - want).mean() > 5


def test_resumed_sdxl_run_ends_bit_exact_as_the_uninterrupted_run(xl, tmp_path):
    flags = ["--save-every", 2, "--flip", "--lr", "5e-3", "--no-prior", "--no-grad-checkpointing"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    for out, steps, extra in ((whole, 4, []), (part, 2, []), (part, 4, ["--resume"])):
        r = run("train.py", *args(xl, out, "--steps", steps, *flags, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(o / "resume.pt", weights_only=True)["delta"] for o in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("conditioner.embedders.1.") and a[k].abs().max() > 0 for k in a)
    log = lambda o: [(l["step"], l["loss"]) for l in map(json.loads, (o / "log.jsonl").read_text().splitlines())]
    assert log(part) == log(whole) and [s for s, _ in log(part)] == [1, 2, 3, 4]


def test_cutmix_on_sdxl_separates_attention_at_the_levels_that_have_it(xl, tmp_path, monkeypatch):
    """Collages: the unmix loss is finite, on the maps of levels 1 and 2 and the middle (level 0 has no attention:
    no map at the latent's full 8 x 8), and a collage's micro-conditioning is an image made at R x R."""
    out = tmp_path / "cutmix"
    a = resolved(*args(xl, out, "--images", xl / "sculpture", "--token", "zwx", "--cutmix-prob", 1, "--steps", 2,
                       "--no-prior", "--no-grad-checkpointing"))
    real_unmix, real_prompts = svdiff.unmix_loss, sd.encode_prompts
    maps, sizes = [], []
    monkeypatch.setattr(svdiff, "unmix_loss", lambda probs, *rest: maps.append(probs) or real_unmix(probs, *rest))
    monkeypatch.setattr(sd, "encode_prompts", lambda model, prompts, **s: sizes.append(s) or
                        real_prompts(model, prompts, **s))
    train.train(a)
    monkeypatch.undo()
    assert len(maps) == 2  # one per step
    for probs in maps:
        assert {p.shape[2] for _, p in probs} == {4 * 4, 2 * 2}
        assert not any(name.startswith(("input_blocks.1.", "input_blocks.2.", "output_blocks.6.", "output_blocks.7.",
                                        "output_blocks.8.")) for name, _ in probs)
        assert any(name.startswith("middle_block.") for name, _ in probs)
    for s in sizes:
        assert s["original_size"].tolist() == [[R, R]] and s["crop_top_left"].tolist() == [[0, 0]]
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(l["unmix_loss"]) and l["unmix_loss"] > 0 for l in log)


def test_a_collage_prompt_with_exclamation_marks_places_each_subject_alike_in_both_tokenizers(xl):
    """The subjects' positions (from the first tokenizer) index both halves of SDXL's context: the second tokenizer
    reads "!" as the first does (open_clip's BPE, not diffusers' pad id 0 for each "!"), so they hold there too."""
    model = sd.load(xl / "model.safetensors", components=("text_encoder",))
    prompt = "wow!! a sks dog!!! and a zwx sculpture!"
    for token, first in (("sks", 4), ("zwx", 9)):  # BOS wow !! a sks dog !!! and a zwx
        positions = svdiff.token_positions(model.tokenizer, prompt, token)
        assert positions[0] == first and positions == svdiff.token_positions(model.tokenizer_2, prompt, token)


# ---------------------------------------------------------------------------------------------------------------
# edit.py


def test_edit_on_sdxl_fine_tunes_inverts_and_samples_with_the_images_sizes(xl, tmp_path, monkeypatch):
    """End to end on a 64 x 101 photo: fine-tuning rows, the inversion and both halves of the guided sampling are
    all conditioned on the image's original size and centre crop, made at R x R."""
    out = tmp_path / "edit"
    seen = []
    real_prompts, real_negative = sd.encode_prompts, sd.encode_negative
    monkeypatch.setattr(sd, "encode_prompts", lambda model, prompts, **s: seen.append(("prompt", s)) or
                        real_prompts(model, prompts, **s))
    monkeypatch.setattr(sd, "encode_negative", lambda model, negative, n, **s: seen.append(("negative", s)) or
                        real_negative(model, negative, n, **s))
    edit.main(list(map(str, ["--image", xl / "dog" / "0.png", "--prompt", "a photo of a dog", "--edit",
                             "a photo of a dog in a hat", "--model", xl / "model.safetensors", "--resolution", R,
                             "--steps", 2, "--sample-steps", 2, "--svd-cache", xl / "svd.safetensors",
                             "--out", out])))
    monkeypatch.undo()
    original, corner, _ = expected_crop(*SIZES[0])
    kinds = [k for k, _ in seen]
    assert kinds.count("prompt") == 2 + 2 and kinds.count("negative") == 1  # 2 steps; invert; sample
    for _, s in seen:
        assert torch.as_tensor(s["original_size"]).reshape(-1, 2).tolist() == [list(original)]
        assert torch.as_tensor(s["crop_top_left"]).reshape(-1, 2).tolist() == [list(corner)]
        assert tuple(s["target_size"]) == (R, R)
    assert Image.open(out / edit.output_name(0, "a photo of a dog in a hat", 0)).size == (R, R)
    assert (out / "comparison.png").is_file()
    tensors, _ = shift_files.read_shift_file(out / "shifts.safetensors")
    assert any(k.startswith("conditioner.embedders.1.") for k in tensors)
    config = json.loads((out / "edit_config.json").read_text())
    assert (config["resolution"], config["grad_checkpointing"]) == (R, True)
