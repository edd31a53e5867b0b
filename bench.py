"""Speed, memory and size of SVDiff against the alternatives users would pick, on the full SD1.5 or SDXL architecture.

    python bench.py                                   # CPU, 256 px, 3 repetitions
    python bench.py --device cuda --resolution 512    # bf16 autocast, as train.py trains on a GPU
    python bench.py --device cuda --arch sdxl --resolution 1024   # SDXL (a GPU only: 10 GB in fp32 for its UNet)
    python bench.py --tiny --steps 1                  # a tiny random model: checks bench.py itself in seconds

The UNet and text encoder(s) (SD1.5: CLIP ViT-L; SDXL: ViT-L and OpenCLIP bigG) are built from their
configurations with seeded random weights (no download; speed does not depend on the values). Every method trains
the same model on the same batch (1 instance + 1 prior image, Eq. 3) with the same AdamW:
  svdiff   spectral shifts of the `all` layers (UNet and text encoders), each layer on its cheapest exact path
  naive    the same shifts with W_δ = U diag(ReLU(σ+δ)) Vᵀ rebuilt every forward (the public implementation)
  lora     rank-4 LoRA on the UNet attention projections q/k/v/out (diffusers' DreamBooth-LoRA default, SDXL's too)
  full     every UNet weight (DreamBooth; fp32 master weights under autocast on CUDA, as diffusers)
Timings are noisy on a shared machine, so every result is a RATIO measured side by side in this one process:
each pair of methods takes turns within every repetition, and the ratio is of the medians; the seconds are
given for context. Peak memory is measured in a child process per method that runs only that method (CUDA:
max allocated; CPU: peak RSS), beside a child that only builds the model; another child trains as train.py does
with --grad-checkpointing for --train-steps steps (seconds per step, peak memory). The last line printed is a
one-line JSON summary; --json FILE writes every figure.
"""
import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_text
import sd
import svdiff
import unet as unet_lib
from support import apply_shifts, cli, fast_layer, fast_svd, shift_files
from support.files import atomic_write
from support.svd_cache import check_svd_cache

LORA_RANK = 4
LORA_TARGETS = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")  # diffusers' default target_modules
METHODS = ("svdiff", "naive", "lora", "full")
PARTS = ("svd", "files", "training", "sampling", "memory", "checkpointing")
CHILD_PARTS = ("memory", "checkpointing")  # measured in processes of their own (the SVD cache, if any, is reused)
ARCHS = ("sd15", "sdxl")
PROMPTS = ["a photo of sks dog", "a photo of a dog"]  # the batch: one instance and one prior example
SUMMARY_KEYS = ("fast_vs_naive", "fast_vs_full", "fast_vs_lora", "svd_seconds", "svd_cached_seconds", "svd_vs_lapack",
                "merged_vs_base_sampling", "shift_file_bytes", "checkpointed_step_seconds", "checkpointed_peak_bytes")
ARCH_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
# svd_vs_lapack times every 8th matrix of the `all` set: LAPACK's SVD of all 356 would take ~10 minutes on 2 cores
SVD_SAMPLE_EVERY = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to measure")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latents are 1/8)")
    p.add_argument("--steps", type=int, default=3, help="timed repetitions per method (after one warm-up)")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--svd-cache", default=None, help="keep the SVD cache of the random weights here (an existing "
                   "file must be an SVD cache: it is replaced) (default: a temporary file)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="which measurements, comma-separated")
    p.add_argument("--arch", choices=ARCHS, default="sd15",
                   help="the architecture: SD1.5 (UNet + CLIP ViT-L) or SDXL base (UNet + ViT-L + bigG; a GPU only, "
                        "unless --tiny: its UNet alone is 10 GB in fp32 and its SVD would take hours on a CPU)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model of --arch's kind (tests bench.py)")
    p.add_argument("--train-steps", type=int, default=20,
                   help="steps of the checkpointing part: SVDiff trained as train.py --grad-checkpointing trains")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one memory probe (see PROBES)
    return p.parse_args(argv)


def check_args(a):
    if a.resolution % 8 or a.resolution < 8:
        raise ValueError(f"--resolution must be a positive multiple of 8, got {a.resolution}")
    if a.steps < 1 or a.train_steps < 1:
        raise ValueError("--steps and --train-steps must be at least 1")
    bad = set(a.parts.split(",")) - set(PARTS)
    if bad:
        raise ValueError(f"--parts: unknown {', '.join(sorted(bad))}; choose from {', '.join(PARTS)}")
    cli.check_device(a.device)
    if a.svd_cache:  # bench.py replaces it with the SVD of its random weights
        check_svd_cache(a.svd_cache)
    if a.json:
        cli.check_writable(Path(a.json).parent, "--json")
    if a.arch == "sdxl" and a.device == "cpu" and not a.tiny:
        raise ValueError("--arch sdxl measures the full SDXL architecture on a GPU (--device cuda): its UNet alone is "
                         "10 GB in fp32 and the SVD would take hours on a CPU; add --tiny for its tiny form here")


# ---------------------------------------------------------------------------------------------------------------
# The model: SD1.5's or SDXL's architecture (or a tiny one of either kind), seeded random weights


def configs(arch: str, tiny: bool):
    """(UNet config, [text encoder configs]) of an architecture: the full one, or a tiny one of the same kind."""
    if arch == "sd15":
        if not tiny:
            return unet_lib.UNetConfig(), [clip_text.TextConfig()]  # the defaults ARE SD1.5's UNet and CLIP ViT-L/14
        return (unet_lib.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                                    num_heads=2, context_dim=64),
                [clip_text.TextConfig(width=64, layers=2, heads=1, intermediate=256)])
    # SDXL base 1.0 (its unet/, text_encoder/ and text_encoder_2/ config.json): no attention at level 0, 2 and 10
    # transformer blocks at levels 1 and 2 and 10 in the middle, 64-channel heads, context 768 + 1280, label_emb on
    # y = bigG's pooled 1280 + 6 x 256; ViT-L runs 11 of its 12 layers, bigG all 32 and its projection
    if not tiny:
        return (unet_lib.UNetConfig(model_channels=320, channel_mult=(1, 2, 4), attention_levels=(1, 2), num_heads=None,
                                    head_dim=64, transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                                    context_dim=2048, linear_proj=True, adm_in_channels=2816),
                [clip_text.TextConfig(layers=11, final_norm=False),
                 clip_text.TextConfig("sd2", width=1280, layers=32, heads=20, intermediate=5120, act="gelu",
                                      final_norm=False, projection_dim=1280)])
    return (unet_lib.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                                num_heads=None, head_dim=32, transformer_depth=(0, 2), transformer_depth_middle=2,
                                context_dim=128, linear_proj=True, adm_in_channels=64 + 6 * unet_lib.SIZE_EMBED_DIM),
            [clip_text.TextConfig(width=64, layers=1, heads=1, intermediate=256, final_norm=False),
             clip_text.TextConfig("sd2", width=64, layers=2, heads=1, intermediate=256, act="gelu", final_norm=False,
                                  projection_dim=64)])


def build_model(tiny: bool, device: str, dtype: torch.dtype, arch: str = "sd15") -> sd.StableDiffusion:
    """The same weights in every process (seed 0, built on `device`), so a child process can reuse the parent's SVD
    cache. The tokenizers come from the shipped CLIP vocabulary, so that PROMPTS are encoded as train.py encodes
    prompts (sd.encode_prompts: for SDXL both encoders and y)."""
    ucfg, tcfgs = configs(arch, tiny)
    torch.manual_seed(0)
    with torch.device(device):  # PyTorch's default (random) inits, where the model will run (fast on a GPU)
        unet, texts = unet_lib.UNet(ucfg), [clip_text.build_text_encoder(cfg) for cfg in tcfgs]
    unet, texts = unet.to(dtype).requires_grad_(False), [t.to(dtype).requires_grad_(False) for t in texts]
    tokenizers = [clip_text.Tokenizer.from_bpe(clip_text.find_bpe_vocab(), clip_text.pad_id_for(cfg.family))
                  for cfg in tcfgs]
    if arch == "sd15":
        return sd.StableDiffusion(unet, None, texts[0], tokenizers[0], "sd1", "epsilon")
    return sd.StableDiffusion(unet, None, texts[0], tokenizers[0], "sdxl", "epsilon", text_encoder_2=texts[1],
                              tokenizer_2=tokenizers[1])


def make_batch(model, resolution: int, device: str):
    """One instance + one prior example (their prompts: PROMPTS): noisy latents, timesteps and the noise target."""
    g = torch.Generator().manual_seed(1)
    h = resolution // 8
    x_t = torch.randn(2, model.unet.cfg.in_channels, h, h, generator=g)
    noise = torch.randn(x_t.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    dtype = next(model.unet.parameters()).dtype
    return x_t.to(device, dtype), t.to(device), noise.to(device)


# ---------------------------------------------------------------------------------------------------------------
# LoRA, the baseline (a few lines instead of an import, so that bench.py depends on nothing but this project)


class LoRA(nn.Module):
    """y = W x + (α/r)·B·A x on a frozen Linear (Hu et al. 2021); A Gaussian, B = 0, α = r, as diffusers inits."""

    def __init__(self, base: nn.Linear, rank: int = LORA_RANK):
        super().__init__()
        self.base = base
        w = base.weight
        self.down = nn.Parameter(torch.randn(rank, w.shape[1], device=w.device) / rank)  # A, fp32 like peft
        self.up = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device))            # B
        self.scale = 1.0  # α / r with α = r

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.down), self.up) * self.scale


def lora_layers(unet) -> list[str]:
    """Names of the UNet Linears that diffusers' DreamBooth-LoRA adapts (also when wrapped, e.g. by SVDiff)."""
    return [n for n, m in unet.named_modules()
            if LORA_TARGETS.search(n) and isinstance(getattr(m, "base", m), nn.Linear)]


def lora_param_count(unet, rank: int = LORA_RANK) -> int:
    """r·(in + out) per adapted layer; works on the `meta` device."""
    return sum(rank * sum(getattr(m, "base", m).weight.shape) for m in map(unet.get_submodule, lora_layers(unet)))


def save_lora_file(loras: dict, unet, path: Path, dtype=torch.float32):
    """The LoRA as diffusers writes it (`unet.<diffusers module>.lora_A/lora_B.weight`), for its size on disk."""
    from safetensors.torch import save_file
    tensors = {}
    for name, layer in loras.items():
        key = "unet." + unet_lib.original_to_diffusers(name + ".weight", unet.cfg).removesuffix(".weight")
        tensors[key + ".lora_A.weight"] = layer.down.detach().to("cpu", dtype).contiguous()
        tensors[key + ".lora_B.weight"] = layer.up.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(path))


# ---------------------------------------------------------------------------------------------------------------
# The methods on one model: each is a set of modules put in place, trainable parameters and an optimizer


class Methods:
    """Holds SVDiff's SpectralShift wrappers and the LoRA wrappers of one model, and puts the modules of a method
    in place (`use`), so that all methods train the very same weights in one process."""

    def __init__(self, model, cache, device, which=METHODS):
        self.model, self.device = model, device
        if {"svdiff", "naive"} & set(which) and not svdiff.shifts(model):
            fast_layer.add_spectral_shifts(model, "all", cache=cache, progress=False)
        self.shifts = dict(svdiff.shifts(model))  # layer name ("unet.…") -> SpectralShift; LoRA by UNet module name
        self.loras = {}
        if "lora" in which:
            plain = lambda m: getattr(m, "base", m)
            self.loras = {n: LoRA(plain(model.unet.get_submodule(n))) for n in lora_layers(model.unet)}
        self.full_unet = None  # CUDA: fp32 master weights for the full fine-tune (CPU: the model is fp32 already)
        self.optimizers = {}

    def weights(self):
        """The UNet's own parameters (W, b, γ, β) wherever they sit in the tree (not held here: a child process
        may drop W with fast_layer.drop_weights, and a list here would keep it alive)."""
        return [p for n, p in self.model.unet.named_parameters() if not n.endswith(("delta", ".down", ".up"))]

    def use(self, method):
        """Put `method`'s modules in the model: shifts for svdiff/naive, LoRA on attention for lora, the plain
        layers otherwise ("full", "base"); only the full fine-tune leaves the UNet weights trainable."""
        for name, shift in self.shifts.items():
            component, _, path = name.partition(".")
            new = shift if method in ("svdiff", "naive") else \
                self.loras[path] if method == "lora" and component == "unet" and path in self.loras else shift.base
            svdiff.set_module(self.model, name, new)
        if not self.shifts:  # a child process with LoRA alone
            for path, lora in self.loras.items():
                svdiff.set_module(self.model, "unet." + path, lora if method == "lora" else lora.base)
        if self.shifts and method in ("svdiff", "naive"):
            fast_layer.set_mode(self.model, "auto" if method == "svdiff" else "naive")
        for p in self.weights():
            p.requires_grad_(method == "full" and self.full_unet is None)

    def unet_for(self, method):
        return self.full_unet if method == "full" and self.full_unet is not None else self.model.unet

    def optimizer(self, method):
        """One AdamW per method, made once (svdiff and naive share δ, so they share it too)."""
        key = "svdiff" if method == "naive" else method
        if key not in self.optimizers:
            self.use(method)
            if key == "svdiff":
                groups = svdiff.param_groups(self.model)  # δ of UNet and text encoder, lr 1e-3 / 1e-6
            elif key == "lora":
                groups = [{"params": [p for l in self.loras.values() for p in (l.down, l.up)], "lr": 1e-4}]
            else:
                if self.device == "cuda":  # mixed precision keeps fp32 weights, as diffusers' full fine-tune
                    self.full_unet = copy.deepcopy(self.model.unet).float().requires_grad_(True)
                groups = [{"params": list(self.unet_for("full").parameters()), "lr": 5e-6}]
            self.optimizers[key] = torch.optim.AdamW(groups)
        return self.optimizers[key]

    def drop_shifts(self):
        """Let SVDiff's wrappers (and their U, Vᵀ) go: plain layers back, LoRA still switchable."""
        self.use("base")
        self.shifts = {}
        self.optimizers.pop("svdiff", None)
        gc.collect()

    def drop(self, method):
        """Free a method's optimizer state (and the full fine-tune's fp32 copy)."""
        key = "svdiff" if method == "naive" else method
        self.optimizers.pop(key, None)
        if key == "full":
            self.full_unet = None
        gc.collect()


def autocast(device):
    """bf16 autocast on CUDA, as train.py; CPU trains in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")


def train_step(methods: Methods, method: str, batch):
    """One optimisation step of Eq. 3 (λ = 1): text encoder(s) (trained only by SVDiff's `all`), UNet, AdamW."""
    optimizer = methods.optimizer(method)
    methods.use(method)
    x_t, t, noise = batch
    unet = methods.unet_for(method)
    with autocast(methods.device):
        with torch.set_grad_enabled(method in ("svdiff", "naive")):
            cond = sd.encode_prompts(methods.model, PROMPTS)
        pred = unet(x_t.to(next(unet.parameters()).dtype), t, cond.context, cond.y).float()
    loss, _ = svdiff.prior_preservation_loss(pred[:1], noise[:1], pred[1:], noise[1:], 1.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # now, not before backward: gradients do not outlive the step
    return loss.item()


# ---------------------------------------------------------------------------------------------------------------
# Timing


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict, reps: int, device) -> dict:
    """Seconds of each function, `reps` times, taking turns (the order flips every repetition so that neither
    always runs first), after one untimed warm-up each. Returns name -> list of seconds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            times[name].append(timed(fns[name], device))
    return times


def median(xs):
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------------------------
# The measurements


def bench_svd(model, cache: Path, device, progress: bool):
    """SVD of every `all` matrix of UNet + text encoder: cold (computing them, and writing the cache), then from
    the cache into fresh layers, counting the reading of every factor (the cache is memory-mapped, so reading
    happens at first use). Then our route against torch.linalg.svd (LAPACK on the CPU, cuSOLVER on CUDA) on the
    same matrices in the same run: svd_vs_lapack = ours ÷ theirs, a ratio that does not drift with the machine's
    load as the seconds do. Leaves the model with its shifts added from the cache."""
    cache.unlink(missing_ok=True)
    t0 = time.perf_counter()
    fast_layer.add_spectral_shifts(model, "all", cache=cache, progress=progress)
    cold = time.perf_counter() - t0
    svdiff.remove_spectral_shifts(model)
    gc.collect()
    t0 = time.perf_counter()
    fast_layer.add_spectral_shifts(model, "all", cache=cache, progress=False)
    for _, m in svdiff.shifts(model):
        if m.kind != "norm":
            m.U.sum(), m.Vh.sum()
    sync(device)
    cached = time.perf_counter() - t0
    return {"svd_seconds": cold, "svd_cached_seconds": cached, "svd_cache_bytes": cache.stat().st_size,
            **svd_vs_lapack(model, device)}


def svd_vs_lapack(model, device):
    """fast_svd.svd (Gram + eigh) and torch.linalg.svd, both float64 from the weight, on every SVD_SAMPLE_EVERY-th
    matrix in model order, each matrix by both in turn (the order flips every matrix), after one untimed call of
    each (library start-up). Returns the ratio of the summed seconds and the seconds."""
    matrices = [svdiff.matrix_of(m.base) for _, m in svdiff.shifts(model) if m.kind != "norm"]
    sample = matrices[::SVD_SAMPLE_EVERY]
    ours = lambda W: (lambda: fast_svd.svd(W))
    lapack = lambda W: (lambda: torch.linalg.svd(W.detach().double(), full_matrices=False))
    ours(sample[0])(), lapack(sample[0])()
    seconds = {"ours": 0.0, "lapack": 0.0}
    for i, W in enumerate(sample):
        pair = (("ours", ours(W)), ("lapack", lapack(W)))
        for name, fn in (pair if i % 2 == 0 else pair[::-1]):
            seconds[name] += timed(fn, device)
    return {"svd_vs_lapack": seconds["ours"] / seconds["lapack"], "svd_sample_seconds": seconds,
            "svd_sample_matrices": len(sample), "svd_matrices": len(matrices)}


def bench_files(methods: Methods, folder: Path):
    """Bytes of the `all` shift file (fp32 and fp16) and of the rank-4 LoRA file, written as users get them."""
    model = methods.model
    methods.use("svdiff")
    with torch.no_grad():
        for _, m in svdiff.shifts(model):
            m.delta.normal_(0, 1e-3)
    shift_files.save_shift_file(model, folder / "shifts.safetensors")
    shift_files.save_shift_file(model, folder / "shifts_fp16.safetensors", half=True)
    save_lora_file(methods.loras, model.unet, folder / "lora.safetensors")
    save_lora_file(methods.loras, model.unet, folder / "lora_fp16.safetensors", torch.float16)
    size = lambda name: (folder / name).stat().st_size
    return {"shift_file_bytes": size("shifts.safetensors"), "shift_file_fp16_bytes": size("shifts_fp16.safetensors"),
            "lora_file_bytes": size("lora.safetensors"), "lora_file_fp16_bytes": size("lora_fp16.safetensors"),
            "shift_floats": sum(m.delta.numel() for _, m in svdiff.shifts(model)),
            "lora_params": lora_param_count(model.unet)}


def bench_pair(methods: Methods, batch, reps: int, a: str, b: str):
    """Step times of two methods taking turns; returns (seconds of a, seconds of b, median(a) / median(b))."""
    step = lambda m: (lambda: train_step(methods, m, batch))
    times = alternate({a: step(a), b: step(b)}, reps, methods.device)
    return times[a], times[b], median(times[a]) / median(times[b])


def bench_training(methods: Methods, batch, reps: int):
    """SVDiff's fast step against the naive rebuild and against LoRA, side by side."""
    out = {"seconds": {"svdiff": []}}
    for other in ("naive", "lora"):
        fast, slow, out[f"fast_vs_{other}"] = bench_pair(methods, batch, reps, "svdiff", other)
        out["seconds"]["svdiff"] += fast
        out["seconds"][other] = slow
    return out


def bench_full(methods: Methods, batch, reps: int, fast_vs_lora: float):
    """The full fine-tune against LoRA, side by side, once SVDiff's factors have left memory: the full fine-tune's
    AdamW state (2 x 3.4 GB in fp32) and SVDiff's factors (5 GB) do not fit together in a 24 GB machine. So
    fast ÷ full = (fast ÷ LoRA) x (LoRA ÷ full), each ratio measured side by side."""
    lora, full, lora_vs_full = bench_pair(methods, batch, reps, "lora", "full")
    methods.drop("full")
    return {"lora_vs_full": lora_vs_full, "fast_vs_full": fast_vs_lora * lora_vs_full,
            "seconds_full_pair": {"lora": lora, "full": full}}


def bench_sampling(methods: Methods, batch, reps: int, arch: str, tiny: bool, folder: Path, cache: Path):
    """Per-step UNet time (batch 2: classifier-free guidance) of a second copy of the model with a shift file
    applied as sample.py applies it (apply_shift_files: W_δ merged into the weights once, wrappers removed),
    against the base model, taking turns. (Our UNet against diffusers': tests/bench_diffusers.py, since the
    program never imports diffusers.)"""
    model, device = methods.model, methods.device
    methods.use("svdiff")
    shift_files.save_shift_file(model, folder / "sample_shifts.safetensors")
    methods.use("base")
    shifted = build_model(tiny, device, next(model.unet.parameters()).dtype, arch)
    t0 = time.perf_counter()
    apply_shifts.apply_shift_files(shifted, [str(folder / "sample_shifts.safetensors")], cache=cache)
    sync(device)
    apply_seconds = time.perf_counter() - t0
    x_t, t, _ = batch
    with torch.no_grad(), autocast(device):
        c = sd.encode_prompts(model, PROMPTS)
        fns = {"base": lambda: model.unet(x_t, t[:1], c.context, c.y),
               "merged": lambda: shifted.unet(x_t, t[:1], c.context, c.y)}
        times = alternate(fns, 3 * reps, device)  # steps are short and the ratio is near 1: more turns
    return {"sampling_seconds": times, "merged_vs_base_sampling": median(times["merged"]) / median(times["base"]),
            "apply_shifts_seconds": apply_seconds}


# ---------------------------------------------------------------------------------------------------------------
# Memory: one child process per method

PROBES = ("model", "svdiff", "svdiff-drop-w", "naive", "lora", "full")  # model: built, nothing trained


def peak_memory(device) -> int:
    """CUDA: max allocated. CPU: the process's peak RSS, from /proc's VmHWM where there is one: getrusage's
    ru_maxrss would carry the parent's peak into a child (Linux keeps it across fork and exec)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status")
    for line in (status.read_text().splitlines() if status.is_file() else []):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def child(a):
    """The `--child` process: build the model, train one method, print the peak memory since the model was built.
    A probe (PROBES) takes one step: the first is the peak (it allocates AdamW's state while the gradients are
    alive). "checkpointing" trains SVDiff as train.py --grad-checkpointing does (fast_layer.drop_weights, the UNet's
    activations recomputed in the backward pass) for 1 + --train-steps steps, and prints the timed ones' seconds."""
    device = a.device
    model = build_model(a.tiny, device, torch.bfloat16 if device == "cuda" else torch.float32, a.arch)
    if a.child == "svd-cache":  # not a probe: writes the cache the probes read, so none of them times the SVD
        fast_layer.add_spectral_shifts(model, "all", cache=a.svd_cache, progress=False)
        print("{}")
        return
    if device == "cuda":  # from here: the model as it runs, not the fp32 copy it was drawn in before the cast
        torch.cuda.reset_peak_memory_stats()
    out = {}
    if a.child != "model":
        method = "svdiff" if a.child == "checkpointing" else a.child.removesuffix("-drop-w")
        methods = Methods(model, a.svd_cache, device, which=(method,))
        if a.child in ("svdiff-drop-w", "checkpointing"):
            fast_layer.drop_weights(model)
        model.unet.grad_checkpointing = a.child == "checkpointing"
        batch = make_batch(model, a.resolution, device)
        steps = 1 + (a.train_steps if a.child == "checkpointing" else 0)
        seconds = [timed(lambda: train_step(methods, method, batch), device) for _ in range(steps)]
        if a.child == "checkpointing":
            out["seconds"] = seconds[1:]  # the first step also makes AdamW's state and picks the kernels
    sync(device)
    print(json.dumps(out | {"peak_bytes": peak_memory(device)}))


def run_child(a, probe: str, cache: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", probe, "--device", a.device, "--arch", a.arch,
           "--resolution", str(a.resolution), "--train-steps", str(a.train_steps), "--svd-cache", str(cache)] + \
        (["--tiny"] if a.tiny else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the {probe} child process failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_memory(a, cache: Path):
    """Peak memory of each method, each in a fresh process, beside one that only builds the model."""
    return {"peak_bytes": {probe: run_child(a, probe, cache)["peak_bytes"] for probe in PROBES}}


def bench_checkpointing(a, cache: Path):
    """SVDiff trained as train.py --grad-checkpointing trains it, --train-steps steps in a fresh process: seconds
    per step and the peak memory (the figures of a long run at a large size, e.g. SDXL at 1024 px in bf16)."""
    r = run_child(a, "checkpointing", cache)
    return {"checkpointed_seconds": r["seconds"], "checkpointed_step_seconds": median(r["seconds"]),
            "checkpointed_peak_bytes": r["peak_bytes"]}


# ---------------------------------------------------------------------------------------------------------------
# Report

NAMES = {"svdiff": "SVDiff, fast path (auto)", "svdiff-drop-w": "... with drop_weights",
         "naive": "SVDiff, naive (rebuild W_δ)", "lora": "LoRA rank 4 (attention)", "full": "full fine-tune (UNet)"}


def table(r) -> str:
    gb = lambda b: f"{b / 1e9:.2f} GB"
    mb = lambda b: f"{b / 2 ** 20:.2f} MiB"  # as the paper's sizes (its KB are KiB)
    sec, peak = r.get("seconds", {}), r.get("peak_bytes", {})
    trainable = {"svdiff": r.get("shift_floats"), "naive": r.get("shift_floats"), "lora": r.get("lora_params"),
                 "full": r.get("unet_params")}
    sec = {**sec, "full": r.get("seconds_full_pair", {}).get("full", [])}
    arch = ARCH_NAMES[r["arch"]] + (" (tiny)" if r["tiny"] else "")
    lines = [f"{arch}: training step, batch 2 (1 instance + 1 prior) at {r['resolution']} px, {r['machine']}, "
             f"torch {r['torch']}; seconds: median of {r['steps']} (sampling: {3 * r['steps']}); ratios measured "
             "side by side", "",
             "| method | trainable | seconds | SVDiff fast ÷ this | peak memory | above the model alone |",
             "|---|---|---|---|---|---|"]
    for m in ("svdiff", "svdiff-drop-w", "naive", "lora", "full"):
        ratio = {"svdiff": 1.0, "naive": r.get("fast_vs_naive"), "lora": r.get("fast_vs_lora"),
                 "full": r.get("fast_vs_full")}.get(m)
        cells = [NAMES[m], f"{trainable.get(m):,}" if trainable.get(m) else "",
                 f"{median(sec[m]):.2f}" if sec.get(m) else "", f"{ratio:.2f}" if ratio else "",
                 gb(peak[m]) if m in peak else "", gb(peak[m] - peak["model"]) if m in peak else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| other | figure |", "|---|---|"]
    if "svd_seconds" in r:
        lines += [f"| SVD of UNet + text encoder(s), cold (and writing the cache) | {r['svd_seconds']:.1f} s |",
                  f"| SVD from the cache ({gb(r['svd_cache_bytes'])}, read into memory) | "
                  f"{r['svd_cached_seconds']:.1f} s |",
                  f"| SVD, ours ÷ torch.linalg.svd (float64, same run; every {SVD_SAMPLE_EVERY}th matrix: "
                  f"{r['svd_sample_matrices']} of {r['svd_matrices']}) | {r['svd_sample_seconds']['ours']:.2f} s / "
                  f"{r['svd_sample_seconds']['lapack']:.2f} s = {r['svd_vs_lapack']:.3f} |"]
    if "sampling_seconds" in r:
        s = r["sampling_seconds"]
        lines.append(f"| sampling, UNet step (batch 2): base / shifts merged by apply_shift_files | "
                     f"{median(s['base']):.3f} s / {median(s['merged']):.3f} s = {r['merged_vs_base_sampling']:.3f} |")
        lines.append(f"| applying a shift file (SVD from the cache, merge) | {r['apply_shifts_seconds']:.1f} s |")
    if "checkpointed_step_seconds" in r:
        lines.append(f"| SVDiff training as train.py --grad-checkpointing (drop_weights), "
                     f"{cli.plural(len(r['checkpointed_seconds']), 'step')}: seconds per step (median), peak memory | "
                     f"{r['checkpointed_step_seconds']:.2f} s, {gb(r['checkpointed_peak_bytes'])} |")
    if "shift_file_bytes" in r:
        lines += [f"| shift file `all`, fp32 / fp16 ({r['shift_floats']:,} floats) | {mb(r['shift_file_bytes'])} / "
                  f"{mb(r['shift_file_fp16_bytes'])} |",
                  f"| LoRA rank-4 file, fp32 / fp16 ({r['lora_params']:,} floats) | {mb(r['lora_file_bytes'])} / "
                  f"{mb(r['lora_file_fp16_bytes'])} |"]
    return "\n".join(lines)


def machine(device) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({torch.get_num_threads()} threads, " \
           f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')})"


def save_figures(a, r: dict):
    """--json after every part, not only at the end: a run stopped by a time limit (a lent GPU's) keeps what it
    measured so far."""
    if a.json:
        atomic_write(lambda p: p.write_text(json.dumps(r, indent=2)), Path(a.json))


def bench_in_process(a, parts, cache: Path, tmp: Path, r: dict):
    """The parts measured in this process, on one model: svd, files, training, sampling (added to r as they end)."""
    device = a.device
    model = build_model(a.tiny, device, torch.bfloat16 if device == "cuda" else torch.float32, a.arch)
    r["unet_params"] = sum(p.numel() for p in model.unet.parameters())
    if "svd" in parts:
        r |= bench_svd(model, cache, device, progress=not a.tiny)
        save_figures(a, r)
    methods = Methods(model, cache, device)
    batch = make_batch(model, a.resolution, device)
    if "files" in parts:
        r |= bench_files(methods, tmp)
        save_figures(a, r)
    if "training" in parts:
        r |= bench_training(methods, batch, a.steps)
        save_figures(a, r)
    if "sampling" in parts:
        r |= bench_sampling(methods, batch, a.steps, a.arch, a.tiny, tmp, cache)
        save_figures(a, r)
    methods.drop_shifts()
    if "training" in parts:
        r |= bench_full(methods, batch, a.steps, r["fast_vs_lora"])
    del methods, model
    gc.collect()
    r["bench_peak_bytes"] = peak_memory(device)  # this process's own peak, all phases
    save_figures(a, r)


def main(argv=None):
    a = parse_args(argv)
    check_args(a)
    if a.child:
        return child(a)
    device, parts = a.device, set(a.parts.split(","))
    r = {"arch": a.arch, "device": device, "machine": machine(device), "torch": torch.__version__,
         "resolution": a.resolution, "steps": a.steps, "tiny": a.tiny, "parts": sorted(parts)}
    with tempfile.TemporaryDirectory(prefix="svdiff-bench-") as tmp:
        tmp = Path(tmp)
        cache = Path(a.svd_cache) if a.svd_cache else tmp / "svd_cache.safetensors"
        if parts - set(CHILD_PARTS):
            bench_in_process(a, parts, cache, tmp, r)
        if parts & set(CHILD_PARTS) and not cache.is_file():  # --parts memory alone: the first probe would pay for
            run_child(a, "svd-cache", cache)                   # the SVD, its float64 temporaries in its peak
        if "memory" in parts:
            r |= bench_memory(a, cache)
            save_figures(a, r)
        if "checkpointing" in parts:
            r |= bench_checkpointing(a, cache)
            save_figures(a, r)
    print(table(r))
    print(json.dumps({k: r.get(k) for k in SUMMARY_KEYS} | {"arch": a.arch, "device": device,
                                                             "resolution": a.resolution}))
    return r


if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP's default busy-waiting makes 2-thread LAPACK/BLAS calls up to 100x slower as soon as another
        # process wants a core (measured here: eigh of a 320 x 320 matrix, 3.9 s instead of 0.03 s). Idle threads
        # that sleep cost little on an idle machine and keep a shared one's timings sane. It must be set before
        # torch starts OpenMP, so the script starts again with it.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    cli.run(main)
