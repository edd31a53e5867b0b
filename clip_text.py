"""The text side of Stable Diffusion: the CLIP BPE tokenizer and the two kinds of text encoder.

SD1 conditions on OpenAI CLIP ViT-L/14 (its last layer), SD2 on OpenCLIP ViT-H/14 (its penultimate layer),
SDXL on both kinds at once: ViT-L/14 and OpenCLIP ViT-bigG/14, each's penultimate layer without the final norm,
concatenated, plus bigG's pooled and projected EOS state (for the UNet's label_emb).
Module names are the original checkpoint's keys minus `cond_stage_model.transformer.` (SD1) /
`conditioner.embedders.0.transformer.` (SDXL) for Hugging Face names, or `cond_stage_model.model.` (SD2) /
`conditioner.embedders.1.model.` (SDXL) for OpenCLIP names, with two renames so that every matrix lives in a
module: OpenCLIP's fused `attn.in_proj_weight` is the nn.Linear `attn.in_proj`, and `positional_embedding` is
an nn.Embedding. Facts: shared/reference/sd_weights_and_sampling.md §2-3, §8.
"""
import gzip
import json
import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

BOS, EOS = 49406, 49407      # <|startoftext|>, <|endoftext|>
CONTEXT_LENGTH = 77
SPECIAL = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
# The special tokens are cut out of the raw text first, as transformers does with its added tokens. Only these two:
# the pad token is not one of them. SD2's and SDXL's tokenizer_2 configs name "!" (id 0) as pad token, which makes
# transformers (and so diffusers, its issue 4153) read every "!" of a prompt as id 0; open_clip's tokenizer, which
# SD2 and SDXL's bigG were trained with, gives a run of "!" its BPE pieces ("!!!" is 995), as A1111 and ComfyUI do,
# and so do we. The pad id only fills the row after EOS (pad_id_for).
SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL) + ")")


def pad_id_for(family: str) -> int:
    """The pad id of a text encoder's tokenizer, by the encoder's TextConfig.family: "sd1" (ViT-L: SD1 and SDXL's
    tokenizer/) pads with <|endoftext|>; "sd2" (OpenCLIP: SD2 and SDXL's tokenizer_2/) with 0, as open_clip pads.
    Only the padding differs: 0 is also the id of "!", but a "!" in a prompt is text in both (Tokenizer)."""
    return EOS if family == "sd1" else 0


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character: the 188 printable bytes map to themselves, the 68 others to chr(256 + n).
    The ORDER matters: CLIP's vocabulary starts with the printable bytes, then the others (so "!" is id 0)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def normalize(text: str) -> str:
    """What transformers' CLIPTokenizer (and so diffusers) does: NFC, whitespace runs -> one space, lower case.
    (The original openai code also runs ftfy and html.unescape; diffusers does not, so neither do we.)
    Lower case is per character, as the tokenizers library does it: a word-final Σ becomes σ, not str.lower's ς."""
    return "".join(c.lower() for c in re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)))


def _kind(ch: str) -> str:
    """L (letter), N (number), S (space) or O (other): the classes of CLIP's pre-tokenization pattern."""
    if ch.isspace():
        return "S"
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "O"


CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def pre_tokenize(text: str) -> list[str]:
    """CLIP's pattern `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`, scanned by hand: the
    standard `re` module has no \\p{L} / \\p{N}, and `regex` would be a new dependency. (The pattern's special
    tokens are cut out before, by Tokenizer.encode.)"""
    words, i = [], 0
    while i < len(text):
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if contraction:  # alternatives are tried in order at each position, like the regex
            words.append(contraction)
            i += len(contraction)
            continue
        kind = _kind(text[i])
        if kind == "S":
            i += 1
            continue
        j = i + 1
        if kind == "L":
            while j < len(text) and _kind(text[j]) == "L":
                j += 1
        elif kind == "O":  # greedy, like the regex: a run of symbols swallows a following "'" too
            while j < len(text) and _kind(text[j]) == "O":
                j += 1
        words.append(text[i:j])  # N: digits one at a time
        i = j
    return words


class Tokenizer:
    """CLIP's byte-level BPE: words -> bytes -> printable chars, `</w>` on the last, merge lowest rank first."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], pad_id: int):
        self.encoder = encoder
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.pad_id = pad_id
        self.byte_chars = bytes_to_unicode()
        self.cache = {}

    @classmethod
    def from_folder(cls, tokenizer_dir, pad_id: int):
        """A diffusers folder's tokenizer/: vocab.json and merges.txt."""
        d = Path(tokenizer_dir)
        if not (d / "vocab.json").is_file() or not (d / "merges.txt").is_file():
            raise ValueError(f"{d}: missing vocab.json or merges.txt; the diffusers folder is incomplete")
        encoder = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        lines = (d / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(l.split()) for l in lines[1:] if l and not l.startswith("#version")]
        return cls(encoder, merges, pad_id)

    @classmethod
    def from_bpe(cls, path_gz, pad_id: int):
        """openai/CLIP's bpe_simple_vocab_16e6.txt.gz; the vocabulary is built from it as CLIP builds it."""
        try:
            lines = gzip.open(path_gz).read().decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"{path_gz}: not a CLIP BPE vocabulary ({e}); get bpe_simple_vocab_16e6.txt.gz "
                             "from the openai/CLIP repository") from None
        merges = [tuple(l.split()) for l in lines[1:49152 - 256 - 2 + 1]]  # only the first 48,894 merges are used
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL)
        return cls({t: i for i, t in enumerate(vocab)}, merges, pad_id)

    def bpe(self, word: str) -> list[str]:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(self.ranks.get(p, float("inf")), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            first, second = symbols[i], symbols[i + 1]
            merged, j = [], 0  # merge every occurrence of this pair, left to right
            while j < len(symbols):
                if j < len(symbols) - 1 and symbols[j] == first and symbols[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(symbols[j])
                    j += 1
            symbols = merged
        return symbols

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without BOS/EOS."""
        ids = []
        for piece in SPECIAL_PATTERN.split(text):  # odd pieces are the special tokens
            if piece in SPECIAL:
                ids.append(SPECIAL[piece])
                continue
            for word in pre_tokenize(normalize(piece)):
                if word not in self.cache:
                    chars = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
                    self.cache[word] = [self.encoder[s] for s in self.bpe(chars)]
                ids += self.cache[word]
        return ids

    def __call__(self, prompts) -> torch.Tensor:
        """Prompts -> [B, 77] ids: BOS, up to 75 tokens, EOS, then padding."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        rows = []
        for p in prompts:
            ids = self.encode(p)
            if len(ids) > CONTEXT_LENGTH - 2:
                cut = self.decode(ids[CONTEXT_LENGTH - 2:])
                print(f"warning: the prompt is longer than CLIP's {CONTEXT_LENGTH} tokens; this part was cut: "
                      f"{cut!r}", file=sys.stderr)
                ids = ids[:CONTEXT_LENGTH - 2]
            ids = [BOS] + ids + [EOS]
            rows.append(ids + [self.pad_id] * (CONTEXT_LENGTH - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        """BPE ids -> text (for messages): tokens joined, `</w>` as a space, byte characters back to UTF-8."""
        inverse = {v: k for k, v in self.encoder.items()}
        byte_of = {c: b for b, c in self.byte_chars.items()}
        words = "".join(inverse[i] for i in ids).split("</w>")
        return " ".join(bytes(byte_of[c] for c in w).decode("utf-8", "replace") for w in words).strip()


# openai/CLIP's BPE merges (MIT licence, LICENSE-CLIP-vocab), shipped beside this file: a single-file checkpoint
# carries no tokenizer, and every SD 1.x/2.x/XL text encoder uses this vocabulary.
BPE_VOCAB = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"


def find_bpe_vocab(vocab=None) -> Path:
    """The CLIP BPE file for a single-file checkpoint: --vocab if given, else the copy shipped with this project."""
    path = Path(vocab) if vocab else BPE_VOCAB
    if not path.is_file():
        raise ValueError(f"{'--vocab ' if vocab else ''}{path}: no such file; it should be CLIP's "
                         "bpe_simple_vocab_16e6.txt.gz (github.com/openai/CLIP, clip/ folder)")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Text encoders


@dataclass
class TextConfig:
    family: str = "sd1"         # the kind of encoder, named after the SD that brought it: "sd1" = OpenAI CLIP
                                # ViT-L/14 in Hugging Face names (SD1; SDXL's first); "sd2" = OpenCLIP names (SD2's
                                # ViT-H/14; SDXL's second, ViT-bigG/14)
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768            # 1024 for ViT-H, 1280 for bigG
    layers: int = 12            # blocks BUILT: those that run. SD2 runs 23 of ViT-H's 24, SDXL 11 of ViT-L's 12
                                # (the penultimate layer conditions the UNet); SDXL's bigG all 32 (see projection_dim)
    heads: int = 12             # width / 64 in all three models
    intermediate: int = 3072    # 4 x width
    act: str = "quick_gelu"     # OpenAI CLIP: x·σ(1.702x); OpenCLIP: exact gelu
    final_norm: bool = True     # the UNet's context passes the final LayerNorm (SD1, SD2); SDXL: the raw block output
    projection_dim: int = 0     # SDXL's bigG: the width of text_projection. Forward then returns (context, pooled):
                                # the context is the PENULTIMATE block's output, and the last block, ln_final and
                                # text_projection make the pooled embedding of the EOS token.


def causal_self_attention(q, k, v, heads: int, use_sdpa: bool = True):
    """Multi-head attention where token i sees tokens <= i (CLIP is a causal text transformer)."""
    B, T, C = q.shape
    q, k, v = (t.reshape(B, T, heads, C // heads).transpose(1, 2) for t in (q, k, v))  # B,h,T,d
    if use_sdpa:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # the readable reference
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, T, C)


def activation(x, act):
    return x * torch.sigmoid(1.702 * x) if act == "quick_gelu" else F.gelu(x)


# SD1: Hugging Face CLIPTextModel names ------------------------------------------------------------------------

class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x):
        return self.out_proj(causal_self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = cfg.act
        self.fc1, self.fc2 = nn.Linear(cfg.width, cfg.intermediate), nn.Linear(cfg.intermediate, cfg.width)

    def forward(self, x):
        return self.fc2(activation(self.fc1(x), self.act))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(cfg.width), CLIPAttention(cfg)
        self.layer_norm2, self.mlp = nn.LayerNorm(cfg.width), CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)  # made here, not a buffer: nothing to load
        return self.token_embedding(ids) + self.position_embedding(positions)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings, self.encoder = CLIPEmbeddings(cfg), CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width) if cfg.final_norm else None  # unused by SDXL: not built


class CLIPTextModel(nn.Module):
    """OpenAI CLIP ViT-L/14. SD1: the last layer's states after the final LayerNorm; SDXL: the penultimate
    layer's states as they are (cfg.layers = 11, final_norm off)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.projection_dim:
            raise ValueError("a pooled projection is only modelled for OpenCLIP encoders (SDXL's bigG)")
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids):
        x = self.text_model.embeddings(ids)
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        return self.text_model.final_layer_norm(x) if self.cfg.final_norm else x


# SD2: OpenCLIP names ------------------------------------------------------------------------------------------

class OpenCLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj = nn.Linear(cfg.width, 3 * cfg.width)  # q, k, v fused (nn.MultiheadAttention's layout)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        return self.out_proj(causal_self_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = cfg.act
        self.c_fc, self.c_proj = nn.Linear(cfg.width, cfg.intermediate), nn.Linear(cfg.intermediate, cfg.width)

    def forward(self, x):
        return self.c_proj(activation(self.c_fc(x), self.act))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.width), OpenCLIPAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.width), OpenCLIPMLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(cfg) for _ in range(cfg.layers)])


class OpenCLIPText(nn.Module):
    """An OpenCLIP text encoder.
    SD2 (ViT-H): the PENULTIMATE block's states, then ln_final (FrozenOpenCLIPEmbedder layer="penultimate"). Only
    the blocks that run are built; the file's last block and projection are unused.
    SDXL (bigG, cfg.projection_dim set): everything runs (FrozenOpenCLIPEmbedder2, legacy=False). Returns
    (context, pooled): context = the penultimate block's states WITHOUT ln_final; pooled = the last block's
    states, ln_final, at the EOS token (the highest id: argmax), times text_projection."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Embedding(cfg.context_length, cfg.width)
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width) if cfg.final_norm or cfg.projection_dim else None
        if cfg.projection_dim:
            # kept as the original's bare [width, proj] matrix (x @ P), so a single file loads by name alone;
            # a Hugging Face folder holds its transpose (Linear weight), see openclip_from_hf
            self.text_projection = nn.Parameter(torch.randn(cfg.width, cfg.projection_dim) * cfg.width ** -0.5)

    def forward(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding(torch.arange(ids.shape[1], device=ids.device))
        blocks = self.transformer.resblocks
        context_blocks = len(blocks) - 1 if self.cfg.projection_dim else len(blocks)
        for block in blocks[:context_blocks]:
            x = block(x)
        context = self.ln_final(x) if self.cfg.final_norm else x
        if not self.cfg.projection_dim:
            return context
        for block in blocks[context_blocks:]:
            x = block(x)
        eos = self.ln_final(x)[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return context, eos @ self.text_projection.to(eos.dtype)


def build_text_encoder(cfg: TextConfig) -> nn.Module:
    return CLIPTextModel(cfg) if cfg.family == "sd1" else OpenCLIPText(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Configuration and key rules


def config_from_shapes(shapes: dict, family: str, sdxl: bool = False) -> TextConfig:
    """Architecture from a single file's tensor shapes (our module keys, all the file's blocks). Heads = width / 64
    in all CLIP models. family: "sd1" (Hugging Face names) or "sd2" (OpenCLIP names); sdxl: the encoder is one of
    SDXL's (penultimate layer without the final norm; bigG also pooled)."""
    if family == "sd1":
        tok = shapes["text_model.embeddings.token_embedding.weight"]
        layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("text_model.encoder.layers."))
        return TextConfig("sd1", tok[0], shapes["text_model.embeddings.position_embedding.weight"][0], tok[1],
                          layers - 1 if sdxl else layers, tok[1] // 64,
                          shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0], "quick_gelu", final_norm=not sdxl)
    tok = shapes["token_embedding.weight"]
    blocks = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("transformer.resblocks."))
    return TextConfig("sd2", tok[0], shapes["positional_embedding.weight"][0], tok[1], blocks if sdxl else blocks - 1,
                      tok[1] // 64, shapes["transformer.resblocks.0.mlp.c_fc.weight"][0], "gelu",
                      final_norm=not sdxl, projection_dim=shapes["text_projection"][1] if sdxl else 0)


def config_from_diffusers(cfg: dict, sdxl: bool = False) -> TextConfig:
    """text_encoder/config.json or text_encoder_2/config.json (a transformers CLIPTextConfig). SD2's folder holds
    exactly the layers SD runs; SDXL's text_encoder/ all 12 (11 run), text_encoder_2/ bigG with its projection."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"text_encoder/config.json: activation {act!r} is not CLIP's")
    family, layers = ("sd1" if act == "quick_gelu" else "sd2"), cfg["num_hidden_layers"]
    if sdxl and family == "sd1":
        layers -= 1
    return TextConfig(family, cfg.get("vocab_size", 49408), cfg.get("max_position_embeddings", 77),
                      cfg["hidden_size"], layers, cfg["num_attention_heads"], cfg["intermediate_size"], act,
                      final_norm=not sdxl, projection_dim=cfg["projection_dim"] if sdxl and family == "sd2" else 0)


# SD2 original (OpenCLIP) <-> our module keys: the only two names that differ
SD2_RENAMES = {"attn.in_proj_weight": "attn.in_proj.weight", "attn.in_proj_bias": "attn.in_proj.bias",
               "positional_embedding": "positional_embedding.weight"}


def original_to_module_key(key: str, family: str) -> str:
    if family == "sd2":
        for old, new in SD2_RENAMES.items():
            if key == old or key.endswith("." + old):
                return key[: len(key) - len(old)] + new
    return key


def module_to_original_key(key: str, family: str) -> str:
    if family == "sd2":
        for old, new in SD2_RENAMES.items():
            if key == new or key.endswith("." + new):
                return key[: len(key) - len(new)] + old
    return key


def ignored_original_key(key: str, cfg: TextConfig) -> bool:
    """Keys of a single file (minus its text prefix) that SD does not use: the blocks after the one that
    conditions (SD2's and SDXL ViT-L's last), the final norm SDXL's ViT-L skips, the projection but for bigG."""
    if key.endswith("position_ids") or key in ("logit_scale", "attn_mask"):
        return True
    if key == "text_projection":
        return not cfg.projection_dim
    m = re.match(r"(text_model\.encoder\.layers|transformer\.resblocks)\.(\d+)\.", key)
    if m:
        return int(m[2]) >= cfg.layers
    if key.startswith(("text_model.final_layer_norm.", "ln_final.")):
        return not (cfg.final_norm or cfg.projection_dim)
    return False


# Hugging Face CLIP names <-> OpenCLIP names (SD2 diffusers folders hold the HF layout); {} is the layer number
HF_OPENCLIP = [("embeddings.token_embedding.", "token_embedding."),
               ("embeddings.position_embedding.", "positional_embedding."),
               ("encoder.layers.{}.layer_norm1.", "transformer.resblocks.{}.ln_1."),
               ("encoder.layers.{}.layer_norm2.", "transformer.resblocks.{}.ln_2."),
               ("encoder.layers.{}.self_attn.", "transformer.resblocks.{}.attn."),
               ("encoder.layers.{}.mlp.fc1.", "transformer.resblocks.{}.mlp.c_fc."),
               ("encoder.layers.{}.mlp.fc2.", "transformer.resblocks.{}.mlp.c_proj."),
               ("final_layer_norm.", "ln_final.")]


def _rename_prefix(key: str, to_openclip: bool) -> str | None:
    for hf, oc in HF_OPENCLIP:
        src, dst = (hf, oc) if to_openclip else (oc, hf)
        m = re.match(re.escape(src).replace(r"\{\}", r"(\d+)"), key)
        if m:
            return dst.format(*m.groups()) + key[m.end():]
    return None


def diffusers_to_original(key: str, cfg: TextConfig) -> str | None:
    """A transformers CLIPTextModel(WithProjection) key (with or without `text_model.`) -> our module key; None =
    not used. bigG's `text_projection.weight` keeps its name: openclip_from_hf transposes it into ours."""
    key = key.removeprefix("text_model.")
    if key.endswith("position_ids"):
        return None
    if key.startswith("text_projection"):
        return key if cfg.projection_dim else None
    m = re.match(r"encoder\.layers\.(\d+)\.", key)
    if (m and int(m[1]) >= cfg.layers) or (key.startswith("final_layer_norm.") and
                                           not (cfg.final_norm or cfg.projection_dim)):
        return None  # what SDXL's ViT-L does not run
    if cfg.family == "sd1":
        return "text_model." + key
    new = _rename_prefix(key, to_openclip=True)
    if new is not None:
        return new
    raise ValueError(f"text encoder key {key!r} cannot be mapped to OpenCLIP names")


def fuse_qkv(state: dict) -> dict:
    """SD2 from a diffusers folder: separate q/k/v projections -> OpenCLIP's fused in_proj (rows q, k, v)."""
    for key in [k for k in state if ".attn.q_proj." in k]:
        prefix, kind = key.split(".attn.q_proj.")
        parts = [state.pop(f"{prefix}.attn.{p}_proj.{kind}") for p in "qkv"]
        state[f"{prefix}.attn.in_proj.{kind}"] = torch.cat(parts)
    return state


def openclip_from_hf(state: dict) -> dict:
    """An OpenCLIP encoder from a diffusers folder (renamed by diffusers_to_original) -> our module's tensors: q/k/v
    fused, and bigG's projection transposed (Hugging Face: a Linear weight [proj, width]; OpenCLIP: x @ [width,
    proj])."""
    state = fuse_qkv(state)
    if "text_projection.weight" in state:
        state["text_projection"] = state.pop("text_projection.weight").t().contiguous()
    return state


def module_to_hf(key: str, cfg: TextConfig) -> list[str]:
    """Our module key -> the Hugging Face CLIPTextModel key(s) (kohya LoRA names); SD2's fused in_proj gives the
    three q/k/v keys, in row order."""
    if cfg.family == "sd1":
        return [key]
    hf = _rename_prefix(key, to_openclip=False)
    if hf is None:
        raise ValueError(f"text encoder key {key!r} has no Hugging Face name")
    hf = "text_model." + hf
    if ".self_attn.in_proj." in hf:
        return [hf.replace(".in_proj.", f".{p}_proj.") for p in "qkv"]
    return [hf]
