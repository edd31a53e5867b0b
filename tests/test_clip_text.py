"""The tokenizer gives transformers' ids; the text encoders give transformers' CLIPTextModel states."""
import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

import clip_text
import sd
import tiny

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "Café naïve résumé über straße", "東京の夜景と北京の朝", "한국어 문장", "Ελληνικά γράμματα ΣΊΣΥΦΟΣ",
    "مرحبا بالعالم", "שלום עולם", "👍🏽 family 👨‍👩‍👧 ❤️‍🔥 🏳️‍🌈", "e\u0301 combining a\u0308 n\u0303",
    "ＦＵＬＬ－ｗｉｄｔｈ ｌｅｔｔｅｒｓ １２３", "1234567 3.14159 1e-5 ½ ² ⅷ", "don't I'll we've they're she'd it's",
    "wow!!! ... ??? ---> <<>> @#$%^&*()", "tabs\tand\nnewlines\r\n   many    spaces  ", "UPPER Case MiXeD İstanbul",
    "it's's'S DON'T 'tis", "a_b c-d e'f g.h", "\u00a0nbsp\u2003em\u3000ideographic", "", "   ", "sks dog",
    "word " * 100, "x" * 300, "a photo of a <|endoftext|> dog",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from conftest import require_bpe_vocab
    BPE_VOCAB = require_bpe_vocab()
    folder = tmp_path_factory.mktemp("tok")
    tiny.write_tokenizer_files(folder, BPE_VOCAB, "sd1")
    return (CLIPTokenizer.from_pretrained(folder), clip_text.Tokenizer.from_bpe(BPE_VOCAB, 49407),
            clip_text.Tokenizer.from_folder(folder, 49407))


def test_known_vector(tokenizers):
    _, ours, _ = tokenizers
    ids = ours(["a photo of an astronaut riding a horse on mars"])[0].tolist()
    assert ids[:12] == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert ids[12:] == [49407] * 65


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_transformers_tokenizer(tokenizers, prompt):
    hf, from_gz, from_folder = tokenizers
    expected = hf(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert from_gz([prompt])[0].tolist() == expected
    assert from_folder([prompt])[0].tolist() == expected


def test_sd2_pads_with_zero_and_overlength_warns_with_the_cut_part(bpe_vocab, capsys):
    tok = clip_text.Tokenizer.from_bpe(bpe_vocab, clip_text.pad_id_for("sd2"))
    ids = tok(["a dog", "one two three " * 30 + "tail end"])
    assert ids[0].tolist() == [49406, 320, 1929, 49407] + [0] * 73
    assert ids[1, -1] == 49407 and ids.shape == (2, 77)
    assert "tail end" in capsys.readouterr().err


EXCLAIMING = ["hello!", "wow!!!", "a photo of sks dog!", "!!", "! ! !", "dog!cat", "!", "!!!!!!!!", "wow!!! nice",
              "a!b", "!?", "it!'s", "!sks dog", "x@!y", "word " * 73 + "dog!!!", "word " * 74 + "dog!",
              "word " * 74 + "!", "word " * 72 + "! ! ! !"]  # the last four reach the 75 tokens CLIP keeps


def open_clip_ids(hf, prompt, pad_id):
    """open_clip's ids of a prompt: those of a transformers CLIPTokenizer whose pad token is <|endoftext|> (so "!"
    is ordinary text, not an added special token; transformers issue 24925), padded with `pad_id` after the EOS,
    as open_clip pads (0) or SD1's tokenizer config does (EOS)."""
    ids = hf(prompt, max_length=77, truncation=True).input_ids  # BOS, up to 75 tokens, EOS
    return ids + [pad_id] * (77 - len(ids))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_exclamation_marks_are_tokenized_as_open_clip_does_for_both_pad_ids(tokenizers, bpe_vocab, family):
    """"!" is id 0 in CLIP's vocabulary and the pad token of SD2's (and SDXL's tokenizer_2's) configs, which makes
    it a special token in transformers, and so every "!" id 0 in diffusers. SD2 and SDXL's bigG were trained on
    open_clip's ids, where "!" is text like any other (e.g. "!!!" is one piece, 995): only the padding differs."""
    hf = tokenizers[0]
    pad_id = clip_text.pad_id_for(family)
    ours = clip_text.Tokenizer.from_bpe(bpe_vocab, pad_id)
    for prompt in EXCLAIMING:
        assert ours([prompt])[0].tolist() == open_clip_ids(hf, prompt, pad_id), prompt
    assert ours(["wow!!!"])[0, :5].tolist() == [clip_text.BOS, 2781, 995, clip_text.EOS, pad_id]


def test_missing_vocabulary_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="bpe_simple_vocab_16e6"):
        clip_text.find_bpe_vocab(str(tmp_path / "nope.gz"))
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a CLIP BPE vocabulary"):
        clip_text.Tokenizer.from_bpe(tmp_path / "bad.gz", 49407)


def _compare(ours, oracle):
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours(ids) - oracle(ids).last_hidden_state).abs().max().item()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_encoder_from_transformers_layout(family):
    oracle = tiny.randomize_(CLIPTextModel(tiny.text_config(family)), 0)
    cfg = clip_text.config_from_diffusers(tiny.text_config(family).to_dict())
    assert cfg.family == family
    state = {clip_text.diffusers_to_original(k, cfg): v for k, v in oracle.state_dict().items()}
    state = {k: v for k, v in state.items() if k is not None}
    if family == "sd2":
        state = clip_text.fuse_qkv(state)
    ours = clip_text.build_text_encoder(cfg).eval()
    ours.load_state_dict(state, strict=True)
    err = _compare(ours, oracle)
    assert err <= 1e-4, f"max abs diff {err:.2e}"


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_encoder_from_original_layout_through_diffusers_converters(tmp_path, family, bpe_vocab):
    # tiny.write_single_file converts our original-layout tensors with diffusers' own converters
    oracle = tiny.write_single_file(tmp_path / "m.safetensors", family)["text_encoder"]
    model = sd.load(tmp_path / "m.safetensors", vocab=bpe_vocab, components=("text_encoder",))
    err = _compare(model.text_encoder, oracle)
    assert err <= 1e-4, f"max abs diff {err:.2e}"


def test_sdpa_equals_explicit_causal_attention():
    q, k, v = torch.randn(3, 2, 77, 128).unbind(0)
    fast = clip_text.causal_self_attention(q, k, v, heads=2)
    slow = clip_text.causal_self_attention(q, k, v, heads=2, use_sdpa=False)
    assert (fast - slow).abs().max() <= 1e-5


def test_sd2_key_renames_round_trip():
    for key in ("transformer.resblocks.3.attn.in_proj_weight", "transformer.resblocks.3.attn.in_proj_bias",
                "positional_embedding", "token_embedding.weight", "ln_final.weight"):
        module_key = clip_text.original_to_module_key(key, "sd2")
        assert clip_text.module_to_original_key(module_key, "sd2") == key
    assert clip_text.original_to_module_key("positional_embedding", "sd2") == "positional_embedding.weight"


def test_the_shipped_vocabulary_is_openai_clips_and_the_default():
    import hashlib
    assert clip_text.BPE_VOCAB.parent == tiny.Path(clip_text.__file__).resolve().parent  # beside clip_text.py
    assert hashlib.sha256(clip_text.BPE_VOCAB.read_bytes()).hexdigest() == \
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert clip_text.find_bpe_vocab() == clip_text.BPE_VOCAB


def test_a_single_file_loads_and_tokenizes_with_no_vocab_argument(tmp_path):
    tiny.write_single_file(tmp_path / "m.safetensors", "sd1")
    model = sd.load(tmp_path / "m.safetensors", components=("text_encoder",))
    ids = model.tokenizer(["a photo of an astronaut riding a horse on mars"])[0].tolist()
    assert ids[:12] == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
