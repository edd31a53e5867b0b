"""The SVD of a base model's weights, kept in a file (--svd-cache) so that later runs on the same weights read the
factors in seconds instead of computing them (minutes on a CPU for SD1.5): U, σ, Vᵀ per layer in fp32, keyed by the
weights' fingerprint.
"""
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from safetensors import safe_open
from safetensors.torch import save_file

import svdiff
from support import fast_svd
from support.files import atomic_write
from support.fingerprint import fingerprint


SVD_CACHE_LAYOUT = "U,S,Vh"  # a cache of another layout (older: V [n, r]) is recomputed
PRECISION = {"torch.float32": 3, "torch.float16": 2, "torch.bfloat16": 1}  # finer is larger (fp16 has more
# mantissa bits than bf16)


def _weights_dtype(model) -> torch.dtype:
    """The dtype the base weights were loaded in (δ, always fp32, aside)."""
    return next(p for c in svdiff.COMPONENTS if getattr(model, c) is not None
                for n, p in getattr(model, c).named_parameters() if not n.endswith("delta")).dtype


def check_svd_cache(path):
    """--svd-cache names a new file or an SVD cache (ours: a fingerprint and U/S/Vh tensors), which may be
    overwritten; a model checkpoint or a shift file named by mistake must never be replaced. The scripts call it
    before loading anything."""
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
    flat = {}
    for n, (U, S, V) in factors.items():
        # float32 halves the file; the layer casts U, Vᵀ to the weight dtype and keeps σ in float32 anyway
        flat |= {n + ".U": U.float().contiguous().cpu(), n + ".S": S.float().contiguous().cpu(),
                 n + ".Vh": V.T.float().contiguous().cpu()}
    meta = {"fingerprint": fingerprint(model), "layout": SVD_CACHE_LAYOUT, "weights_dtype": str(_weights_dtype(model))}
    atomic_write(lambda p: save_file(flat, str(p), metadata=meta), Path(path))


def factors(model, chosen, cache, progress=True) -> dict:
    """{name: (U, σ, V)} of the `chosen` [(name, module)] matrices: from the cache file where it holds them for
    these weights, the others computed (support/fast_svd.py, on the weights' device) and the file written with
    all of them. Kept in fp32 on the CPU for the file (5 GB for SD1.5's `all`), as the file holds them."""
    cached = load_svd_cache(cache, model)
    computed = {}
    for name, m in tqdm(chosen, desc="SVD", disable=not progress):
        if name not in cached and m.weight.ndim > 1:
            computed[name] = tuple(f.float().cpu() for f in fast_svd.svd(svdiff.matrix_of(m)))
    if computed:
        save_svd_cache(cache, model, cached | computed)
    return cached | computed
