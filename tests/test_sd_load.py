"""sd.load reads both official layouts (single file, diffusers folder) and gives diffusers' numbers."""
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sd
import tiny
from conftest import load_peak_rss
from support import cli, loading


def max_diffs(model, oracle):
    """Max abs differences of UNet output, VAE mean/logvar/decode and text encoder output vs the oracle."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 77, tiny.TEXT_WIDTH, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        d = {}
        d["unet"] = (model.unet(x, 501, ctx) - oracle["unet"](x, 501, encoder_hidden_states=ctx).sample).abs().max()
        mean, logvar = model.vae.encode(img)
        dist = oracle["vae"].encode(img).latent_dist
        d["vae_mean"] = (mean - dist.mean).abs().max()
        d["vae_logvar"] = (logvar - dist.logvar).abs().max()
        d["vae_decode"] = (model.vae.decode(mean) - oracle["vae"].decode(mean).sample).abs().max()
        d["text"] = (model.text_encoder(ids) - oracle["text_encoder"](ids).last_hidden_state).abs().max()
    return {k: float(v) for k, v in d.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("suffix,dtype", [(".safetensors", torch.float32), (".safetensors", torch.float16),
                                          (".ckpt", torch.float32)])
def test_single_file_matches_diffusers(tmp_path, bpe_vocab, family, suffix, dtype):
    path = tmp_path / f"model{suffix}"
    oracle = tiny.write_single_file(path, family, dtype)
    model = sd.load(path, vocab=bpe_vocab)
    assert model.family == family and model.prediction_type == "epsilon"
    diffs = max_diffs(model, oracle)
    assert max(diffs.values()) <= 1e-4, diffs
    assert next(model.unet.parameters()).dtype == torch.float32


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("variant", [None, "fp16"])
def test_diffusers_folder_matches_diffusers(tmp_path, bpe_vocab, family, variant):
    dtype = torch.float16 if variant else torch.float32
    oracle = tiny.write_folder(tmp_path, family, bpe_vocab, dtype=dtype, variant=variant)
    model = sd.load(tmp_path)
    assert model.family == family
    assert model.prediction_type == ("epsilon" if family == "sd1" else "v_prediction")
    diffs = max_diffs(model, oracle)
    assert max(diffs.values()) <= 1e-4, diffs
    assert model.tokenizer(["a photo"]).shape == (1, 77)


def test_diffusers_folder_of_bin_files_matches_diffusers(tmp_path, bpe_vocab):
    """As old Hub repos have them: torch.save'd state dicts, the text encoder's as pytorch_model.bin with
    transformers' older keys (text_model. prefix, position_ids buffer)."""
    oracle = tiny.write_folder(tmp_path, "sd1", bpe_vocab)
    for sub, stem, old_stem in (("unet", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                                ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                                ("text_encoder", "model", "pytorch_model")):
        state = load_file(str(tmp_path / sub / f"{stem}.safetensors"))
        (tmp_path / sub / f"{stem}.safetensors").unlink()
        if sub == "text_encoder":
            state = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
            state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        torch.save(state, tmp_path / sub / f"{old_stem}.bin")
    diffs = max_diffs(sd.load(tmp_path), oracle)
    assert max(diffs.values()) <= 1e-4, diffs


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_diffusers_folder_matches_diffusers(tmp_path, bpe_vocab, variant):
    oracle = tiny.write_folder(tmp_path, "sd1", bpe_vocab, dtype=torch.float16 if variant else torch.float32,
                               variant=variant, max_shard_size="1MB")
    assert len(list((tmp_path / "unet").glob("diffusion_pytorch_model*-of-*.safetensors"))) > 1
    assert len(list((tmp_path / "text_encoder").glob("model*-of-*.safetensors"))) > 1
    diffs = max_diffs(sd.load(tmp_path), oracle)
    assert max(diffs.values()) <= 1e-4, diffs


def test_prediction_type_override_and_components(tmp_path, bpe_vocab):
    path = tmp_path / "m.safetensors"
    tiny.write_single_file(path, "sd2")
    model = sd.load(path, prediction_type="v_prediction", components=("unet",))
    assert model.prediction_type == "v_prediction" and model.vae is None and model.text_encoder is None
    assert model.tokenizer is None


def test_loads_in_half_precision(tmp_path, bpe_vocab):
    path = tmp_path / "m.safetensors"
    tiny.write_single_file(path, "sd1")
    for dtype in (torch.bfloat16, torch.float16):
        model = sd.load(path, dtype=dtype, vocab=bpe_vocab)
        # the VAE too: SD's needs no fp32 (only SDXL's, tests/test_sdxl.py)
        assert {p.dtype for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters()} == {dtype}


def test_checkpoint_key_round_trip(tmp_path, bpe_vocab):
    path = tmp_path / "m.safetensors"
    tiny.write_single_file(path, "sd2")
    model = sd.load(path, vocab=bpe_vocab)
    for comp in ("unet", "vae", "text_encoder"):
        for k in getattr(model, comp).state_dict():
            assert loading.split_checkpoint_key(loading.checkpoint_key(comp, k, "sd2"), "sd2") == (comp, k)
    assert loading.checkpoint_key("text_encoder", "transformer.resblocks.0.attn.in_proj.weight", "sd2") == \
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file and the problem


def _error(path, **kw):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        sd.load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_path_is_a_clear_error(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keys,words", [
    ({"conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (12, 4),
      "model.diffusion_model.label_emb.0.0.weight": (4, 4)}, "SDXL refiner"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "LoRA"),
    ({"encoder.conv_in.weight": (4, 3, 3, 3), "decoder.conv_in.weight": (4, 4, 3, 3)}, "VAE alone"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4,)}, "spectral-shift"),
    ({"foo.weight": (4, 4)}, "unknown"),
])
def test_foreign_files_are_named(tmp_path, keys, words):
    path = tmp_path / "x.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    assert words in _error(path)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    tiny.write_single_file(path, "sd1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert "corrupt" in _error(path)
    for header in (b"[]", b'{"a": 1}', b'{"a": {"dtype": "F32"}}'):  # JSON, but not of a safetensors header
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        assert "corrupt" in _error(path)


def test_corrupt_ckpt_is_a_clear_error(tmp_path):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"this is not a checkpoint")  # the unpickler fails with IndexError
    assert "cannot be read" in _error(path)
    path.write_bytes(b"")  # EOFError
    assert "cannot be read" in _error(path)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])  # truncated zip: RuntimeError
    assert "truncated" in _error(path)


class WritesAFile:
    """Unpickling this calls open(marker, "w"): what a malicious checkpoint does to run code."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_ckpt_that_would_run_code_is_refused_without_running_it(tmp_path, writer):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "code-ran"
    ckpt = {"state_dict": {"model.diffusion_model.conv_in.weight": torch.zeros(3), "x": WritesAFile(marker)}}
    if writer == "torch.save":
        torch.save(ckpt, path)
    else:  # an old-style plain pickle, not torch's zip format
        path.write_bytes(pickle.dumps(ckpt, protocol=2))  # as old .ckpt files are
    assert "refused" in _error(path)
    assert not marker.exists()


@pytest.mark.parametrize("error", [MemoryError, TypeError])
def test_ckpt_loader_reports_only_unreadable_files_as_unreadable(tmp_path, monkeypatch, error):
    """Running out of memory, or a bug, is not a damaged file: it is raised as it is."""
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    def fail(*args, **kwargs):
        raise error("not about the file")
    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(error):
        sd.load(path)


def test_folder_missing_a_component_is_a_clear_error(tmp_path, bpe_vocab):
    tiny.write_folder(tmp_path, "sd1", bpe_vocab)
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert "vae" in _error(tmp_path)
    shutil.rmtree(tmp_path / "text_encoder")
    assert "text_encoder" in _error(tmp_path)


def test_single_file_without_vocabulary_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    tiny.write_single_file(path, "sd1")
    with pytest.raises(ValueError, match="vocab"):
        sd.load(path, vocab=str(tmp_path / "missing.txt.gz"))


# ----------------------------------------------------------------------------------------------------------------
# Full size


@pytest.mark.slow
def test_full_sd15_unet_from_fp16_file_matches_diffusers_with_bounded_memory(tmp_path):
    """SD1.5-size UNet (random weights) from one fp16 single file: parity, and the load's peak RSS < 2.5x file."""
    from diffusers import UNet2DConditionModel
    import unet as unet_lib
    cfg = unet_lib.UNetConfig()  # SD1.5
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in unet_lib.UNet(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    # 1-D ".weight" tensors are norm scales (around 1); everything else small random numbers
    ckpt = {loading.UNET_PREFIX + k: (torch.randn(s, generator=g) * (0.02 if len(s) > 1 else 0.1)
                                 + float(len(s) == 1 and k.endswith(".weight"))).half()
            for k, s in shapes.items()}
    path = tmp_path / "unet.safetensors"
    save_file(ckpt, str(path))
    del ckpt
    size = path.stat().st_size

    peak = load_peak_rss(path, ("unet",))
    assert peak < 2.5 * size, f"load peak RSS {peak / 1e9:.2f} GB for a {size / 1e9:.2f} GB file"

    model = sd.load(path, components=("unet",), dtype=torch.float16)
    x = torch.randn(1, 4, 32, 32, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        ours = model.unet.float()(x, 999, ctx)
        del model
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
        from safetensors.torch import load_file
        oracle = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        oracle.load_state_dict({k: v.float() for k, v in convert_ldm_unet_checkpoint(
            load_file(str(path)), dict(oracle.config)).items()}, strict=True)
        ref = oracle(x, 999, encoder_hidden_states=ctx).sample
    err = float((ours - ref).abs().max())
    print(f"full SD1.5 UNet parity: max abs diff {err:.2e}; load peak RSS {peak / 1e9:.2f} GB = "
          f"{peak / size:.2f}x the {size / 1e9:.2f} GB file")
    assert err <= 1e-4 * max(1.0, float(ref.abs().max())), err


def test_choose_model_takes_model_then_the_shift_files_base_model_then_svdiff_model_then_the_default(tmp_path,
                                                                                                    monkeypatch):
    shift_file = tmp_path / "shifts.safetensors"
    save_file({"x": torch.zeros(1)}, str(shift_file), metadata={"base_model": "owner/recorded@abc"})
    (tmp_path / "damaged.safetensors").write_bytes(b"not a shift file")  # judged later, by the shifts' reader
    monkeypatch.setenv("SVDIFF_MODEL", "/models/env.safetensors")
    assert loading.choose_model("/models/given.safetensors", shift_file) == "/models/given.safetensors"
    assert loading.choose_model(None, shift_file) == "owner/recorded@abc"
    for no_record in (None, tmp_path / "missing.safetensors", tmp_path / "damaged.safetensors"):
        assert loading.choose_model(None, no_record) == "/models/env.safetensors"
    monkeypatch.delenv("SVDIFF_MODEL")
    assert loading.choose_model(None, None) == loading.DEFAULT_MODEL


def test_help_gives_each_default_once_and_none_for_defaults_that_depend(capsys):
    import argparse
    p = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="training steps")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--size", type=int, default=512, help="image side (default: 1024 for SDXL, else 512)")
    text = " ".join(p.format_help().split())
    assert "training steps (default: 500)" in text and "output folder" in text and "None" not in text
    assert text.count("(default") == 2


def test_check_device_and_check_writable_refuse_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli.check_device("cpu")
    with pytest.raises(ValueError, match="no CUDA device is available; use --device cpu"):
        cli.check_device("cuda:0")
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        cli.check_device("gpu")
    (tmp_path / "file").write_text("")
    (tmp_path / "file").chmod(0o755)  # writable and executable: os.access alone would let file/sub through
    cli.check_writable(tmp_path / "new" / "deeper", "--out")
    assert not (tmp_path / "new").exists()  # checked, nothing created
    with pytest.raises(ValueError, match="--out .* is a file, not a folder"):
        cli.check_writable(tmp_path / "file", "--out")
    with pytest.raises(ValueError, match="--out .* is not writable"):
        cli.check_writable(tmp_path / "file" / "sub", "--out")
