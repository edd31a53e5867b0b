"""Base models by Hugging Face Hub id, against a fake Hub on 127.0.0.1 (tests/fakehub.py; no internet): what is
downloaded, the cache first with no request, offline use, a download cut off half-way, the one-line errors, and the
commands as the README writes them (no --model: the default repo id, served by the fake Hub under that id).

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE once, when it is imported, so every load runs in a
fresh Python process with its own environment, as a user's command does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sd
from conftest import ROOT, photo, require_bpe_vocab
from fakehub import FakeHub
from support import hub as hub_ids
from support import loading

MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "PNDMScheduler"],
               "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
               "feature_extractor": ["transformers", "CLIPImageProcessor"]}
WEIGHTS = ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model")
# What a run reads, and so all that may be fetched: the fp32 weights, or the fp16 variant for a half-precision run
NEEDED = {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/merges.txt", "tokenizer/vocab.json",
          "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "unet/config.json",
          "vae/config.json", "text_encoder/config.json"}
FP32 = NEEDED | {f"{w}.safetensors" for w in WEIGHTS}
FP16 = NEEDED | {f"{w}.fp16.safetensors" for w in WEIGHTS}
# What SD1.5's repo also holds and a run must never fetch
UNNEEDED = {"v1-5-pruned-emaonly.safetensors", "safety_checker/model.safetensors", "safety_checker/config.json",
            "feature_extractor/preprocessor_config.json", "README.md"}
# SDXL (stabilityai/stable-diffusion-xl-base-1.0's layout): a second text encoder and tokenizer
WEIGHTS_XL = WEIGHTS + ("text_encoder_2/model",)
NEEDED_XL = NEEDED | {"text_encoder_2/config.json", "tokenizer_2/merges.txt", "tokenizer_2/vocab.json",
                      "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json"}
FP32_XL = NEEDED_XL | {f"{w}.safetensors" for w in WEIGHTS_XL}
FP16_XL = NEEDED_XL | {f"{w}.fp16.safetensors" for w in WEIGHTS_XL}
# ... and its single files (one of them an offset-noise LoRA example: the repo is still a pipeline), other VAE
# copies, ONNX and OpenVINO exports
UNNEEDED_XL = {"sd_xl_base_1.0.safetensors", "sd_xl_offset_example-lora_1.0.safetensors", "vae_1_0/config.json",
               "vae_1_0/diffusion_pytorch_model.safetensors", "vae_decoder/model.onnx", "unet/model.onnx",
               "text_encoder_2/model.onnx", "text_encoder_2/openvino_model.xml", "README.md"}


def write_repo(folder: Path, family: str):
    """A tiny random SD diffusers repo laid out as SD1.5's on the Hub: fp32 weights and their fp16 variants, plus
    what a run must never fetch (UNNEEDED)."""
    import tiny
    tiny.write_folder(folder, family, require_bpe_vocab())
    for w in WEIGHTS:
        save_file({k: v.half() for k, v in load_file(folder / f"{w}.safetensors").items()},
                  folder / f"{w}.fp16.safetensors")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, folder / "v1-5-pruned-emaonly.safetensors")
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, folder / "safety_checker" / "model.safetensors")
    (folder / "feature_extractor").mkdir()
    (folder / "feature_extractor" / "preprocessor_config.json").write_text("{}")
    (folder / "README.md").write_text("a tiny random model\n")


def write_sdxl_repo(folder: Path):
    """A tiny random SDXL diffusers repo laid out as stable-diffusion-xl-base-1.0 on the Hub: fp32 weights and
    their fp16 variants, plus what a run must never fetch (UNNEEDED_XL)."""
    import tiny
    tiny.write_sdxl_folder(folder, require_bpe_vocab())
    for w in WEIGHTS_XL:
        save_file({k: v.half() for k, v in load_file(folder / f"{w}.safetensors").items()},
                  folder / f"{w}.fp16.safetensors")
    for f in UNNEEDED_XL:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        if f.endswith(".safetensors"):
            save_file({"w": torch.zeros(4)}, folder / f)
        else:
            (folder / f).write_text("{}")


def write_refiner_like(folder: Path):
    """What the SDXL refiner looks like from its file list: bigG (text_encoder_2/) alone."""
    for f in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder_2/config.json",
              "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "scheduler/scheduler_config.json"):
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_text("{}")
    for w in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder_2/model"):
        save_file({"w": torch.zeros(4)}, folder / f"{w}.safetensors")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_repo(root / "tiny-sd1", "sd1")
    write_repo(root / "tiny-sd2", "sd2")
    write_sdxl_repo(root / "tiny-sdxl")
    write_refiner_like(root / "refiner")
    hub = FakeHub()
    for repo_id, folder in (("org/tiny-sd1", "tiny-sd1"), (loading.DEFAULT_MODEL, "tiny-sd1"), ("org/tiny-sd2", "tiny-sd2"),
                            ("org/tiny-sdxl", "tiny-sdxl"), ("org/refiner", "refiner"), ("org/gated", "tiny-sd1"),
                            ("org/gated-403", "tiny-sd1")):
        hub.add(repo_id, root / folder)
    # A gated repo's info and file list are public, its files are not: 401 without a token, 403 with a token whose
    # account has not accepted the licence. A private repo is 401 throughout, as if it did not exist.
    hub.refuse("org/gated", 401, "GatedRepo", files_only=True)
    hub.refuse("org/gated-403", 403, "GatedRepo", files_only=True)
    hub.refuse("org/private", 401)
    hub.start()
    yield hub
    hub.stop()


def dead_endpoint():
    """The address of a fake Hub that was started and stopped: nothing listens there any more."""
    dead = FakeHub().start()
    url = dead.url
    dead.stop()
    return url


def hub_env(endpoint, home, **extra):
    """The environment of a user with no Hugging Face settings and no SVDIFF_MODEL, but HF_ENDPOINT and HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and k != "SVDIFF_MODEL"}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), **extra}


LOAD = ("import sys, torch; sys.path.insert(0, {root!r}); import sd; "
        "m = sd.load(sys.argv[1], dtype=getattr(torch, sys.argv[2])); "
        "print(m.source, m.prediction_type, sum(p.double().sum().item() for p in m.unet.parameters()))")


def load(spec, env, dtype="float32", cwd=None):
    """sd.load in a fresh process; returns (returncode, stdout's last line split: source, prediction type, the
    sum of the UNet's weights; stderr)."""
    r = subprocess.run([sys.executable, "-c", LOAD.format(root=str(ROOT)), spec, dtype], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    return r.returncode, (r.stdout.split("\n")[-2].split() if r.returncode == 0 else None), r.stderr


def unet_sum(folder, dtype):
    return sum(p.double().sum().item() for p in sd.load(folder, dtype=dtype, components=("unet",)).unet.parameters())


def run(script, *args, env, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------------------------------


def test_a_hub_id_fetches_only_what_the_run_reads_then_loads_from_the_cache_without_a_request(hub, tmp_path):
    assert UNNEEDED | {f"{w}.fp16.safetensors" for w in WEIGHTS} <= set(hub.files("org/tiny-sd1"))
    env = hub_env(hub.url, tmp_path / "hf")
    commit = hub.commit("org/tiny-sd1")
    hub.log.clear()
    rc, out, err = load("org/tiny-sd1", env)
    assert rc == 0, err[-3000:]
    assert hub.requested("org/tiny-sd1") == FP32  # nothing else, not even a HEAD request
    assert out[0] == f"org/tiny-sd1@{commit}"  # what a shift file records
    assert float(out[2]) == unet_sum(hub.repos["org/tiny-sd1"], torch.float32)

    hub.log.clear()
    rc, again, err = load("org/tiny-sd1", env)
    assert rc == 0, err[-3000:]
    assert again == out and hub.log == []  # the cache first: not one request
    for extra in ({"HF_ENDPOINT": dead_endpoint()}, {"HF_HUB_OFFLINE": "1"}):  # the Hub stopped; offline mode
        rc, again, err = load("org/tiny-sd1", {**env, **extra})
        assert rc == 0 and again == out, err[-3000:]
    assert hub.log == []


def test_half_precision_fetches_the_fp16_variant_and_a_revision_pins_the_commit(hub, tmp_path):
    commit = hub.commit("org/tiny-sd2")
    hub.log.clear()
    rc, out, err = load(f"org/tiny-sd2@{commit}", hub_env(hub.url, tmp_path / "hf"), "float16")
    assert rc == 0, err[-3000:]
    assert hub.requested("org/tiny-sd2") == FP16
    assert out[:2] == [f"org/tiny-sd2@{commit}", "v_prediction"]  # SD2's scheduler config came along
    assert float(out[2]) == unet_sum(hub.repos["org/tiny-sd2"], torch.float16)


def test_an_sdxl_repo_fetches_both_text_encoders_and_tokenizers_only_then_loads_from_the_cache(hub, tmp_path):
    """fp32 for a full-precision run, the fp16 variants for a half-precision one; never the repo's single files,
    its other VAE copies or its exports; the second run of either is served by the cache alone."""
    assert UNNEEDED_XL <= set(hub.files("org/tiny-sdxl"))
    for dtype, expected in (("float32", FP32_XL), ("float16", FP16_XL)):
        env = hub_env(hub.url, tmp_path / dtype)
        hub.log.clear()
        rc, out, err = load("org/tiny-sdxl", env, dtype)
        assert rc == 0, err[-3000:]
        assert hub.requested("org/tiny-sdxl") == expected
        assert out[:2] == [f"org/tiny-sdxl@{hub.commit('org/tiny-sdxl')}", "epsilon"]
        assert float(out[2]) == unet_sum(hub.repos["org/tiny-sdxl"], getattr(torch, dtype))
        hub.log.clear()
        rc, again, err = load("org/tiny-sdxl", {**env, "HF_HUB_OFFLINE": "1"}, dtype)
        assert rc == 0 and again == out and hub.log == [], err[-3000:]



RESOLVE = ("import sys; sys.path.insert(0, {root!r}); import train; from support import train_args; "
           "a = train_args.resolve(train_args.parse(['--images', 'dog', '--token', 'sks', '--model', sys.argv[1]], train.Settings())); "
           "print(a.resolution, a.grad_checkpointing)")


def test_train_defaults_of_an_sdxl_hub_id_fetch_only_the_configs_and_nothing_is_fetched_twice(hub, tmp_path):
    """train.resolve needs the family (SDXL: 1024 px and gradient checkpointing) before anything is loaded: it
    fetches the repo's configs alone (kilobytes), and the run's load then fetches the rest, not the configs again."""
    env = hub_env(hub.url, tmp_path / "hf")
    (tmp_path / "dog").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "dog" / "0.png")  # (read before the fetch)
    hub.log.clear()
    r = subprocess.run([sys.executable, "-c", RESOLVE.format(root=str(ROOT)), "org/tiny-sdxl"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["1024", "True"]
    configs = {f for f in FP32_XL if f == "model_index.json" or f.endswith("/config.json")}
    assert hub.requested("org/tiny-sdxl") == configs and len(configs) == 5  # the index, the four components'
    hub.log.clear()
    rc, _, err = load("org/tiny-sdxl", env)
    assert rc == 0, err[-3000:]
    assert hub.requested("org/tiny-sdxl") == FP32_XL - configs

def test_an_existing_local_path_wins_over_a_hub_id(hub, tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny-sd1").symlink_to(hub.repos["org/tiny-sd2"])  # the SD2 model, named as the SD1 repo
    hub.log.clear()
    rc, out, err = load("org/tiny-sd1", hub_env(hub.url, tmp_path / "hf"), cwd=tmp_path)
    assert rc == 0, err[-3000:]
    assert hub.log == [] and out[:2] == [str(hub.repos["org/tiny-sd2"].resolve()), "v_prediction"]


def test_a_download_cut_off_half_way_is_never_loaded_and_the_next_run_completes_it(hub, tmp_path):
    env = hub_env(hub.url, tmp_path / "hf")
    weights = "unet/diffusion_pytorch_model.safetensors"
    hub.drop[f"org/tiny-sd1/{weights}"] = 100  # every try of this file loses the connection half-way
    try:
        r = run("sample.py", "--model", "org/tiny-sd1", "--prompt", "x", "--out", tmp_path / "out", env=env,
                cwd=tmp_path)
    finally:
        hub.drop.clear()
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "run the command again" in errors[0]
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny-sd1" / "snapshots" / hub.commit("org/tiny-sd1")
    assert not (snapshot / weights).exists() and not list((tmp_path / "hf").rglob("*.incomplete"))
    assert not (tmp_path / "out").exists()

    rc, out, err = load("org/tiny-sd1", env)
    assert rc == 0, err[-3000:]
    assert float(out[2]) == unet_sum(hub.repos["org/tiny-sd1"], torch.float32)


@pytest.mark.parametrize("spec,words", [
    ("org/missing", "has no model repo of that name (HTTP 404)"),
    ("org/gated", "accept the licence on its page"),
    ("org/gated-403", "accept the licence on its page"),
    ("org/private", "set HF_TOKEN"),
    ("org/refiner", "not an SD 1.x/2.x/XL diffusers repo: it looks like an SDXL refiner"),
    ("org/tiny-sd1@v9", "has no revision 'v9'"),
    ("models/v1-5.safetensors", "no such file or folder, and not a Hugging Face Hub id"),
    ("unreachable", "cannot be reached"),
    ("offline", "HF_HUB_OFFLINE is set"),
])
def test_bad_model_is_one_line_and_writes_nothing(hub, tmp_path, spec, words):
    env = hub_env(hub.url, tmp_path / "hf")
    if spec == "unreachable":
        spec, env = "org/tiny-sd1", hub_env(dead_endpoint(), tmp_path / "hf")
    elif spec == "offline":
        spec, env = "org/tiny-sd1", hub_env(hub.url, tmp_path / "hf", HF_HUB_OFFLINE="1")
    hub.log.clear()
    r = run("sample.py", "--model", spec, "--prompt", "x", "--out", tmp_path / "out", env=env, cwd=tmp_path)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert words in errors[0]
    if words == "cannot be reached":
        assert "HF_ENDPOINT" in errors[0] and "local" in errors[0]
    assert not (tmp_path / "out").exists()
    assert not any(method == "GET" and route == "resolve" for method, _, route, _, _ in hub.log)  # nothing fetched


def test_train_then_sample_and_edit_run_as_written_on_the_default_model(hub, tmp_path):
    """`python train.py --images ./dog --token sks`, then sample.py and edit.py with --shifts and no --model."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    (tmp_path / "dog").mkdir()
    for i in range(2):
        Image.fromarray(photo(rng, (64, 64, 3), (slice(20, 44), slice(20, 44)), (200, 60, 40))).save(
            tmp_path / "dog" / f"{i}.png")
    env = hub_env(hub.url, tmp_path / "hf")
    commit = hub.commit(loading.DEFAULT_MODEL)
    hub.log.clear()
    r = run("train.py", "--images", "./dog", "--token", "sks", "--steps", "2", "--resolution", "64", "--no-prior",
            "--sample-every", "0", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"model: {loading.DEFAULT_MODEL} (default; --model to choose another)" in r.stdout.splitlines()
    assert hub.requested(loading.DEFAULT_MODEL) == FP32
    shift_file = Path("runs") / "sks" / "shifts.safetensors"
    with safe_open(str(tmp_path / shift_file), "pt") as f:
        assert f.metadata()["base_model"] == f"{loading.DEFAULT_MODEL}@{commit}"
    r = run("shifts.py", "info", shift_file, env=env, cwd=tmp_path)
    assert f"base_model: {loading.DEFAULT_MODEL}@{commit}" in r.stdout

    hub.log.clear()
    r = run("sample.py", "--prompt", "a photo of sks dog in the snow", "--shifts", shift_file, "--steps", "2",
            "--height", "64", "--width", "64", "--num-images", "1", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"model: {loading.DEFAULT_MODEL}@{commit} (the base model of {shift_file}; --model to choose another)" in \
        r.stdout.splitlines()
    assert hub.log == []  # the same base, from the cache (and the fingerprint check passed)
    assert (tmp_path / "out" / "000" / "grid.png").is_file()  # no --out: a new folder under out/

    r = run("edit.py", "--image", "dog/0.png", "--prompt", "a photo of a dog", "--edit", "a photo of a cat",
            "--shifts", shift_file, "--resolution", "64", "--sample-steps", "2", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"model: {loading.DEFAULT_MODEL}@{commit} (the base model of {shift_file}; --model to choose another)" in \
        r.stdout.splitlines()
    assert (tmp_path / "edits" / "0" / "comparison.png").is_file()
    assert hub.log == []


@pytest.mark.parametrize("spec,ids", [
    ("owner/name", ("owner/name", None)),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5@main", ("stable-diffusion-v1-5/stable-diffusion-v1-5", "main")),
    ("owner/name@refs/pr/1", ("owner/name", "refs/pr/1")),
    ("owner/name@", None),
    ("v1-5-pruned-emaonly.safetensors", None),
    ("models/v1-5.ckpt", None),
    ("./models/sd15", None),
    ("/abs/path", None),
    ("a/b/c", None),
    ("owner/..", None),
])
def test_what_counts_as_a_hub_id(spec, ids):
    assert hub_ids.split_repo_id(spec) == ids


@pytest.mark.parametrize("script,args,words", [
    ("sample.py", ["--prompt", "x", "--shifts", "notes.safetensors"], "not a readable .safetensors shift file"),
    ("sample.py", ["--prompt", "x", "--svd-cache", "notes.safetensors"], "is not an SVD cache"),
    ("edit.py", ["--image", "broken.png", "--prompt", "a", "--edit", "b"], "cannot be read as an image"),
    ("edit.py", ["--image", "ok.png", "--prompt", "a", "--edit", "b", "--shifts", "notes.safetensors"],
     "not a readable .safetensors shift file"),
    ("train.py", ["--images", "broken", "--token", "sks"], "no usable images"),
    ("shifts.py", ["export-lora", "notes.safetensors", "--out", "lora.safetensors"],
     "not a readable .safetensors shift file"),
    ("shifts.py", ["export-merged", "empty.safetensors", "--out", "merged.safetensors"], "no such shift file"),
])
def test_every_file_argument_is_judged_before_the_model_is_fetched(hub, tmp_path, script, args, words):
    """A first run (empty Hugging Face cache, the default model from the Hub) with one bad file argument: one line,
    and not one request to the Hub before it (SD1.5 is about 4 GB)."""
    (tmp_path / "notes.safetensors").write_text("my notes, not shifts\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.png")
    hub.log.clear()
    r = run(script, *args, env=hub_env(hub.url, tmp_path / "hf"), cwd=tmp_path)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert words in errors[0], errors[0]
    assert hub.log == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "broken.png", "notes.safetensors", "ok.png"]
