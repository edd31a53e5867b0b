"""Cut-Mix-Unmix: collages, the half masks at every attention resolution, subject token positions, the separation
loss and its gradient, and a short training run that lowers it."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ddim
import sd
import svdiff
import tiny
import train
from support import fast_layer, photos, shift_files, train_args
import unet as unet_lib

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]
# attention at two levels and in the middle block: three attention resolutions
THREE_LEVELS = dict(tiny.unet_config("sd1"), layers_per_block=1, block_out_channels=(32, 32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def test_cutmix_puts_the_centre_half_of_each_subject_side_by_side():
    left, right = torch.arange(16.).expand(2, 4, 3, 16), -torch.arange(16.).expand(2, 4, 3, 16)
    collage = svdiff.cutmix(left, right)
    assert collage.shape == left.shape
    assert collage[0, 0, 0].tolist() == list(range(4, 12)) + [-c for c in range(4, 12)]


@pytest.mark.parametrize("H,W", [(8, 8), (6, 10), (5, 7)])
def test_half_masks_line_up_with_the_halves_at_every_attention_resolution(H, W):
    """Each recorded map's size is found from its token count, and a map position counts as left (right) exactly
    when the strip of the image it stands for, [j/w, (j+1)/w) of the width, lies wholly in that half."""
    model = tiny.randomize_(unet_lib.UNet(unet_lib.config_from_diffusers(THREE_LEVELS)), 0)
    shapes = {}  # the real (h, w) entering every spatial transformer, by its attn2's name
    for name, m in model.named_modules():
        if isinstance(m, unet_lib.SpatialTransformer):
            m.register_forward_pre_hook(lambda mod, args, name=name: shapes.__setitem__(
                name + ".transformer_blocks.0.attn2", tuple(args[0].shape[-2:])))
    model.record_cross_attention(True)
    with torch.no_grad():
        model(torch.randn(1, 4, H, W), 10, torch.randn(1, 77, tiny.TEXT_WIDTH))
    maps = model.cross_attention_probs()
    assert len({p.shape[2] for _, p in maps}) == 3
    for name, p in maps:
        h, w = svdiff.attention_size(p.shape[2], H, W)
        assert (h, w) == shapes[name]
        from fractions import Fraction
        strips = [(Fraction(j, w), Fraction(j + 1, w)) for j in range(w)]
        for side, inside in (("left", lambda a, b: b <= Fraction(1, 2)), ("right", lambda a, b: a >= Fraction(1, 2))):
            expected = torch.tensor([inside(a, b) for a, b in strips]).expand(h, w).reshape(-1)
            assert torch.equal(svdiff.half_mask(h, w, side), expected), (name, side, h, w)
        # the UNet's tokens are the map flattened row-major: token i is column i % w
        columns = torch.arange(h * w) % w
        assert (columns[svdiff.half_mask(h, w, "left")] < w / 2).all()
        assert (columns[svdiff.half_mask(h, w, "right")] >= w / 2).all()


def test_a_token_count_that_no_level_of_the_latent_has_is_refused():
    assert svdiff.attention_size(64, 8, 8) == (8, 8) and svdiff.attention_size(4, 8, 8) == (2, 2)
    with pytest.raises(ValueError, match="10 attention tokens do not fit a 8x8 latent"):
        svdiff.attention_size(10, 8, 8)


def test_token_positions_find_each_subject_including_multi_token_words(bpe_vocab):
    tok = sd.clip_text.Tokenizer.from_bpe(bpe_vocab, 49407)
    prompt = "a photo of a sks dog on the left and a zwxqvf sculpture on the right"
    ids = tok([prompt])[0].tolist()
    for word in ("sks", "zwxqvf", "sculpture"):
        positions = svdiff.token_positions(tok, prompt, word)
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert [ids[i] for i in positions] == tok.encode(word)
        assert tok.decode([ids[i] for i in positions]) == word
    assert len(svdiff.token_positions(tok, prompt, "zwxqvf")) > 1  # a made-up word is several BPE pieces
    assert svdiff.token_positions(tok, prompt, "sks") == [5]  # BOS a photo of a sks
    with pytest.raises(ValueError, match="does not occur"):
        svdiff.token_positions(tok, prompt, "cat")
    with pytest.raises(ValueError, match="77 tokens"):
        svdiff.token_positions(tok, "word " * 80 + "sks", "sks")
    with pytest.raises(ValueError, match="has no tokens"):  # not [] (a NaN loss at the step that draws it)
        svdiff.token_positions(tok, prompt, " ")
    last = "a " * 74 + "sks"  # sks is the 75th token, the last one kept before EOS
    assert svdiff.token_positions(tok, last, "sks") == [75] and tok([last])[0][75] == tok.encode("sks")[0]
    with pytest.raises(ValueError, match="77 tokens"):  # the 76th is cut: EOS takes its place
        svdiff.token_positions(tok, "a " + last, "sks")


def separated_probs(h=4, w=6, leak=0.0):
    """Attention maps where token 2 looks only at the left half and token 5 only at the right, plus `leak`."""
    p = torch.zeros(2, 3, h * w, 77)
    left, right = svdiff.half_mask(h, w, "left"), svdiff.half_mask(h, w, "right")
    p[:, :, left, 2] = 0.5
    p[:, :, right, 5] = 0.5
    p[:, :, right, 2] += leak
    p[:, :, :, 0] = 1 - p.sum(-1)  # the rest on BOS, as in SD
    return p


def test_unmix_loss_is_zero_when_attention_is_separated_and_positive_otherwise():
    subjects = [[([2], "left"), ([5], "right")]] * 2
    H, W = 8, 12
    separated = [("a", separated_probs()), ("b", separated_probs(2, 3))]
    assert svdiff.unmix_loss(separated, subjects, H, W).item() == 0
    leaked = [("a", separated_probs(leak=0.1)), ("b", separated_probs(2, 3))]
    # layer a: token 2 puts 0.1 on the 12 right positions (mean of squares over its other half = 0.01),
    # token 5 nothing: 0.005; layer b: 0. Mean over layers: 0.0025
    assert svdiff.unmix_loss(leaked, subjects, H, W).item() == pytest.approx(0.0025)
    assert svdiff.unmix_loss(leaked, [[], []], H, W).item() == 0  # rows without subjects add nothing


def test_unmix_gradient_reaches_the_spectral_shifts(tmp_path, bpe_vocab):
    tiny.write_folder(tmp_path / "m", "sd1", bpe_vocab)
    model = sd.load(tmp_path / "m")
    fast_layer.add_spectral_shifts(model, progress=False)
    prompt = "a photo of a sks dog on the left and a zwx sculpture on the right"
    subjects = [[(svdiff.token_positions(model.tokenizer, prompt, "sks"), "left"),
                 (svdiff.token_positions(model.tokenizer, prompt, "zwx"), "right")]]
    model.unet.record_cross_attention(True)
    model.unet(torch.randn(1, 4, 8, 8), 500, sd.encode_prompts(model, [prompt]).context)
    loss = svdiff.unmix_loss(model.unet.cross_attention_probs(), subjects, 8, 8)
    assert loss > 0
    loss.backward()
    layers = dict(shift_files.shifts_by_key(model))
    attn2_k = [m for k, m in layers.items() if "attn2.to_k" in k]
    text = [m for k, m in layers.items() if k.startswith("cond_stage_model") and m.kind != "norm"]
    assert attn2_k and all(m.delta.grad.abs().sum() > 0 for m in attn2_k)
    assert any(m.delta.grad.abs().sum() > 0 for m in text)  # through the subject tokens' text states


@pytest.fixture(scope="module")
def two_subjects(tmp_path_factory):
    from conftest import photo, tiny_model_folder
    root = tiny_model_folder(tmp_path_factory, "cutmix")
    rng = np.random.default_rng(0)
    for name, colour in (("dog", [220, 40, 40]), ("sculpture", [40, 40, 220])):
        (root / name).mkdir()
        for i in range(2):
            Image.fromarray(photo(rng, (64, 64, 3), np.s_[16:48, 16:48], colour)).save(root / name / f"{i}.png")
    return root


def fixed_unmix_loss(root, shift_file=None):
    """The separation loss on fixed collages, noise and timesteps, with or without trained shifts."""
    from conftest import load_with_shifts
    model = load_with_shifts(root / "model", shift_file)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        z = {n: model.vae.encode(torch.stack(photos.load_image_folder(root / n, 64)[0]))[0] * model.vae.cfg.scaling_factor
             for n in ("dog", "sculpture")}
        total = 0.0
        for left, right in (("dog", "sculpture"), ("sculpture", "dog")):
            prompt = f"a photo of a {'sks' if left == 'dog' else 'zwx'} {left} on the left and a " \
                     f"{'sks' if right == 'dog' else 'zwx'} {right} on the right"
            x0 = svdiff.cutmix(z[left], z[right])
            t = torch.randint(0, 1000, (len(x0),), generator=g)
            x_t = ddim.add_noise(x0, torch.randn(x0.shape, generator=g), t, ddim.alphas_cumprod())
            model.unet.record_cross_attention(True)
            model.unet(x_t, t, sd.encode_prompts(model, [prompt] * len(x0)).context)
            subjects = [[(svdiff.token_positions(model.tokenizer, prompt, "sks"), "left" if left == "dog" else "right"),
                         (svdiff.token_positions(model.tokenizer, prompt, "zwx"), "right" if left == "dog" else "left")]]
            total += svdiff.unmix_loss(model.unet.cross_attention_probs(), subjects * len(x0), 8, 8).item()
    return total


def test_short_two_subject_run_lowers_the_unmix_loss_and_logs_it(two_subjects):
    root, out = two_subjects, two_subjects / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--images", root / "dog", "--token", "sks",
                        "--images", root / "sculpture", "--token", "zwx", "--model", root / "model",
                        "--resolution", "64", "--steps", "30", "--lr", "5e-3", "--no-prior", "--cutmix-prob", "1",
                        "--unmix-weight", "10000", "--sample-every", "1000", "--sample-steps", "1", "--out", out],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and all(l["unmix_loss"] is not None and l["unmix_loss"] >= 0 for l in log)
    before, after = fixed_unmix_loss(root), fixed_unmix_loss(root, out / "shifts.safetensors")
    assert after < 0.85 * before, (before, after)
    assert json.loads((out / "config.json").read_text())["class_word"] == ["dog", "sculpture"]


def two_subject_args():
    return train_args.parse(["--images", "photos/dog", "--token", "sks", "--images", "photos/sculpture",
                             "--token", "zwx", "--class-word", "dog", "--class-word", "sculpture"], train.Settings())


def test_collage_prompts_name_each_subject_with_its_place_in_both_orders():
    a = two_subject_args()
    assert train.cutmix_prompts(a, 0, 1) == ("a photo of a sks dog on the left and a zwx sculpture on the right",
                                             "a photo of a dog on the left and a sculpture on the right")
    assert train.cutmix_prompts(a, 1, 0) == ("a photo of a zwx sculpture on the left and a sks dog on the right",
                                             "a photo of a sculpture on the left and a dog on the right")
    a.cutmix_prompt = "{right} beside {left}"
    assert train.cutmix_prompts(a, 0, 1) == ("zwx sculpture beside sks dog", "sculpture beside dog")


def test_sample_grids_show_a_composition_of_two_subjects():
    a = two_subject_args()
    assert train.sample_prompt(a, "a photo of sks dog") == "a sks dog sitting beside a zwx sculpture"
    one = train_args.parse(["--images", "photos/dog", "--token", "sks"], train.Settings())
    assert train.sample_prompt(one, "a photo of sks dog") == "a photo of sks dog"


@pytest.mark.parametrize("p", [0.0, 0.3, 0.6, 1.0])
def test_collages_come_with_the_cutmix_probability_two_different_subjects_in_both_orders(p):
    g = torch.Generator().manual_seed(0)
    n = 4000
    draws = [train.draw_subjects(g, 3, p) for _ in range(n)]
    collages = [d for d in draws if len(d) == 2]
    assert abs(len(collages) / n - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1e-9  # within 4 standard deviations
    assert all(left != right for left, right in collages)
    if collages:  # every ordered pair of the 3 subjects, about equally often
        pairs = {pair: sum(tuple(c) == pair for c in collages) for pair in
                 [(i, j) for i in range(3) for j in range(3) if i != j]}
        assert min(pairs.values()) > 0.7 * len(collages) / 6, pairs
    singles = [d[0] for d in draws if len(d) == 1]
    assert len(singles) == n - len(collages) and (not singles or set(singles) == {0, 1, 2})
    assert all(len(train.draw_subjects(g, 1, 1.0)) == 1 for _ in range(10))  # one subject: never a collage
