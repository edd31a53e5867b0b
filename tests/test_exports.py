"""The exports read by the loaders people use: `export-lora` through diffusers' `load_lora_weights` (peft), and
`export-merged` through `from_single_file`, give our model's outputs and sample.py's images."""
import copy
import json
import logging
import subprocess
import sys
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample
import sd
import shifts
import svdiff
import tiny
from conftest import require_bpe_vocab

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def shifted(request, tmp_path_factory):
    """A tiny model's single file, its diffusers copy, a shift file with random δ on every layer, and our model with
    that file's matrix shifts only (norm γ and embedding shifts cannot travel in a LoRA)."""
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    oracle = tiny.write_single_file(tmp / "base.safetensors", family)
    model = sd.load(tmp / "base.safetensors", vocab=require_bpe_vocab())
    svdiff.add_spectral_shifts(model, progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in svdiff.shifts(model):
            m.delta.copy_(torch.randn(m.delta.shape, generator=g) * (0.05 if m.kind == "norm" else m.sigma.mean()))
        shifts.save_shift_file(model, tmp / "shifts.safetensors")
        for _, m in svdiff.shifts(model):
            if m.kind in ("norm", "embedding"):
                m.delta.zero_()
    return family, tmp, oracle, model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def diffusers_pipeline(oracle):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    return StableDiffusionPipeline(vae=oracle["vae"], text_encoder=oracle["text_encoder"], tokenizer=None,
                                   unet=oracle["unet"], scheduler=DDIMScheduler(**tiny.SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@contextmanager
def loader_messages():
    """What diffusers logs and peft warns meanwhile (unexpected keys, alphas that matched no layer)."""
    class Collect(logging.Handler):
        def emit(self, record):
            self.messages.append(record.getMessage())
    handler = Collect()
    handler.messages = []
    logging.getLogger("diffusers").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield handler.messages
    handler.messages += [str(w.message) for w in caught]
    logging.getLogger("diffusers").removeHandler(handler)


@contextmanager
def truncated(model, k):
    """Our rank-k truncation: each layer's ΔW = Σ (ReLU(σᵢ+δᵢ) - σᵢ) uᵢvᵢᵀ cut to its k largest terms (δᵢ = 0 drops
    term i)."""
    saved = {m: m.delta.detach().clone() for _, m in svdiff.shifts(model)}
    with torch.no_grad():
        for m in saved:
            if m.kind not in ("norm", "embedding"):
                m.delta[m.delta_sigma().abs().argsort(descending=True)[k:]] = 0
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, d in saved.items():
                m.delta.copy_(d)


@pytest.mark.parametrize("rank", [4, 8, None])  # None: the full rank of every layer (exact)
def test_lora_loaded_by_diffusers_gives_our_rank_k_outputs(shifted, rank):
    family, tmp, oracle, model = shifted
    k = rank or 10 ** 6
    path = tmp / f"lora{k}.safetensors"
    shifts.export_lora(model, path, rank=k, dtype=torch.float32)
    lora = load_file(str(path))
    # one rank and one alpha in the whole file, whatever the layers' own ranks (out.2 has rank 4 here)
    assert len({float(v) for n, v in lora.items() if n.endswith(".alpha")}) == 1
    assert len({v.shape[0] for n, v in lora.items() if n.endswith(".lora_down.weight")}) == 1
    assert not any(w in n for n in lora for w in ("norm", "token_embedding", "position_embedding"))  # stay out

    pipe = diffusers_pipeline(copy.deepcopy(oracle))
    with loader_messages() as messages:
        pipe.load_lora_weights(str(path))  # raises on a key it cannot place
    assert not [m for m in messages if "unexpected" in m.lower() or "did not match" in m], messages
    # every LoRA of the file became a peft layer
    wrapped = [n for part in (pipe.unet, pipe.text_encoder) for n, m in part.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == len({n.split(".")[0] for n in lora})

    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, tiny.TEXT_WIDTH)
    ids = torch.randint(0, 49408, (2, 77))
    with torch.no_grad(), truncated(model, k):
        ours_unet, ours_text = model.unet(x, 7, ctx), model.text_encoder(ids)
    with torch.no_grad():
        errors = rel(pipe.unet(x, 7, ctx).sample, ours_unet), rel(pipe.text_encoder(ids).last_hidden_state, ours_text)
        assert max(errors) <= 1e-4, errors
        if rank is not None:  # and the truncation is not the full shift: the test sees the rank
            assert rel(model.unet(x, 7, ctx), ours_unet) > 1e-2


def config_folder(folder, oracle, family):
    """What `from_single_file(config=...)` reads instead of the Hub: the pipeline's component configurations."""
    oracle["unet"].save_config(folder / "unet")
    oracle["vae"].save_config(folder / "vae")
    oracle["text_encoder"].config.save_pretrained(folder / "text_encoder")
    tiny.write_tokenizer_files(folder / "tokenizer", require_bpe_vocab(), family)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny.SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}))
    return folder


def test_merged_checkpoint_from_single_file_gives_sample_py_images(shifted, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline
    family, tmp, oracle, _ = shifted
    merged = tmp_path / "merged.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "shifts.py"), "export-merged", str(tmp / "shifts.safetensors"),
                        "--model", str(tmp / "base.safetensors"), "--vocab", str(require_bpe_vocab()), "--out",
                        str(merged)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = str(config_folder(tmp_path / "config", oracle, family))
    pipe = StableDiffusionPipeline.from_single_file(str(merged), config=config, local_files_only=True,
                                                    safety_checker=None)
    prompt = "a photo of a dog"
    ref = pipe(prompt, num_inference_steps=3, guidance_scale=7.5, height=64, width=64, num_images_per_prompt=2,
               output_type="np", generator=torch.Generator("cpu").manual_seed(1)).images
    sample.main(["--model", str(tmp / "base.safetensors"), "--vocab", str(require_bpe_vocab()), "--prompt", prompt,
                 "--steps", "3", "--guidance", "7.5", "--seed", "1", "--height", "64", "--width", "64",
                 "--num-images", "2", "--device", "cpu", "--out", str(tmp_path / "out"),
                 "--shifts", str(tmp / "shifts.safetensors")])
    ref = (ref * 255).round().astype(np.int16)
    for i in range(2):
        ours = np.asarray(Image.open(tmp_path / "out" / f"{i:03d}.png")).astype(np.int16)
        assert np.abs(ours - ref[i]).max() <= 2, f"image {i}: max diff {np.abs(ours - ref[i]).max()}/255"
    # and the shifts are in it: the base model's images differ
    base = StableDiffusionPipeline.from_single_file(str(tmp / "base.safetensors"), config=config,
                                                    local_files_only=True, safety_checker=None)
    plain = base(prompt, num_inference_steps=3, guidance_scale=7.5, height=64, width=64, num_images_per_prompt=2,
                 output_type="np", generator=torch.Generator("cpu").manual_seed(1)).images
    assert np.abs((plain * 255).round() - ref).max() > 10
