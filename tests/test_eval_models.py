"""The evaluation's models (support/clip_image.py, support/dino.py) give transformers' numbers: tiny random
CLIPModel / ViTModel written by transformers (model.safetensors, and pytorch_model.bin as older transformers
pickled it), fed real photos; and a Hub id fetches only the files they read (tests/fakehub.py, no internet)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

import tiny
from conftest import PHOTOS, ROOT, require_bpe_vocab
from fakehub import FakeHub
from support import clip_image, dino

PROMPTS = ["", "dog", "a photo of sks dog", "a sks backpack on top of a purple rug in a forest, seen from above",
           "a red teapot " * 30]  # the last is cut to 77 tokens, as transformers' truncation cuts it


@pytest.fixture(scope="module")
def photos():
    paths = sorted(PHOTOS.glob("*.jpg"))
    dog = Image.open(PHOTOS / "dog-00.jpg")
    return [Image.open(p) for p in paths] + [dog.crop((0, 100, 780, 481))]  # and one that is not square


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return {act: (model, tiny.save_transformers(model, root / act, tiny.CLIP_PREPROCESS))
            for act, model in (("quick_gelu", tiny.tiny_clip("quick_gelu")), ("gelu", tiny.tiny_clip("gelu")))}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    model = tiny.tiny_vit()
    return model, tiny.save_transformers(model, tmp_path_factory.mktemp("vit") / "dino", tiny.DINO_PREPROCESS)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny.write_tokenizer_files(folder, require_bpe_vocab(), "sd1")
    return CLIPTokenizer.from_pretrained(folder)


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def processed(folder, images):
    return AutoImageProcessor.from_pretrained(folder)(images, return_tensors="pt").pixel_values


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])  # OpenAI's CLIP; OpenCLIP's in transformers' layout
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_clip_image_features_equal_get_image_features(clip_models, photos, act, weights):
    model, folder = clip_models[act]
    ours = clip_image.load(str(folder if weights == "safetensors" else folder.with_name(f"{act}-bin")))
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=processed(folder, photos)).pooler_output
    got = ours.image_features(photos)
    assert got.shape == (len(photos), 24) and relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_clip_text_features_equal_get_text_features(clip_models, hf_tokenizer, act, weights):
    model, folder = clip_models[act]
    ours = clip_image.load(str(folder if weights == "safetensors" else folder.with_name(f"{act}-bin")))
    ids = hf_tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(**ids).pooler_output
    got = ours.text_features(PROMPTS)
    assert got.shape == (len(PROMPTS), 24)
    for g, e in zip(got, expected):  # each prompt, so a wrong EOS position in one cannot hide among the others
        assert relative_error(g, e) <= 1e-5


def test_an_old_clip_config_is_read_as_transformers_reads_it(clip_models, photos, hf_tokenizer, tmp_path):
    """openai/clip-vit-large-patch14's config.json: the sizes in vision_config_dict / text_config_dict, which win
    over vision_config / text_config, and eos_token_id 2 (before transformers' fix), which pools at the highest id."""
    model, folder = clip_models["quick_gelu"]
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config_dict"], cfg["text_config_dict"] = cfg["vision_config"], cfg["text_config"]
    cfg["vision_config"] = {**cfg["vision_config"], "hidden_size": 768, "num_hidden_layers": 24}
    cfg["text_config"] = {**cfg["text_config"], "hidden_size": 512}
    cfg["text_config_dict"]["eos_token_id"] = 2
    for f in ("model.safetensors", "preprocessor_config.json"):
        (tmp_path / f).symlink_to(folder / f)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    oracle = CLIPModel.from_pretrained(tmp_path).eval()
    assert oracle.config.text_config.eos_token_id == 2 and oracle.config.vision_config.hidden_size == 48
    ours = clip_image.load(str(tmp_path))
    ids = hf_tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = oracle.get_image_features(pixel_values=processed(folder, photos)).pooler_output
        text = oracle.get_text_features(**ids).pooler_output
    assert relative_error(ours.image_features(photos), image) <= 1e-5
    assert relative_error(ours.text_features(PROMPTS), text) <= 1e-5


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_dino_features_equal_the_vit_cls_state(vit, photos, weights):
    model, folder = vit
    assert any(k.startswith("pooler.") for k in load_file(folder / "model.safetensors"))  # there, and left unread
    ours = dino.load(str(folder if weights == "safetensors" else folder.with_name("dino-bin")))
    with torch.no_grad():
        expected = model(pixel_values=processed(folder, photos)).last_hidden_state[:, 0]
    got = ours.image_features(photos)
    assert got.shape == (len(photos), 48) and relative_error(got, expected) <= 1e-5


def test_a_model_of_the_other_kind_is_one_line(clip_models, vit):
    with pytest.raises(ValueError, match="not a DINO ViT model .* model_type is 'clip'"):
        dino.load(str(clip_models["gelu"][1]))
    with pytest.raises(ValueError, match="not a CLIP model .* model_type is 'vit'"):
        clip_image.load(str(vit[1]))


def test_a_path_that_is_neither_a_folder_nor_a_hub_id_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="no such folder, and not a Hugging Face Hub id .* e.g. openai/clip-vit-base"):
        clip_image.load(str(tmp_path / "no" / "such" / "clip"))


def test_a_folder_whose_preprocessing_does_not_fit_the_model_is_refused(vit, tmp_path):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).symlink_to(vit[1] / f)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**tiny.DINO_PREPROCESS, "size": 224}))
    with pytest.raises(ValueError, match=r"makes images of \(224, 224\) pixels, but the model takes 32 x 32"):
        dino.load(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Hub ids (a fresh process per load: huggingface_hub reads HF_ENDPOINT / HF_HOME when it is imported)

CLIP_FILES = {"config.json", "preprocessor_config.json", "model.safetensors"}
# What a CLIP repo on the Hub also holds (openai/clip-vit-base-patch32's layout) and a load must never fetch
CLIP_EXTRAS = {"pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "vocab.json", "merges.txt",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md"}
LOAD = ("import sys; sys.path.insert(0, {root!r}); from PIL import Image; from support import clip_image, dino\n"
        "try:\n"
        "    m = (clip_image if sys.argv[1] == 'clip_image' else dino).load(sys.argv[2])\n"
        "except ValueError as e:\n"
        "    sys.exit(f'error: {{e}}')\n"
        "print(m.source, m.image_features([GREY]).sum().item())").replace("GREY", "Image.new('RGB', (40, 30), 'grey')")
GREY = Image.new("RGB", (40, 30), "grey")


@pytest.fixture(scope="module")
def hub(clip_models, vit, tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    clip_repo, sd_repo = root / "clip", root / "sd"
    clip_repo.mkdir()
    for f in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (clip_repo / f).write_bytes((clip_models["quick_gelu"][1] / f).read_bytes())
    (clip_repo / "pytorch_model.bin").write_bytes((clip_models["quick_gelu"][1].with_name("quick_gelu-bin") /
                                                   "pytorch_model.bin").read_bytes())
    for f in CLIP_EXTRAS - {"pytorch_model.bin"}:
        (clip_repo / f).write_text("{}")
    hub = FakeHub()
    hub.add("openai/tiny-clip", clip_repo)
    hub.add("org/clip-bin-only", clip_models["gelu"][1].with_name("gelu-bin"))
    hub.add("facebook/tiny-dino", vit[1])
    for f in ("model_index.json", "unet/config.json", "text_encoder/config.json"):  # an SD pipeline's layout
        (sd_repo / f).parent.mkdir(parents=True, exist_ok=True)
        (sd_repo / f).write_text("{}")
    hub.add("org/sd", sd_repo)
    hub.start()
    yield hub
    hub.stop()


def load_in_process(kind, spec, env):
    r = subprocess.run([sys.executable, "-c", LOAD.format(root=str(ROOT)), kind, spec], env=env, capture_output=True,
                       text=True, timeout=300)
    return r.returncode, r.stdout.split(), r.stderr


def hub_env(hub, home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), **extra}


def test_a_hub_id_fetches_only_what_is_read_then_loads_from_the_cache_without_a_request(hub, tmp_path):
    assert CLIP_EXTRAS <= set(hub.files("openai/tiny-clip"))
    env = hub_env(hub, tmp_path / "hf")
    hub.log.clear()
    rc, out, err = load_in_process("clip_image", "openai/tiny-clip", env)
    assert rc == 0, err[-3000:]
    assert hub.requested("openai/tiny-clip") == CLIP_FILES  # not the .bin beside the .safetensors, nor TF/Flax
    assert out[0] == f"openai/tiny-clip@{hub.commit('openai/tiny-clip')}"
    assert float(out[1]) == clip_image.load(str(hub.repos["openai/tiny-clip"])).image_features([GREY]).sum().item()
    hub.log.clear()
    for extra in ({}, {"HF_HUB_OFFLINE": "1"}):
        rc, again, err = load_in_process("clip_image", "openai/tiny-clip", {**env, **extra})
        assert rc == 0 and again == out, err[-3000:]
    assert hub.log == []


def test_a_repo_without_safetensors_fetches_its_bin(hub, tmp_path):
    rc, _, err = load_in_process("clip_image", "org/clip-bin-only", hub_env(hub, tmp_path / "hf"))
    assert rc == 0, err[-3000:]
    assert hub.requested("org/clip-bin-only") == {"config.json", "preprocessor_config.json", "pytorch_model.bin"}


def test_dino_from_the_hub_leaves_the_pooler_file_alone_and_loads_the_same_numbers(hub, tmp_path, vit):
    rc, out, err = load_in_process("dino", "facebook/tiny-dino", hub_env(hub, tmp_path / "hf"))
    assert rc == 0, err[-3000:]
    assert hub.requested("facebook/tiny-dino") == {"config.json", "preprocessor_config.json", "model.safetensors"}
    assert float(out[1]) == dino.load(str(vit[1])).image_features([GREY]).sum().item()


@pytest.mark.parametrize("kind,spec,words", [
    ("clip_image", "facebook/tiny-dino", "not a CLIP model (transformers' CLIPModel): config.json's model_type is 'vit'"),
    ("dino", "openai/tiny-clip", "not a DINO ViT model (transformers' ViTModel): config.json's model_type is 'clip'"),
    ("clip_image", "org/sd", "not a CLIP model (transformers' CLIPModel): the repo has no config.json, "
                             "preprocessor_config.json at its root"),
    ("dino", "org/missing", "has no model repo of that name (HTTP 404); check the id, e.g. facebook/dino-vits16"),
])
def test_a_repo_of_the_wrong_kind_is_one_line_and_its_weights_are_not_fetched(hub, tmp_path, kind, spec, words):
    hub.log.clear()
    rc, _, err = load_in_process(kind, spec, hub_env(hub, tmp_path / "hf"))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert errors[0].startswith(f"error: {spec}: ") and words in errors[0]
    assert hub.requested(spec) <= {"config.json", "preprocessor_config.json"}
