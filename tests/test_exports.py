"""The exports read by the loaders people use: `export-lora` through diffusers' `load_lora_weights` (peft), and
`export-merged` through `from_single_file`, give our model's outputs and sample.py's images, for SD1, SD2 and SDXL
(StableDiffusionXLPipeline: the UNet in kohya's SDXL names, both text encoders)."""
import copy
import json
import logging
import re
import subprocess
import sys
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sample
import sd
import tiny
import unet as unet_lib
from conftest import random_deltas_, require_bpe_vocab
from support import exports, fast_layer, shift_files

ROOT = tiny.Path(tiny.__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def shifted(request, tmp_path_factory):
    """A tiny model's single file, its diffusers copy, a shift file with random δ on every layer, and our model with
    that file's matrix shifts only (norm γ and embedding shifts cannot travel in a LoRA)."""
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    oracle = tiny.write_single_file(tmp / "base.safetensors", family)
    model = sd.load(tmp / "base.safetensors", vocab=require_bpe_vocab())
    fast_layer.add_spectral_shifts(model, progress=False)
    random_deltas_(model, 0)
    shift_files.save_shift_file(model, tmp / "shifts.safetensors")
    with torch.no_grad():
        for _, m in shift_files.shifts_by_key(model):
            if m.kind in ("norm", "embedding"):
                m.delta.zero_()
    return family, tmp, oracle, model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def diffusers_pipeline(oracle):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    if "text_encoder_2" in oracle:
        return StableDiffusionXLPipeline(**oracle, tokenizer=None, tokenizer_2=None,
                                         scheduler=DDIMScheduler(**tiny.SCHEDULER), add_watermarker=False)
    return StableDiffusionPipeline(vae=oracle["vae"], text_encoder=oracle["text_encoder"], tokenizer=None,
                                   unet=oracle["unet"], scheduler=DDIMScheduler(**tiny.SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def inputs(family):
    """Latents, a context, token ids and (SDXL) the pooled text and sizes of the label vector y."""
    g = torch.Generator().manual_seed(2)
    width = sum(tiny.SDXL_TEXT_WIDTH) if family == "sdxl" else tiny.TEXT_WIDTH
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, width, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    return x, ctx, ids, torch.randn(2, tiny.SDXL_POOLED, generator=g)


def our_outputs(model, family):
    """The UNet's output and every text encoder's (SDXL: ViT-L's context, bigG's context and pooled)."""
    x, ctx, ids, pooled = inputs(family)
    if family != "sdxl":
        return [model.unet(x, 7, ctx), model.text_encoder(ids)]
    y = unet_lib.label_vector(pooled, (64, 64), (0, 0), (64, 64))
    return [model.unet(x, 7, ctx, y), model.text_encoder(ids), *model.text_encoder_2(ids)]


def diffusers_outputs(pipe, family):
    x, ctx, ids, pooled = inputs(family)
    if family != "sdxl":
        return [pipe.unet(x, 7, ctx).sample, pipe.text_encoder(ids).last_hidden_state]
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)  # original size, crop, target size
    big_g = pipe.text_encoder_2(ids, output_hidden_states=True)
    return [pipe.unet(x, 7, ctx, added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids)).sample,
            pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2],  # SDXL: the penultimate layers
            big_g.hidden_states[-2], big_g.text_embeds]


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


def a1111_version(meta):
    """AUTOMATIC1111's reading of a LoRA's family (extensions-builtin/Lora/network.py, NetworkOnDisk.detect_version)."""
    if meta.get("ss_base_model_version", "").startswith("sdxl_"):
        return "sdxl"
    return "sd2" if meta.get("ss_v2") == "True" else "sd1"


@contextmanager
def truncated(model, k):
    """Our rank-k truncation: each layer's ΔW = Σ (ReLU(σᵢ+δᵢ) - σᵢ) uᵢvᵢᵀ cut to its k largest terms (δᵢ = 0 drops
    term i)."""
    saved = {m: m.delta.detach().clone() for _, m in shift_files.shifts_by_key(model)}
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
    exports.export_lora(model, path, rank=k, dtype=torch.float32)
    lora = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        assert a1111_version(f.metadata()) == family  # its Lora tab shows the file with models of this family
    # one rank and one alpha in the whole file, whatever the layers' own ranks (out.2 has rank 4 here)
    assert len({float(v) for n, v in lora.items() if n.endswith(".alpha")}) == 1
    assert len({v.shape[0] for n, v in lora.items() if n.endswith(".lora_down.weight")}) == 1
    assert not any(w in n for n in lora for w in ("norm", "token_embedding", "position_embedding"))  # stay out

    pipe = diffusers_pipeline(copy.deepcopy(oracle))
    with loader_messages() as messages:
        pipe.load_lora_weights(str(path))  # raises on a key it cannot place
    assert not [m for m in messages if "unexpected" in m.lower() or "did not match" in m], messages
    # every LoRA of the file became a peft layer
    parts = [pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    wrapped = [n for part in parts for n, m in part.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == len({n.split(".")[0] for n in lora})

    with torch.no_grad(), truncated(model, k):
        ours = our_outputs(model, family)
    with torch.no_grad():
        errors = [rel(theirs, mine) for theirs, mine in zip(diffusers_outputs(pipe, family), ours)]
        assert len(errors) == len(ours) and max(errors) <= 1e-4, errors
        if rank is not None:  # and the truncation is not the full shift: the test sees the rank
            assert rel(our_outputs(model, family)[0], ours[0]) > 1e-2


@pytest.mark.parametrize("shifted", ["sdxl"], indirect=True)
def test_sdxl_lora_names_are_kohyas(shifted):
    """kohya trains SDXL on its copy of the original UNet and on transformers' two text encoders, so an SDXL LoRA
    names the UNet's layers by the single file's keys (ComfyUI's rule: lora_unet_ + the key without
    `model.diffusion_model.` and `.weight`, dots -> '_') and the encoders' by transformers' names under lora_te1_
    (ViT-L) and lora_te2_ (bigG, whose fused q/k/v are three LoRAs). No other name (SD's diffusers-style
    lora_unet_down_blocks_…, lora_te_) may appear. (With diffusers' UNet names, load_lora_weights misplaces SDXL's
    add_embedding: sgm names are what it reads.)"""
    _, tmp, _, model = shifted
    path = tmp / "names.safetensors"
    exports.export_lora(model, path, rank=2, dtype=torch.float32)
    names = {k.split(".")[0] for k in load_file(str(path))}
    file_keys = set(load_file(str(tmp / "base.safetensors")))
    unet_names = {"lora_unet_" + k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
                  for k in file_keys if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    text = re.compile(r"lora_te([12])_text_model_encoder_layers_(\d+)_(mlp_fc[12]|self_attn_(q|k|v|out)_proj)")
    for name in names:
        m = text.fullmatch(name)
        assert name in unet_names or m, name
        if m:  # a layer the encoder runs: ViT-L runs 2 of its 3 layers here, bigG all 3
            assert int(m[2]) < (2 if m[1] == "1" else 3), name
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names  # the example of the docs
    assert {"lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op",
            "lora_unet_output_blocks_2_2_conv", "lora_unet_middle_block_1_proj_in",
            "lora_unet_label_emb_0_0"} <= names  # ResBlock conv, Downsample, Upsample, transformer, label_emb
    for p in "qkv":
        assert f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj" in names  # bigG's in_proj, split
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc1" in names
    assert not any(n.startswith(("lora_te_", "lora_unet_down_blocks", "lora_unet_up_blocks")) for n in names)


def config_folder(folder, oracle, family):
    """What `from_single_file(config=...)` reads instead of the Hub: the pipeline's component configurations (SDXL:
    both encoders and tokenizers), with DDIM as the scheduler (sample.py's)."""
    oracle["unet"].save_config(folder / "unet")
    oracle["vae"].save_config(folder / "vae")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    oracle["text_encoder"].config.save_pretrained(folder / "text_encoder")
    if family == "sdxl":
        oracle["text_encoder_2"].config.save_pretrained(folder / "text_encoder_2")
        tiny.write_sdxl_tokenizers(folder, require_bpe_vocab())
        index |= {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    else:
        tiny.write_tokenizer_files(folder / "tokenizer", require_bpe_vocab(), family)
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None]}
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny.SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def from_single_file(path, config, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if family == "sdxl":
        return StableDiffusionXLPipeline.from_single_file(str(path), config=config, local_files_only=True,
                                                          add_watermarker=False)
    return StableDiffusionPipeline.from_single_file(str(path), config=config, local_files_only=True,
                                                    safety_checker=None)


def test_merged_checkpoint_from_single_file_gives_sample_py_images(shifted, tmp_path, monkeypatch):
    family, tmp, oracle, _ = shifted
    merged = tmp_path / "merged.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "shifts.py"), "export-merged", str(tmp / "shifts.safetensors"),
                        "--model", str(tmp / "base.safetensors"), "--vocab", str(require_bpe_vocab()), "--out",
                        str(merged)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    # the same tensors as the base file, but the shifted ones: SDXL's sgm denoiser sigmas, bigG's projection, ...
    base, out = load_file(str(tmp / "base.safetensors")), load_file(str(merged))
    assert set(out) == set(base) and all(out[k].dtype == base[k].dtype for k in base)
    changed = {k for k in base if not torch.equal(out[k], base[k])}
    assert changed == set(shift_files.read_shift_file(tmp / "shifts.safetensors")[0])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = str(config_folder(tmp_path / "config", oracle, family))
    pipe = from_single_file(merged, config, family)
    prompt = "a photo of a dog"
    args = dict(num_inference_steps=3, guidance_scale=7.5, height=64, width=64, num_images_per_prompt=2,
                output_type="np")
    ref = pipe(prompt, generator=torch.Generator("cpu").manual_seed(1), **args).images
    sample.main(["--model", str(tmp / "base.safetensors"), "--vocab", str(require_bpe_vocab()), "--prompt", prompt,
                 "--steps", "3", "--guidance", "7.5", "--seed", "1", "--height", "64", "--width", "64",
                 "--num-images", "2", "--device", "cpu", "--out", str(tmp_path / "out"),
                 "--shifts", str(tmp / "shifts.safetensors")])
    ref = (ref * 255).round().astype(np.int16)
    for i in range(2):
        ours = np.asarray(Image.open(tmp_path / "out" / f"{i:03d}.png")).astype(np.int16)
        assert np.abs(ours - ref[i]).max() <= 2, f"image {i}: max diff {np.abs(ours - ref[i]).max()}/255"
    # and the shifts are in it: the base model's images differ
    plain = from_single_file(tmp / "base.safetensors", config, family)(
        prompt, generator=torch.Generator("cpu").manual_seed(1), **args).images
    assert np.abs((plain * 255).round() - ref).max() > 10
