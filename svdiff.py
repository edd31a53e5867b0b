"""SVDiff (Han et al., ICCV 2023): fine-tune only the singular values of the weights. The method, in the paper's
order: the spectral shift of one weight (Eq. 1-2) and of a whole model, the training loss (Eq. 3), Cut-Mix-Unmix
(§3.3), combining subjects (Eq. 4-5), and single-image editing's inversion (Eq. 6) and slerp (Eq. 7).

Every weight matrix W (a Linear weight; a Conv2d kernel reshaped to c_out x (c_in·kh·kw); an Embedding table) is
factored once, W = U diag(σ) Vᵀ (Eq. 1), and a "spectral shift" δ, one number per singular value, is trained:

    W_δ = U diag(ReLU(σ + δ)) Vᵀ                                                              (Eq. 2)

computed here as W + U diag(ReLU(σ + δ) - σ) Vᵀ, so that δ = 0 gives W exactly (the authors add the SVD's residual
back for the same reason). Norm scales γ get a full-length additive shift γ + δ, as in the official code; biases
stay frozen.

What runs by default is proven equal to this file by tests, and lives out of the way in support/: the faster SVD
(support/fast_svd.py) and its cache on disk; the factored path, which multiplies by the factors instead of
building W_δ, and freeing the W it no longer reads (support/fast_layer.py); shift files (support/shift_files.py).
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import ddim

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # what is shifted: the UNet and the text encoder(s)
SUBSETS = ("all", "unet", "text", "cross-attn", "cross-attn-kv", "1d", "2d", "4d", "up", "down", "mid")


# ---------------------------------------------------------------------------------------------------------------
# Eq. 1-2: the spectral shift of one weight


def matrix_of(module: nn.Module) -> torch.Tensor:
    """The weight as the paper's matrix: Linear/Embedding as is, Conv2d reshaped to c_out x (c_in·kh·kw)."""
    return module.weight.flatten(1)


def svd(W: torch.Tensor):
    """Eq. 1: W [m, n] -> U [m, r], σ [r] (descending), V [n, r], r = min(m, n), in float64: the factors must
    rebuild W to well under the 1e-6 the layer promises."""
    U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
    return U, S, Vh.T


def spectral_shift(sigma, delta):
    """Eq. 2: the shifted singular values ReLU(σ + δ) (the ReLU keeps them non-negative)."""
    return F.relu(sigma + delta)


class SpectralShift(nn.Module):
    """One Linear / Conv2d / Embedding / GroupNorm / LayerNorm of the frozen model (`base`, its weight W untouched)
    with a trainable δ. U, σ, Vᵀ are buffers, not checkpoint content: derived from W. `rank` k shifts only the k
    largest singular values (the others keep δ = 0)."""

    def __init__(self, base: nn.Module, factors=None, rank: int | None = None):
        super().__init__()
        self.base, self.merged = base, False
        device = base.weight.device
        if isinstance(base, (nn.GroupNorm, nn.LayerNorm)):
            self.kind = "norm"
            self.delta = nn.Parameter(torch.zeros(base.weight.shape[0], device=device))
            return
        self.kind = {nn.Linear: "linear", nn.Conv2d: "conv", nn.Embedding: "embedding"}[type(base)]
        if self.kind == "conv" and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ValueError("grouped or non-zero-padded convolutions are not supported")
        U, S, V = factors if factors is not None else svd(matrix_of(base))
        k = S.shape[0] if rank is None else min(rank, S.shape[0])
        self.full_rank = k == S.shape[0]
        # U and Vᵀ in the weights' dtype (half the memory in bf16), σ and δ in fp32. Vᵀ [k, n] rather than V: its
        # rows are the conv filters of the factored path (support/fast_layer.py) as they are.
        self.register_buffer("U", U[:, :k].to(base.weight.dtype).contiguous(), persistent=False)
        self.register_buffer("Vh", V[:, :k].T.to(base.weight.dtype).contiguous(), persistent=False)
        self.register_buffer("sigma", S[:k].float().contiguous(), persistent=False)
        self.delta = nn.Parameter(torch.zeros(k, device=device))

    def delta_sigma(self):
        """ReLU(σ + δ) - σ: how much each singular value moves (exactly 0 where δ = 0)."""
        return spectral_shift(self.sigma, self.delta) - self.sigma

    @property
    def V(self):
        """V [n, k], the paper's right singular vectors (a view of the stored Vᵀ)."""
        return self.Vh.T

    def delta_weight(self):
        """ΔW = U diag(ReLU(σ + δ) - σ) Vᵀ, shaped like the module's weight: W_δ = W + ΔW is Eq. 2."""
        return ((self.U * self.delta_sigma().to(self.U.dtype)) @ self.Vh).reshape(self.base.weight.shape)

    def forward(self, x):
        b = self.base
        if self.merged:
            return b(x)
        if self.kind == "norm":
            gamma = b.weight + self.delta
            if isinstance(b, nn.GroupNorm):  # statistics in fp32, as SD's GroupNorm32
                return F.group_norm(x.float(), b.num_groups, gamma.float(), b.bias.float(), b.eps).to(x.dtype)
            return F.layer_norm(x, b.normalized_shape, gamma.to(x.dtype), b.bias, b.eps)
        if self.kind == "embedding":  # W_δ[ids] = W[ids] + U[ids] diag(ReLU(σ+δ) - σ) Vᵀ: rows, not the table
            return F.embedding(x, b.weight) + (self.U[x] * self.delta_sigma().to(self.U.dtype)) @ self.Vh
        W = b.weight + self.delta_weight()
        if self.kind == "linear":
            return F.linear(x, W, b.bias)
        return F.conv2d(x, W, b.bias, b.stride, b.padding, b.dilation)

    @torch.no_grad()
    def merge(self, keep_original=True):
        """Write W_δ into the base weight once, for sampling: the layer then costs what the base layer costs."""
        if self.merged:
            return
        W = self.base.weight
        self.original = W.detach().to("cpu", copy=True) if keep_original else None
        W.copy_(W + self.delta.to(W.dtype) if self.kind == "norm" else W + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if self.original is None:
            raise ValueError("the original weights were not kept (merge(keep_original=False), or drop_weights); "
                             "reload the model")
        self.base.weight.copy_(self.original.to(self.base.weight.device))
        self.original, self.merged = None, False


# ---------------------------------------------------------------------------------------------------------------
# A whole model: which weights are shifted, adding and removing the shifts, the learning rates


SHIFTABLE = (nn.Linear, nn.Conv2d, nn.Embedding, nn.GroupNorm, nn.LayerNorm)


def in_subset(name: str, module: nn.Module, subset: str) -> bool:
    """The paper's subsets (its Table 1) of the layer `name` ("unet.input_blocks.1.1.proj_in", ...: our modules
    are named as the original checkpoint's, input_blocks = down)."""
    component, _, path = name.partition(".")
    if subset == "all":
        return True
    if subset == "text":  # SDXL: both encoders
        return component != "unet"
    if component != "unet":
        return False
    return {"unet": True,
            "cross-attn": re.search(r"attn2\.(to_q|to_k|to_v|to_out\.0)$", path) is not None,
            "cross-attn-kv": re.search(r"attn2\.(to_k|to_v)$", path) is not None,
            "1d": isinstance(module, (nn.GroupNorm, nn.LayerNorm)),
            "2d": isinstance(module, nn.Linear),
            "4d": isinstance(module, nn.Conv2d),
            "up": path.startswith("output_blocks."),
            "down": path.startswith("input_blocks."),
            "mid": path.startswith("middle_block.")}[subset]


def shiftable_modules(model, subset="all", names=None) -> list[tuple[str, nn.Module]]:
    """[(name, module)] of the weights to shift, in model order, named "component.module.path". `names` (a set):
    exactly those layers instead of a subset."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")
    out = []
    for component in COMPONENTS:
        root = getattr(model, component, None)
        for path, m in (root.named_modules() if root is not None else []):
            name = f"{component}.{path}"
            if isinstance(m, SHIFTABLE) and getattr(m, "weight", None) is not None and \
                    (name in names if names is not None else in_subset(name, m, subset)):
                out.append((name, m))
    return out


def shift_length(module: nn.Module, rank=None) -> int:
    """Length of δ: min(rows, cols) of the matrix (at most `rank`), or C for a norm's γ. Works on `meta`."""
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return module.weight.shape[0]
    r = min(module.weight.shape[0], module.weight[0].numel())
    return r if rank is None else min(rank, r)


def add_spectral_shifts(model, subset="all", rank=None, factors=None, svd=svd, layer=SpectralShift, names=None,
                        progress=True):
    """Wrap the chosen weights of the UNet and text encoder(s) in `layer` (δ = 0: outputs unchanged) and freeze
    everything else. Each matrix is factored by `svd`, unless `factors` ({name: (U, σ, V)}, an SVD cache's) holds
    it. Returns `shifts(model)`."""
    for component in COMPONENTS + ("vae",):
        if getattr(model, component, None) is not None:
            getattr(model, component).requires_grad_(False)
    chosen = shiftable_modules(model, subset, names)
    if not chosen:
        raise ValueError(f"no layers selected (subset {subset!r})")
    for name, m in tqdm(chosen, desc="SVD", disable=not progress):
        f = None
        if not isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            f = (factors or {}).get(name) or svd(matrix_of(m))
            f = tuple(t.to(m.weight.device) for t in f)
        set_module(model, name, layer(m, f, rank))
    return shifts(model)


def set_module(model, name: str, new: nn.Module):
    """Put `new` where the layer `name` ("unet.input_blocks.1.1.proj_in") is."""
    component, _, path = name.partition(".")
    parent, _, child = path.rpartition(".")
    root = getattr(model, component)
    setattr(root.get_submodule(parent) if parent else root, child, new)


def shifts(model) -> list[tuple[str, SpectralShift]]:
    """[(name, layer)] of a model with shifts added, in model order."""
    return [(f"{c}.{path}", m) for c in COMPONENTS if getattr(model, c, None) is not None
            for path, m in getattr(model, c).named_modules() if isinstance(m, SpectralShift)]


def remove_spectral_shifts(model):
    """The plain layers back, with their current weights (`unmerge` first for the originals)."""
    for name, m in shifts(model):
        if m.base.weight.is_meta:
            raise ValueError(f"{name}: its weight was dropped for training; merge first, or reload the model")
        set_module(model, name, m.base)


def merge(model, keep_original=True):
    for _, m in shifts(model):
        m.merge(keep_original)


def unmerge(model):
    for _, m in shifts(model):
        m.unmerge()


def bake(model):
    """Merge for good, for sampling: W_δ written into the weights and the wrappers removed, so that U and Vᵀ (as
    much memory as W again) are freed and the model is the plain architecture at exactly the base model's cost."""
    merge(model, keep_original=False)
    remove_spectral_shifts(model)


def param_groups(model, lr=1e-3, lr_1d=1e-6):
    """AdamW's groups with the authors' learning rates: 1e-3 for the matrices' shifts, 1e-6 for the norms' γ."""
    matrix = [m.delta for _, m in shifts(model) if m.kind != "norm"]
    norm = [m.delta for _, m in shifts(model) if m.kind == "norm"]
    return [g for g in ({"params": matrix, "lr": lr, "name": "matrix"},
                        {"params": norm, "lr": lr_1d, "name": "1d"}) if g["params"]]


# ---------------------------------------------------------------------------------------------------------------
# Eq. 3: the training loss


def prior_preservation_loss(pred, target, prior_pred, prior_target, prior_weight):
    """Eq. 3: ‖ε̂ - ε‖² on the subject's images + λ · the same on the class images the base model generated
    (DreamBooth's prior preservation; the target is ε, or v for v-prediction models). Returns (loss, prior part)."""
    loss = F.mse_loss(pred.float(), target.float())
    prior = F.mse_loss(prior_pred.float(), prior_target.float()) if prior_pred.numel() else torch.zeros(())
    return loss + prior_weight * prior, prior


# ---------------------------------------------------------------------------------------------------------------
# §3.3 Cut-Mix-Unmix: several subjects in one model


def cutmix(left, right):
    """Cut-Mix: a collage whose left half is a half-width crop of `left` and right half one of `right` (crops
    centred; tensors [..., H, W], W even). Applied to the VAE latents: the VAE is local, so this is the latent of
    the pixel collage up to the seam, without encoding every step."""
    W = left.shape[-1]
    q = W // 4  # centre half: columns W/4 .. 3W/4
    return torch.cat([left[..., q:q + W // 2], right[..., q:q + W // 2]], dim=-1)


def token_positions(tokenizer, prompt, word):
    """Indices in the 77 context tokens of `word` inside `prompt` (all of its BPE pieces; BOS is index 0)."""
    ids, piece = tokenizer.encode(prompt), tokenizer.encode(word)
    if not piece:  # (an empty word would "occur" at 0 with no positions: a NaN loss later)
        raise ValueError(f"{word!r} has no tokens; name the subject with a word such as sks")
    for i in range(len(ids) - len(piece) + 1):
        if ids[i:i + len(piece)] == piece:
            if 1 + i + len(piece) > 76:  # BOS + 75 tokens + EOS: the rest is cut
                raise ValueError(f"{word!r} falls beyond CLIP's 77 tokens in the prompt {prompt!r}; shorten it")
            return [1 + i + j for j in range(len(piece))]
    raise ValueError(f"{word!r} does not occur in the prompt {prompt!r}")


def attention_size(tokens, H, W):
    """(h, w) of an attention layer with `tokens` queries, on a latent of H x W: each level's stride-2 conv
    (padding 1) gives ceil(h / 2) x ceil(w / 2)."""
    h, w = H, W
    while h * w > tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"{tokens} attention tokens do not fit a {H}x{W} latent")
    return h, w


def half_mask(h, w, side, device=None):
    """[h*w] bool mask of the map positions that lie wholly in one half ("left"/"right") of an h x w attention
    map, flattened row-major as the UNet's tokens are. With an odd width the middle column straddles the seam
    and belongs to neither half."""
    cols = torch.arange(w, device=device)
    cols = cols < w // 2 if side == "left" else cols >= (w + 1) // 2
    return cols.expand(h, w).reshape(-1)


def unmix_loss(probs, subjects, H, W):
    """Unmix, the separation loss (our reading of §3.3; the formula is in the unavailable appendix): for each
    subject, the mean of its tokens' squared cross-attention probabilities over the OTHER subject's half (an MSE
    against 0), averaged over heads, layers (each map at its own resolution) and subjects.
    probs: [(name, [B, heads, h*w, 77])]; subjects: per batch row, [(token positions, side), ...] or []."""
    per_layer = []
    for _, p in probs:
        h, w = attention_size(p.shape[2], H, W)
        terms = []
        for b, row in enumerate(subjects):
            for positions, side in row:
                other = half_mask(h, w, "right" if side == "left" else "left", p.device)
                terms.append(p[b][:, other][:, :, positions].float().square().mean())
        if terms:
            per_layer.append(torch.stack(terms).mean())
    return torch.stack(per_layer).mean() if per_layer else torch.zeros(())


# ---------------------------------------------------------------------------------------------------------------
# Eq. 4-5: several subjects' shifts in one model


def combine(deltas, scales):
    """Eq. 4-5: several subjects in one model by adding their shifts, Σ sᵢδᵢ, applied as ReLU(σ + Σ sᵢδᵢ);
    interpolation between two is scales (α, 1 - α)."""
    return sum(s * d.float() for d, s in zip(deltas, scales))


# ---------------------------------------------------------------------------------------------------------------
# §3.4 single-image editing: Eq. 6 and 7


def ddim_invert(denoise, latents, num_steps, alphas_cumprod, prediction_type="epsilon", model_at="source",
                progress=True):
    """Eq. 6: z_T = DDIMInvert(z*, c; θ'): the image's latent run up the DDIM trajectory with the fine-tuned model
    (guidance 1, conditioned on the TARGET prompt), each step a DDIM step backwards, x_{t-r} -> x_t.

    model_at="source" (default): the model is evaluated where the latent is, at the step's source level (the
    first at t = 0, the level ᾱ_0 that sampling ends on): DDIM's ODE integrated backwards with the same Euler
    rule (Song et al. 2021 §4.3), so a model consistent along its trajectories comes back exactly.
    model_at="target": at the target level t while the latent is still at the source level, one step ahead, as
    diffusers' inversion pipelines (Pix2PixZero, DiffEdit) and null-text inversion do."""
    if model_at not in ("source", "target"):
        raise ValueError(f"model_at must be source or target, got {model_at!r}")
    step = 1000 // num_steps
    alphas_cumprod = alphas_cumprod.to(latents.device)
    x = latents
    for t in tqdm(ddim.timesteps(num_steps).flip(0).tolist(), desc="inverting", disable=not progress):
        out = denoise(x, max(t - step, 0) if model_at == "source" else t)
        x = ddim.ddim_inverse_step(out, x, t, t - step, alphas_cumprod, prediction_type).to(latents.dtype)
    return x


def slerp(alpha, z, noise):
    """Eq. 7: spherical interpolation between the inverted latent z_T and fresh noise, for structural edits."""
    a, b = z.flatten(1).float(), noise.flatten(1).float()
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    theta = torch.acos(cos)[:, None]
    out = (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta).clamp_min(1e-8)
    linear = (1 - alpha) * a + alpha * b  # nearly parallel vectors: slerp == lerp
    out = torch.where(theta < 1e-4, linear, out)
    return out.reshape(z.shape).to(z.dtype)
