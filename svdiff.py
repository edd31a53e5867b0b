"""SVDiff (Han et al., ICCV 2023): fine-tune only the singular values of the weights — the method in one file.

Every weight matrix W (a Linear weight; a Conv2d kernel reshaped to c_out x (c_in·kh·kw); an Embedding table)
is factored once, W = U diag(σ) Vᵀ, and a "spectral shift" δ is trained (Eq. 2):

    W_δ = U diag(ReLU(σ + δ)) Vᵀ,   computed as   W + U diag(ReLU(σ + δ) - σ) Vᵀ

where W is read (the dense path, `merge`), so that δ = 0 gives W exactly (the authors add the SVD residual back for
the same reason); the factored path computes with the factors themselves, exact up to the SVD's rounding (≤ 1e-6).
Norm scales γ get a full-length additive shift γ + δ, as in the official code. Biases stay frozen.

Shift files (the δ on disk, combining them, applying them to a model) are in shifts.py.

Paper equation -> function: Eq. 2 `spectral_shift`, `SpectralShift.delta_weight`; Eq. 3
`prior_preservation_loss`; Eq. 4-5 `combine`; Eq. 6 `ddim_invert`; Eq. 7 `slerp`; Cut-Mix-Unmix
(§3.3) `cutmix`, `half_mask`, `token_positions`, `unmix_loss`.
"""
import hashlib
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint

SUBSETS = ("all", "unet", "text", "cross-attn", "cross-attn-kv", "1d", "2d", "4d", "up", "down", "mid")
MODES = ("auto", "dense", "factored", "naive")


# ---------------------------------------------------------------------------------------------------------------
# The equations


def spectral_shift(sigma, delta):
    """Eq. 2: the shifted singular values ReLU(σ + δ) (the ReLU keeps them non-negative)."""
    return F.relu(sigma + delta)


def prior_preservation_loss(pred, target, prior_pred, prior_target, prior_weight):
    """Eq. 3: ‖ε̂ - ε‖² on the subject's images + λ · the same on the class images the base model generated
    (DreamBooth's prior preservation; the target is ε, or v for v-prediction models). Returns (loss, prior part)."""
    loss = F.mse_loss(pred.float(), target.float())
    prior = F.mse_loss(prior_pred.float(), prior_target.float()) if prior_pred.numel() else torch.zeros(())
    return loss + prior_weight * prior, prior


def combine(deltas, scales):
    """Eq. 4-5: several subjects in one model by adding their shifts, Σ sᵢδᵢ, applied as ReLU(σ + Σ sᵢδᵢ);
    interpolation between two is scales (α, 1 - α)."""
    return sum(s * d.float() for d, s in zip(deltas, scales))


def slerp(alpha, z, noise):
    """Eq. 7: spherical interpolation between the inverted latent z_T and fresh noise, for structural edits."""
    a, b = z.flatten(1).float(), noise.flatten(1).float()
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    theta = torch.acos(cos)[:, None]
    out = (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta).clamp_min(1e-8)
    linear = (1 - alpha) * a + alpha * b  # nearly parallel vectors: slerp == lerp
    out = torch.where(theta < 1e-4, linear, out)
    return out.reshape(z.shape).to(z.dtype)


def cutmix(left, right):
    """Cut-Mix (§3.3): a collage whose left half is a half-width crop of `left` and right half one of `right`
    (crops centred; tensors [..., H, W], W even). Applied to cached VAE latents: the VAE is local, so this is
    the latent of the pixel collage up to the seam, without encoding every step."""
    W = left.shape[-1]
    q = W // 4  # centre half: columns W/4 .. 3W/4
    return torch.cat([left[..., q:q + W // 2], right[..., q:q + W // 2]], dim=-1)


def half_mask(h, w, side, device=None):
    """[h*w] bool mask of the map positions that lie wholly in one half ("left"/"right") of an h x w attention
    map, flattened row-major as the UNet's tokens are. With an odd width the middle column straddles the seam
    and belongs to neither half."""
    cols = torch.arange(w, device=device)
    cols = cols < w // 2 if side == "left" else cols >= (w + 1) // 2
    return cols.expand(h, w).reshape(-1)


def attention_size(tokens, H, W):
    """(h, w) of an attention layer with `tokens` queries, on a latent of H x W: each level's stride-2 conv
    (padding 1) gives ceil(h / 2) x ceil(w / 2)."""
    h, w = H, W
    while h * w > tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"{tokens} attention tokens do not fit a {H}x{W} latent")
    return h, w


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


def unmix_loss(probs, subjects, H, W):
    """Cut-Mix-Unmix's separation loss (our reading of §3.3; the formula is in the unavailable appendix): for each
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


def ddim_invert(denoise, latents, num_steps, alphas_cumprod, prediction_type="epsilon", progress=True,
                model_at="source"):
    """Eq. 6: z_T = DDIMInvert(z*, c; θ'), the image's latent run up the DDIM trajectory with the fine-tuned
    model (guidance 1, conditioned on the TARGET prompt). The loop is ddim.invert (model_at: where each step
    evaluates the model, see there); this names it after the paper."""
    import ddim
    return ddim.invert(denoise, latents, num_steps, alphas_cumprod, prediction_type, progress, model_at)


# ---------------------------------------------------------------------------------------------------------------
# SVD, once


ORTHO_TOL = 1e-7  # |VᵀV - I| accepted from the Gram route: 10x under the 1e-6 the layer promises


def svd(W: torch.Tensor):
    """W [m, n] -> U [m, r], σ [r], V [n, r] with r = min(m, n), in float64 on W's device. V comes as the
    transpose of a contiguous Vᵀ [r, n]: that is the layout the layer uses (Vᵀ rows are the conv filters).

    Route: the eigen-decomposition of the small Gram matrix A·Aᵀ (A = W or Wᵀ, whichever has fewer rows) gives
    its eigenvectors Q and σ², and B = Qᵀ·A / σ the other factor: one symmetric GEMM, one r x r eigh and one
    GEMM, 4-8x faster than LAPACK's SVD on SD's matrices at the same ~1e-14 reconstruction error. Squaring W
    squares its condition number, so B's rows drift from orthonormal by about ε·σ₁²/(σᵢσⱼ): we measure that
    drift where it can matter (rows with small σ; all of B·Bᵀ would cost as much as the SVD) and fall back to
    torch.linalg.svd above ORTHO_TOL (float64 throughout: float32 would not meet the 1e-6 bound)."""
    with torch.no_grad():
        W = W.detach().double()
        wide = W.shape[0] <= W.shape[1]
        A = W if wide else W.T                                   # [r, N]
        lam, Q = torch.linalg.eigh(gram(A))
        lam, Q = lam.flip(0), Q.flip(1)  # descending, as the paper's σ
        s = lam.clamp_min(0).sqrt()
        B = torch.mm(Q.T, A).div_(s[:, None])                    # [r, N], orthonormal rows
        weak = s <= s[0] * (100 * torch.finfo(s.dtype).eps / ORTHO_TOL) ** 0.5  # drift estimate > ORTHO_TOL / 100
        drift = (B[weak] @ B.T - torch.eye(len(s), dtype=B.dtype, device=B.device)[weak]).abs().max() \
            if weak.any() else s.new_zeros(())
        if not torch.isfinite(drift) or drift > ORTHO_TOL:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            return U, S, Vh.T
        return (Q, s, B.T) if wide else (B.T, s, Q)


def gram(A: torch.Tensor) -> torch.Tensor:
    """A·Aᵀ from its blocks on and above the diagonal (the one below is a transpose): 3/4 of the multiply-adds."""
    h = A.shape[0] // 2
    top, bottom = A[:h], A[h:]
    G = A.new_empty(A.shape[0], A.shape[0])
    G[:h, :h], G[:h, h:], G[h:, h:] = top @ top.T, top @ bottom.T, bottom @ bottom.T
    G[h:, :h] = G[:h, h:].T
    return G


def matrix_of(module: nn.Module) -> torch.Tensor:
    """The weight as the paper's matrix: Linear/Embedding as is, Conv2d reshaped to c_out x (c_in·kh·kw)."""
    return module.weight.flatten(1)


# ---------------------------------------------------------------------------------------------------------------
# The layer


class SpectralShift(nn.Module):
    """Wraps one Linear / Conv2d / Embedding / GroupNorm / LayerNorm of the frozen model and adds a trainable δ.

    The wrapped module (`base`) keeps its weight W untouched. U, σ, Vᵀ are non-persistent buffers: they are
    derived data (from W, or the SVD cache), not checkpoint content. Vᵀ [r, n] is kept rather than V: its rows
    are the filters of the factored conv and the weight of the factored linear as they are, with no copy."""

    def __init__(self, base: nn.Module, rank: int | None = None, factors=None, mode: str = "auto"):
        super().__init__()
        self.base, self.mode, self.merged = base, mode, False
        if isinstance(base, (nn.GroupNorm, nn.LayerNorm)):
            self.kind = "norm"
            self.delta = nn.Parameter(torch.zeros(base.weight.shape[0], device=base.weight.device))
            return
        self.kind = {nn.Linear: "linear", nn.Conv2d: "conv", nn.Embedding: "embedding"}[type(base)]
        if self.kind == "conv" and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ValueError("grouped or non-zero-padded convolutions are not supported")
        U, S, V = factors if factors is not None else svd(matrix_of(base))
        k = S.shape[0] if rank is None else min(rank, S.shape[0])
        self.full_rank = k == S.shape[0]
        dtype = base.weight.dtype
        self.register_buffer("U", U[:, :k].to(dtype).contiguous(), persistent=False)
        self.register_buffer("Vh", V[:, :k].T.to(dtype).contiguous(), persistent=False)  # Vᵀ
        self.register_buffer("sigma", S[:k].float().contiguous(), persistent=False)
        self.delta = nn.Parameter(torch.zeros(k, device=base.weight.device))  # δ is always fp32

    # -- Eq. 2 in its three algebraic forms -----------------------------------------------------------------
    def delta_sigma(self):
        """ReLU(σ + δ) - σ: the change of each singular value (0 where δ = 0, so W stays bit-exact)."""
        return spectral_shift(self.sigma, self.delta) - self.sigma

    @property
    def V(self):
        """V [n, r], the paper's right singular vectors (a view of the stored Vᵀ)."""
        return self.Vh.T

    def delta_weight(self):
        """ΔW = U diag(ReLU(σ + δ) - σ) Vᵀ, shaped like the module's weight; W_δ = W + ΔW."""
        dW = (self.U * self.delta_sigma().to(self.U.dtype)) @ self.Vh
        return dW.reshape(self.base.weight.shape)

    def naive_weight(self):
        """W_δ = U diag(ReLU(σ + δ)) Vᵀ rebuilt from the factors, as the public implementation does every forward
        (full rank only; equal to W + ΔW up to the SVD's rounding)."""
        W = (self.U * spectral_shift(self.sigma, self.delta).to(self.U.dtype)) @ self.Vh
        return W.reshape(self.base.weight.shape)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x):
        if self.merged:
            return self.base(x)
        if self.kind == "norm":
            return self._norm(x, self.base.weight + self.delta)
        if self.kind == "embedding":
            # W_δ[ids] = W[ids] + (U[ids] ⊙ (ReLU(σ+δ) - σ)) Vᵀ: a gather, never the whole table
            return F.embedding(x, self.base.weight) + \
                (self.U[x] * self.delta_sigma().to(self.U.dtype)) @ self.Vh
        mode = self.mode if self.mode != "auto" else self.cheapest(x)
        if mode == "naive":  # (rank-limited: the k factors are not all of W, so W + ΔW)
            return self._apply(x, self.naive_weight() if self.full_rank else self.base.weight + self.delta_weight())
        if mode == "dense":  # (with W dropped for training, W_δ comes from the factors)
            return self._apply(x, self.naive_weight() if self.dropped else self.base.weight + self.delta_weight())
        return self._factored(x)

    def cheapest(self, x) -> str:
        """Cost model, multiply-adds of forward + backward for T input positions (tokens, or conv output pixels),
        W of m x n, r factors. Dense: the frozen GEMM with W + ΔW runs forward, backward-to-input and
        backward-to-weight (3·T·m·n) and ΔW is built and differentiated (2·m·n·r). Factored: x·V and ·Uᵀ forward,
        and the same two backward (2·T·r·(m+n)), replacing the frozen GEMM instead of adding to it. A 3x3 conv
        (n = 9·c_in ≫ m) or any layer with many tokens prefers factored; square layers with few tokens, dense."""
        m, n = self.base.weight.shape[0], self.base.weight[0].numel()
        r = self.sigma.shape[0]
        if self.kind == "conv":
            h, w = x.shape[-2:]
            kh, kw = self.base.kernel_size
            sh, sw = self.base.stride
            ph, pw = self.base.padding
            T = x.shape[0] * ((h + 2 * ph - kh) // sh + 1) * ((w + 2 * pw - kw) // sw + 1)
        else:
            T = x.numel() // x.shape[-1]
        dense = 3 * T * m * n + 2 * m * n * r
        factored = 2 * T * r * (m + n) + (0 if self.full_rank else 2 * T * m * n)  # rank-limited: W x too
        return "factored" if factored < dense else "dense"

    def _apply(self, x, W):
        if self.kind == "linear":
            return F.linear(x, W, self.base.bias)
        b = self.base
        return F.conv2d(x, W, b.bias, b.stride, b.padding, b.dilation, b.groups)

    def _factored(self, x):
        """y = ((x·V) ⊙ ReLU(σ+δ))·Uᵀ + b — the factorization itself as two thin layers. With a rank limit k the
        frozen layer runs as is and only the shifted part is added: y = W x + ((x·V_k) ⊙ (ReLU(σ+δ) - σ))·U_kᵀ."""
        scale = (spectral_shift(self.sigma, self.delta) if self.full_rank else self.delta_sigma()).to(self.U.dtype)
        b = self.base
        bias = b.bias if self.full_rank else None
        if self.kind == "linear":
            y = F.linear(F.linear(x, self.Vh) * scale, self.U, bias)
        else:
            filters = self.Vh.view(-1, *b.weight.shape[1:])  # r filters over the c_in x kh x kw patch
            h = F.conv2d(x, filters, None, b.stride, b.padding, b.dilation)
            y = F.conv2d(h * scale[:, None, None], self.U[:, :, None, None], bias)  # U as a 1x1 conv
        return y if self.full_rank else y + b(x)

    def _norm(self, x, gamma):
        b = self.base
        if isinstance(b, nn.GroupNorm):  # statistics in fp32, as SD's GroupNorm32
            return F.group_norm(x.float(), b.num_groups, gamma.float(), b.bias.float(), b.eps).to(x.dtype)
        return F.layer_norm(x, b.normalized_shape, gamma.to(x.dtype), b.bias, b.eps)

    # -- training memory --------------------------------------------------------------------------------------
    def factored_always(self) -> bool:
        """Is the factored path the cheaper one at every token count T? Per token it costs 2·r·(m+n) against the
        dense path's 3·m·n (whose 2·m·n·r only adds to it): true for every full-rank layer at least twice as wide
        as tall or tall as wide, so for every 3x3 conv of SD (9·c_in ≥ 2·c_out). Such a layer never reads W while
        training."""
        if self.kind not in ("linear", "conv") or not self.full_rank or self.mode == "dense":
            return False
        m, n, r = self.U.shape[0], self.Vh.shape[1], self.sigma.shape[0]
        return 2 * r * (m + n) <= 3 * m * n

    @property
    def dropped(self) -> bool:
        return self.base.weight.is_meta

    @torch.no_grad()
    def drop_weight(self):
        """Free W (see `drop_weights`); its shape stays, on the meta device."""
        self.base.weight = nn.Parameter(torch.empty_like(self.base.weight, device="meta"), requires_grad=False)

    # -- inference --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, keep_original=True):
        """Write W_δ into the base weight once, so the layer costs exactly what the base layer costs."""
        if self.merged:
            return
        if self.dropped:  # no W to add ΔW to: W_δ from the factors (the SVD's rounding, ≤ 1e-6), no original
            self.base.weight = nn.Parameter(self.naive_weight().detach(), requires_grad=False)
            self.original, self.merged = None, True
            return
        W = self.base.weight
        self.original = W.detach().to("cpu", copy=True) if keep_original else None
        new = W + self.delta.to(W.dtype) if self.kind == "norm" else W + self.delta_weight()
        W.copy_(new)
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
# Adding shifts to a model


def _in_subset(component: str, name: str, module: nn.Module, subset: str) -> bool:
    """The paper's subsets (Table 1). Names are the original checkpoint's (input_blocks = down, ...)."""
    if subset == "all":
        return True
    if subset == "text":  # SDXL: both encoders
        return component != "unet"
    if component != "unet":
        return False
    return {"unet": True,
            "cross-attn": re.search(r"attn2\.(to_q|to_k|to_v|to_out\.0)$", name) is not None,
            "cross-attn-kv": re.search(r"attn2\.(to_k|to_v)$", name) is not None,
            "1d": isinstance(module, (nn.GroupNorm, nn.LayerNorm)),
            "2d": isinstance(module, nn.Linear),
            "4d": isinstance(module, nn.Conv2d),
            "up": name.startswith("output_blocks."),
            "down": name.startswith("input_blocks."),
            "mid": name.startswith("middle_block.")}[subset]


SHIFTABLE = (nn.Linear, nn.Conv2d, nn.Embedding, nn.GroupNorm, nn.LayerNorm)


def shiftable_modules(model, subset="all", keys=None):
    """[(component, module name, module)] of the weights to shift, in model order. `keys`: original checkpoint
    keys (a shift file's) instead of a subset."""
    import sd
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")
    out = []
    for component in sd.SHIFTED:
        root = getattr(model, component)
        if root is None:
            continue
        for name, m in root.named_modules():
            if not isinstance(m, SHIFTABLE) or getattr(m, "weight", None) is None:
                continue
            if keys is not None:
                if sd.checkpoint_key(component, name + ".weight", model.family) in keys:
                    out.append((component, name, m))
            elif _in_subset(component, name, m, subset):
                out.append((component, name, m))
    return out


def shift_length(module: nn.Module, rank=None) -> int:
    """Length of δ: min(rows, cols) of the matrix (at most `rank`), or C for a norm's γ. Works on `meta`."""
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return module.weight.shape[0]
    r = min(module.weight.shape[0], module.weight[0].numel())
    return r if rank is None else min(rank, r)


def shifts(model):
    """[(original checkpoint key, SpectralShift)] of a model with shifts added."""
    import sd
    out = []
    for component in sd.SHIFTED:
        root = getattr(model, component)
        for name, m in (root.named_modules() if root is not None else []):
            if isinstance(m, SpectralShift):
                out.append((sd.checkpoint_key(component, name + ".weight", model.family), m))
    return out


def _set_child(root: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def add_spectral_shifts(model, subset="all", rank=None, mode="auto", cache=None, keys=None, progress=True):
    """Wrap the chosen layers of model.unet and the text encoder(s) (sd.SHIFTED) in SpectralShift (δ = 0: outputs
    unchanged). The SVDs run on the model's device; `cache` (a file path) stores/reuses them, keyed by the base
    weights' fingerprint. Everything else is frozen. Returns the list of (key, SpectralShift)."""
    import sd
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    for component in sd.SHIFTED + ("vae",):
        if getattr(model, component, None) is not None:
            getattr(model, component).requires_grad_(False)
    chosen = shiftable_modules(model, subset, keys)
    if not chosen:
        raise ValueError(f"no layers selected (subset {subset!r})")
    cached = load_svd_cache(cache, model) if cache else {}
    computed = {}
    for component, name, m in tqdm(chosen, desc="SVD", disable=not progress):
        root = getattr(model, component)
        key = f"{component}.{name}"
        factors = None
        if not isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            factors = cached.get(key)
            if factors is None:
                factors = svd(matrix_of(m))
                if cache:  # kept for the file in float32 on the CPU (a float32 CPU layer shares these tensors)
                    factors = computed[key] = tuple(f.float().cpu() for f in factors)
            factors = tuple(f.to(m.weight.device) for f in factors)
        _set_child(root, name, SpectralShift(m, rank, factors, mode))
    if cache and computed:
        save_svd_cache(cache, model, {**cached, **computed})
    return shifts(model)


def remove_spectral_shifts(model):
    """Put the plain layers back (with their current weights: unmerge first to get the originals)."""
    import sd
    for component in sd.SHIFTED:
        root = getattr(model, component)
        for name, m in list(root.named_modules() if root is not None else []):
            if isinstance(m, SpectralShift):
                if m.dropped and not m.merged:
                    raise ValueError(f"{name}: its weight was dropped for training; merge first, or reload the model")
                _set_child(root, name, m.base)


def param_groups(model, lr=1e-3, lr_1d=1e-6):
    """AdamW groups with the authors' learning rates: 1e-3 for matrix shifts, 1e-6 for norm (1-D) shifts."""
    matrix = [m.delta for _, m in shifts(model) if m.kind != "norm"]
    norm = [m.delta for _, m in shifts(model) if m.kind == "norm"]
    return [g for g in ({"params": matrix, "lr": lr, "name": "matrix"},
                        {"params": norm, "lr": lr_1d, "name": "1d"}) if g["params"]]


def set_mode(model, mode):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    for _, m in shifts(model):
        m.mode = mode


def drop_weights(model) -> int:
    """For training: free W of every shifted layer that never reads it, because its factored path is the cheaper
    one at any token count (`SpectralShift.factored_always`: the 3x3 convs, feed-forward and text MLP layers,
    wide cross-attention k/v). Training, sampling with unmerged shifts, shift files and the fingerprint work as
    before; `merge` then writes W_δ = U diag(ReLU(σ+δ)) Vᵀ from the factors (equal to W + ΔW up to the SVD's
    rounding, ≤ 1e-6, instead of bit-exact) and the original weights need a reload. Returns the bytes freed."""
    fingerprint(model)  # a model built in memory is digested now, while every W is still there
    freed = 0
    for _, m in shifts(model):
        if not m.dropped and m.factored_always():
            freed += m.base.weight.numel() * m.base.weight.element_size()
            m.drop_weight()
    return freed


def merge(model, keep_original=True):
    for _, m in shifts(model):
        m.merge(keep_original)


def bake(model):
    """Merge for good, for inference: W_δ written into the weights and the wrappers removed, so that U and Vᵀ (as
    much memory as W again) are freed and the model is the plain architecture at exactly the base model's cost."""
    merge(model, keep_original=False)
    remove_spectral_shifts(model)


def unmerge(model):
    for _, m in shifts(model):
        m.unmerge()


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint and SVD cache


def fingerprint(model) -> str:
    """The identity of the base weights (UNet + text encoder(s), sd.SHIFTED) that shift files and the SVD cache are
    checked against.

    It must not depend on how the model was loaded — fp32, bf16 or fp16, single file or diffusers folder, CPU or
    CUDA — so that a file trained in bf16 applies to an fp16 load, yet it must change when any weight does (another
    fine-tune of the same architecture). So it is a digest of the weights AS STORED, each rounded to fp16
    (`checkpoint.tensor_digests`: published weights are fp32 or fp16 rounded from them, and both round to the same fp16
    bits), computed by sd.load while it streams the files, before the cast: a bf16 load no longer holds the fp16
    values. A model built in memory (no digests from sd.load) is digested from its weights on first use. The
    identity is fixed from then on: it names the weights that were loaded, not later edits such as a merge. (A
    checkpoint stored in bf16 is coarser than fp16, so it differs from the fp32 original of the same model.)"""
    import sd
    for component in sd.SHIFTED:
        root = getattr(model, component)
        if root is not None and component not in model.digests:
            digests = {}
            for name, p in root.named_parameters():
                if not name.endswith("delta"):
                    if p.is_meta:
                        raise ValueError(f"{component}.{name} was dropped before the model's fingerprint was taken")
                    digests.update(checkpoint.tensor_digests(name.replace("base.", ""), p))
            model.digests[component] = checkpoint.weights_digest(digests)
    h = "".join(f"{c}:{model.digests[c]}\n" for c in sd.SHIFTED if getattr(model, c) is not None)
    return hashlib.sha256(h.encode()).hexdigest()[:16]


SVD_CACHE_LAYOUT = "U,S,Vh"  # a cache of another layout (older: V [n, r]) is recomputed
PRECISION = {"torch.float32": 3, "torch.float16": 2, "torch.bfloat16": 1}  # bits of mantissa, in order


def _weights_dtype(model) -> torch.dtype:
    """The dtype the base weights were loaded in (δ, always fp32, aside)."""
    import sd
    return next(p for c in sd.SHIFTED if getattr(model, c) is not None
                for n, p in getattr(model, c).named_parameters() if not n.endswith("delta")).dtype


def check_svd_cache(path):
    """--svd-cache names a new file or an SVD cache (ours: a fingerprint and U/S/Vh tensors), which may be
    overwritten; a model checkpoint or a shift file named by mistake must never be replaced. The scripts call it
    before loading anything."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        return
    try:
        with safe_open(str(path), framework="pt") as f:
            ours = "fingerprint" in (f.metadata() or {}) and all(k.rsplit(".", 1)[-1] in ("U", "S", "V", "Vh")
                                                                 for k in f.keys())
    except Exception:  # safetensors raises its own SafetensorError (not a ValueError) for a file it cannot read
        ours = False
    if not ours:
        raise ValueError(f"--svd-cache {path} is not an SVD cache (a checkpoint or shift file?) and would be "
                         "overwritten; name a new file, which the SVD is then saved to")


def load_svd_cache(path, model) -> dict:
    path = Path(path)
    if not path.is_file():
        return {}
    check_svd_cache(path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint(model) or meta.get("layout") != SVD_CACHE_LAYOUT:
            print(f"note: SVD cache {path} is for other base weights (or an older layout); recomputing",
                  file=sys.stderr)
            return {}
        # The same weights loaded more coarsely than now (a cache made from a bf16 load, read by an fp32 one) would
        # give factors of the rounded W: recompute them from these weights (and keep those instead).
        made_from, now = meta.get("weights_dtype", "torch.float32"), str(_weights_dtype(model))
        if PRECISION.get(made_from, 0) < PRECISION[now]:
            print(f"note: SVD cache {path} was made from {made_from} weights, these are {now}; recomputing",
                  file=sys.stderr)
            return {}
        names = {k.rsplit(".", 1)[0] for k in f.keys()}
        return {n: (f.get_tensor(n + ".U"), f.get_tensor(n + ".S"), f.get_tensor(n + ".Vh").T) for n in names}


def save_svd_cache(path, model, factors: dict):
    from safetensors.torch import save_file
    flat = {}
    for n, (U, S, V) in factors.items():
        # float32 halves the file; the layer casts U, Vᵀ to the weight dtype and keeps σ in float32 anyway
        flat |= {n + ".U": U.float().contiguous().cpu(), n + ".S": S.float().contiguous().cpu(),
                 n + ".Vh": V.T.float().contiguous().cpu()}
    meta = {"fingerprint": fingerprint(model), "layout": SVD_CACHE_LAYOUT, "weights_dtype": str(_weights_dtype(model))}
    atomic_write(lambda p: save_file(flat, str(p), metadata=meta), Path(path))


def atomic_write(write, path: Path):
    """Temp file in the same folder (created if missing), then rename: a crash never leaves a half-written file.
    The file gets the mode a plain open() gives it, 0666 less the umask, whatever `write` created it with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        # safetensors' save_file (0.8, Rust) creates its file 0600, so shift files, exports and the SVD cache were
        # private while PNGs and JSON were not; one chmod here sets every writer's mode. The umask can only be read
        # by setting it: put back at once (a file another thread created in that instant would get umask 022; the
        # scripts here run no other threads).
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
