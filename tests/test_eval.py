"""eval.py: its DINO, CLIP-I and CLIP-T equal a direct computation with transformers on the images it saved; the same
seeds give the same images and numbers, every shift file sampled from the same noise (sample.py's for seed + the
prompt's index); bad input is one line, before anything heavy is loaded or sampled. Tiny random SD, CLIP and DINO
models, the three real photos of tests/photos, no network (a fake Hub on 127.0.0.1)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer, ViTModel

import eval as eval_py
import sample
import tiny
from conftest import PHOTOS, ROOT, load_with_shifts, random_deltas_, require_bpe_vocab, tiny_model_folder
from fakehub import FakeHub
from support import fast_layer, shift_files

TEMPLATES = ["a {token} {class} in the snow", "a red {token} {class}"]
SIZE = ["--num-images", "2", "--steps", "2", "--resolution", "64", "--device", "cpu"]


def shift_file(model_folder, path, seed, unet_only=False):
    """A shift file of random δ (a trained run's size) on every layer of the model in `model_folder`, or on its
    UNet's alone."""
    model = load_with_shifts(model_folder)
    fast_layer.add_spectral_shifts(model, progress=False)
    random_deltas_(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    deltas = {k: m.delta for k, m in shift_files.shifts_by_key(model) if not unet_only or "diffusion_model" in k}
    shift_files.save_shift_file(model, path, deltas=deltas)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SD1 model; a run folder holding two kept steps' shift files and the config.json train.py writes; the
    photos as the subject's folder; tiny CLIP and DINO folders; a prompt file of two DreamBench prompts."""
    root = tiny_model_folder(tmp_path_factory, "eval")
    model = root / "model"
    run = root / "runs" / "sks"
    # the second shifts fewer layers than the first: its row must not keep the first's δ in the others
    files = [shift_file(model, run / f"step-0000{n}.safetensors", seed=n, unet_only=n == 2) for n in (1, 2)]
    shutil.copytree(PHOTOS, root / "dog", ignore=shutil.ignore_patterns("*.md"))
    (run / "config.json").write_text(json.dumps({"images": [str(root / "dog")], "token": ["sks"],
                                                 "class_word": ["dog"], "steps": 2}))
    tiny.save_transformers(tiny.tiny_clip(), root / "clip", tiny.CLIP_PREPROCESS, bin_too=False)
    tiny.save_transformers(tiny.tiny_vit(), root / "dino", tiny.DINO_PREPROCESS, bin_too=False)
    tiny.write_tokenizer_files(root / "clip_tokenizer", require_bpe_vocab(), "sd1")
    (root / "prompts.txt").write_text("\n".join(TEMPLATES) + "\n")
    return dict(root=root, model=model, files=files, run=run)


def eval_args(s, out, *extra):
    return ["--shifts", str(s["run"] / "step-*.safetensors"), "--model", str(s["model"]), "--clip",
            str(s["root"] / "clip"), "--dino", str(s["root"] / "dino"), "--prompts", str(s["root"] / "prompts.txt"),
            *SIZE, "--out", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def evaluated(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    eval_py.main(eval_args(setup, out))
    return out, json.loads((out / "eval.json").read_text())


def cosines(a, b):
    a, b = a.double(), b.double()
    return (a / a.norm(dim=-1, keepdim=True)) @ (b / b.norm(dim=-1, keepdim=True)).T


def test_the_metrics_equal_transformers_on_the_saved_images(setup, evaluated):
    """Every row's DINO, CLIP-I and CLIP-T (per prompt and overall, mean and standard error) and the real row, from
    the PNGs eval.py wrote, computed with CLIPModel, ViTModel, their image processors and CLIPTokenizer."""
    out, result = evaluated
    root = setup["root"]
    clip, vit = CLIPModel.from_pretrained(root / "clip").eval(), ViTModel.from_pretrained(root / "dino").eval()
    clip_px, dino_px = (AutoImageProcessor.from_pretrained(root / m) for m in ("clip", "dino"))
    tokenizer = CLIPTokenizer.from_pretrained(root / "clip_tokenizer")
    photos = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in sorted((root / "dog").iterdir())]

    def clip_images(images):
        return clip.get_image_features(pixel_values=clip_px(images, return_tensors="pt").pixel_values).pooler_output

    def dino_images(images):
        return vit(pixel_values=dino_px(images, return_tensors="pt").pixel_values).last_hidden_state[:, 0]

    with torch.no_grad():
        ref_clip, ref_dino = clip_images(photos), dino_images(photos)
        real = {"dino": cosines(ref_dino, ref_dino), "clip_i": cosines(ref_clip, ref_clip)}
        for k, sims in real.items():
            pairs = sims[~torch.eye(len(photos), dtype=torch.bool)]
            assert result["rows"]["real"]["overall"][k]["mean"] == pytest.approx(pairs.mean().item(), abs=1e-5)
        assert set(result["rows"]) == {"real", "base", "step-00001", "step-00002"}
        for row in ("base", "step-00001", "step-00002"):
            every = {"dino": [], "clip_i": [], "clip_t": []}
            for n, template in enumerate(TEMPLATES):
                images = [Image.open(out / "images" / row / f"{n:02d}_{j}.png") for j in range(2)]
                text = template.replace("{token} ", "").replace("{class}", "dog")  # CLIP-T: no token, any row
                ids = tokenizer([text], padding="max_length", max_length=77, return_tensors="pt")
                image_clip = clip_images(images)
                scores = {"dino": cosines(dino_images(images), ref_dino).mean(1),
                          "clip_i": cosines(image_clip, ref_clip).mean(1),
                          "clip_t": cosines(image_clip, clip.get_text_features(**ids).pooler_output)[:, 0]}
                prompt = template.replace("{token}", "sks" if row != "base" else "").replace("{class}", "dog")
                got = result["rows"][row]["prompts"][" ".join(prompt.split())]
                for k, v in scores.items():
                    assert got[k]["mean"] == pytest.approx(v.mean().item(), abs=1e-5), (row, n, k)
                    every[k].append(v)
            for k, v in every.items():
                v = torch.cat(v).numpy()
                overall = result["rows"][row]["overall"][k]
                assert overall["n"] == 4 and overall["mean"] == pytest.approx(v.mean(), abs=1e-5), (row, k)
                assert overall["se"] == pytest.approx(v.std(ddof=1) / np.sqrt(len(v)), abs=1e-5), (row, k)
    assert (out / "sheet.png").is_file()


def test_the_scatter_plot_is_written_where_matplotlib_is_and_the_rest_works_without_it(setup, evaluated, tmp_path):
    """With matplotlib (requirements-dev.txt has it) scatter.png is written; in a Python where it cannot be imported,
    the same run writes everything else and says how to get the plot."""
    out, result = evaluated
    assert eval_py.plt is not None and Image.open(out / "scatter.png").size[0] > 100
    without = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['eval.py'] + sys.argv[1:]; "
               f"sys.path.insert(0, {str(ROOT)!r}); runpy.run_path({str(ROOT / 'eval.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", without, *eval_args(setup, tmp_path / "out")], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(pip install matplotlib for scatter.png)" in r.stdout
    assert not (tmp_path / "out" / "scatter.png").exists() and (tmp_path / "out" / "sheet.png").is_file()
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["rows"] == result["rows"]


def test_the_subject_and_live_prompts_come_from_the_run(setup, tmp_path):
    """--token, --class-word and --images from the run's config.json; a dog gets DreamBench's live-subject list,
    another class its object list."""
    a = eval_py.resolve(eval_py.parse_args(["--shifts", str(setup["files"][0]), "--model", str(setup["model"]),
                                            "--out", str(tmp_path / "out")]))
    assert (a.token, a.class_word, a.images, a.prompts) == ("sks", "dog", str(setup["root"] / "dog"), "live")
    assert eval_py.prompt_templates(a.prompts)[10] == "a {token} {class} wearing a red hat"
    a = eval_py.resolve(eval_py.parse_args(["--shifts", str(setup["files"][0]), "--model", str(setup["model"]),
                                            "--class-word", "backpack", "--out", str(tmp_path / "out")]))
    assert a.prompts == "object" and eval_py.prompt_templates(a.prompts)[10].endswith("wheat field in the background")


def test_same_seeds_give_the_same_images_and_numbers_and_every_file_samples_sample_pys_noise(setup, evaluated,
                                                                                            tmp_path):
    """A second eval: the same PNGs and the same eval.json rows. Each shift file's image j of prompt n is sample.py's
    image j with --seed n (the default seed 0 + n): every file sampled from the same initial noise."""
    out, result = evaluated
    eval_py.main(eval_args(setup, tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "eval.json").read_text())["rows"] == result["rows"]
    for png in (out / "images").rglob("*.png"):
        assert (tmp_path / "again" / png.relative_to(out)).read_bytes() == png.read_bytes(), png
    for f in setup["files"]:
        for n, template in enumerate(TEMPLATES):
            folder = tmp_path / f"sample-{f.stem}-{n}"
            sample.main(["--model", str(setup["model"]), "--shifts", str(f), "--prompt",
                         template.format(token="sks", **{"class": "dog"}), "--seed", str(n), "--num-images", "2",
                         "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--out", str(folder)])
            for j in range(2):
                ours = np.asarray(Image.open(out / "images" / f.stem / f"{n:02d}_{j}.png")).astype(int)
                theirs = np.asarray(Image.open(folder / f"{j:03d}.png")).astype(int)
                assert np.abs(ours - theirs).max() <= 1, (f.stem, n, j)


def test_an_earlier_eval_is_not_overwritten_without_overwrite(setup, evaluated):
    out, _ = evaluated
    with pytest.raises(ValueError, match="holds an earlier eval's results; pass --overwrite"):
        eval_py.resolve(eval_py.parse_args(eval_args(setup, out)))


def test_a_prompt_file_without_the_placeholders_is_one_line(setup, tmp_path):
    (tmp_path / "p.txt").write_text("a dog in the snow\n")
    with pytest.raises(ValueError, match=r"each line must be a prompt with \{token\} and \{class\}"):
        eval_py.resolve(eval_py.parse_args([*eval_args(setup, tmp_path / "out"), "--prompts", str(tmp_path / "p.txt")]))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, before anything heavy (a fresh process: huggingface_hub reads HF_* when imported)


@pytest.fixture(scope="module")
def hub(setup):
    hub = FakeHub()
    hub.add("org/tiny-sd", setup["model"])
    hub.add("openai/tiny-clip", setup["root"] / "clip")
    hub.add("facebook/tiny-dino", setup["root"] / "dino")
    hub.add("org/another-clip", setup["root"] / "clip")
    hub.start()
    yield hub
    hub.stop()


def run_eval(*args, env, cwd):
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


def hub_env(url, home):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and k != "SVDIFF_MODEL"}
    return {**env, "HF_ENDPOINT": url, "HF_HOME": str(home)}


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens: an unreachable Hub."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_input_is_one_line_before_any_model_is_fetched_or_sampled(setup, hub, tmp_path):
    """The base model and the small ones are Hub ids (an empty cache): a reference folder with no usable image, a
    CLIP repo that is not a CLIP, an unreachable Hub. Not one request for the base model; nothing written."""
    s, env = setup, hub_env(hub.url, tmp_path / "hf")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    common = ["--shifts", s["files"][0], "--model", "org/tiny-sd", *SIZE, "--out", tmp_path / "out"]
    cases = [
        (["--images", tmp_path / "broken", "--clip", "openai/tiny-clip", "--dino", "facebook/tiny-dino"], env,
         "--images", "no usable images"),
        (["--clip", "facebook/tiny-dino", "--dino", "facebook/tiny-dino"], env,
         "facebook/tiny-dino", "not a CLIP model (transformers' CLIPModel): config.json's model_type is 'vit'"),
        (["--clip", "openai/tiny-clip", "--dino", "org/another-clip"], env,
         "org/another-clip", "not a DINO ViT model (transformers' ViTModel): config.json's model_type is 'clip'"),
        ([], hub_env(f"http://127.0.0.1:{closed_port()}", tmp_path / "empty"),  # the default CLIP, from nowhere
         "openai/clip-vit-base-patch32", "Hugging Face cache"),
    ]
    for extra, case_env, bad, words in cases:
        hub.log.clear()
        line = run_eval(*common, *extra, env=case_env, cwd=tmp_path)
        assert line.startswith(f"error: {bad}") and words in line, line
        assert hub.requested("org/tiny-sd") == set()
        # the wrong repo judged by its configs alone: its weights not fetched
        assert hub.requested(bad) <= {"config.json", "preprocessor_config.json"}
        assert not (tmp_path / "out").exists()


def test_a_shift_file_of_another_base_model_is_refused_before_sampling(setup, hub, tmp_path):
    """Another family: said from the model's header (a Hub id's configs), before the model is loaded (its weights
    fetched); another model of the same family (the fingerprint, a digest of the weights): said once the weights are
    read, before any SVD or image."""
    tiny.write_folder(tmp_path / "sd2", "sd2", require_bpe_vocab())
    sd2_file = shift_file(tmp_path / "sd2", tmp_path / "sd2.safetensors", seed=3)
    sd1_other = tmp_path / "sd1-other"
    tiny.write_folder(sd1_other, "sd1", require_bpe_vocab())  # the same architecture, other random weights
    small = ["--clip", setup["root"] / "clip", "--dino", setup["root"] / "dino", "--images", setup["root"] / "dog",
             "--token", "sks", "--class-word", "dog", *SIZE, "--out", tmp_path / "out"]
    line = run_eval("--shifts", sd2_file, "--model", setup["model"], *small, env=os.environ, cwd=tmp_path)
    assert "shifts for an sd2 model, but" in line and "is sd1; pass the base model they were trained on" in line
    hub.log.clear()
    line = run_eval("--shifts", sd2_file, "--model", "org/tiny-sd", *small, env=hub_env(hub.url, tmp_path / "hf"),
                    cwd=tmp_path)
    assert "shifts for an sd2 model, but org/tiny-sd is sd1" in line
    assert hub.requested("org/tiny-sd") == {"unet/config.json", "vae/config.json", "text_encoder/config.json"}
    line = run_eval("--shifts", setup["files"][0], "--model", sd1_other, *small, env=os.environ, cwd=tmp_path)
    assert "trained on a different base model (fingerprint" in line
    assert not (tmp_path / "out").exists()
