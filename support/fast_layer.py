"""SpectralShift as the scripts run it: the same W_δ (svdiff.py), computed the cheaper way, and the W it then never
reads freed. Speed and memory, not the method: tests/test_fast_layer.py proves its outputs and gradients equal
svdiff.SpectralShift's on every layer kind.

svdiff.SpectralShift builds W + ΔW every forward (the dense path). For a layer much wider than tall (a 3x3 conv
reads 9·c_in inputs for c_out outputs) or run on many tokens, multiplying by the factors is cheaper: y = ((x·V) ⊙
ReLU(σ + δ))·Uᵀ + b, the factorization itself as two thin layers (the factored path). `cheapest` picks per call by
counting multiply-adds; a layer for which the factored path is the cheaper one at every token count never reads W
while training, and `drop_weights` frees it (3.1 of SD1.5's 3.9 GB of shifted weights).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import svdiff
from support import fast_svd, svd_cache
from support.fingerprint import fingerprint

MODES = ("auto", "dense", "factored", "naive")


class FastSpectralShift(svdiff.SpectralShift):
    """`mode`: "auto" (the cheaper path per call), "dense" (svdiff.SpectralShift's), "factored", or "naive" (W_δ =
    U diag(ReLU(σ+δ)) Vᵀ rebuilt from the factors every forward, as the public implementation does: bench.py)."""

    def __init__(self, base: nn.Module, factors=None, rank: int | None = None, mode: str = "auto"):
        super().__init__(base, factors, rank)
        self.mode = mode

    def naive_weight(self):
        """W_δ = U diag(ReLU(σ + δ)) Vᵀ from the factors alone (full rank: equal to W + ΔW up to the SVD's
        rounding, ≤ 1e-6)."""
        W = (self.U * svdiff.spectral_shift(self.sigma, self.delta).to(self.U.dtype)) @ self.Vh
        return W.reshape(self.base.weight.shape)

    def forward(self, x):
        if self.merged or self.kind in ("norm", "embedding"):
            return super().forward(x)
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
        (n = 9·c_in ≫ m) or any layer with many tokens prefers factored; square layers with few tokens, dense.
        (On a GPU a 512 px step is not bound by multiply-adds: there the two paths cost about the same,
        docs/performance.md.)"""
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
        """y = ((x·V) ⊙ ReLU(σ+δ))·Uᵀ + b. With a rank limit k the frozen layer runs as is and only the shifted part
        is added: y = W x + ((x·V_k) ⊙ (ReLU(σ+δ) - σ))·U_kᵀ."""
        scale = (svdiff.spectral_shift(self.sigma, self.delta) if self.full_rank else self.delta_sigma()).to(self.U.dtype)
        b = self.base
        bias = b.bias if self.full_rank else None
        if self.kind == "linear":
            y = F.linear(F.linear(x, self.Vh) * scale, self.U, bias)
        else:
            filters = self.Vh.view(-1, *b.weight.shape[1:])  # r filters over the c_in x kh x kw patch
            h = F.conv2d(x, filters, None, b.stride, b.padding, b.dilation)
            y = F.conv2d(h * scale[:, None, None], self.U[:, :, None, None], bias)  # U as a 1x1 conv
        return y if self.full_rank else y + b(x)

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

    @torch.no_grad()
    def merge(self, keep_original=True):
        if self.merged or not self.dropped:
            return super().merge(keep_original)
        # no W to add ΔW to: W_δ from the factors (the SVD's rounding, ≤ 1e-6), and no original to keep
        self.base.weight = nn.Parameter(self.naive_weight().detach(), requires_grad=False)
        self.original, self.merged = None, True


def add_spectral_shifts(model, subset="all", rank=None, cache=None, names=None, mode="auto", progress=True):
    """svdiff.add_spectral_shifts as the scripts call it: the fast SVD (support/fast_svd.py), its `cache` file
    (support/svd_cache.py) if given, and FastSpectralShift layers in `mode`."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    factors = svd_cache.factors(model, svdiff.shiftable_modules(model, subset, names), cache, progress) if cache \
        else None
    layers = svdiff.add_spectral_shifts(model, subset, rank, factors, fast_svd.svd, FastSpectralShift, names,
                                        progress and not cache)
    set_mode(model, mode)
    return layers


def set_mode(model, mode):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    for _, m in svdiff.shifts(model):
        m.mode = mode


def drop_weights(model) -> int:
    """For training: free W of every shifted layer that never reads it, because its factored path is the cheaper
    one at any token count (`FastSpectralShift.factored_always`: the 3x3 convs, feed-forward and text MLP layers,
    wide cross-attention k/v). Training, sampling with unmerged shifts, shift files and the fingerprint work as
    before; `merge` then writes W_δ = U diag(ReLU(σ+δ)) Vᵀ from the factors (equal to W + ΔW up to the SVD's
    rounding, ≤ 1e-6, instead of bit-exact) and the original weights need a reload. Returns the bytes freed."""
    fingerprint(model)  # a model built in memory is digested now, while every W is still there
    freed = 0
    for _, m in svdiff.shifts(model):
        if isinstance(m, FastSpectralShift) and not m.dropped and m.factored_always():
            freed += m.base.weight.numel() * m.base.weight.element_size()
            m.drop_weight()
    return freed
