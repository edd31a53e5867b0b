import os
import sys
from pathlib import Path

# OpenMP's default busy-waiting made LAPACK calls (the SVDs) 10-100x slower on a machine shared with other jobs
# (docs/performance.md; bench.py sets the same); it must be set before torch loads its OpenMP runtime. Subprocesses
# (the scripts run as commands) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # the program's flat modules: unet, vae, clip_text, ddim, sd, svdiff
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: tiny random SD models in both layouts

BPE_VOCAB = ROOT / "bpe_simple_vocab_16e6.txt.gz"  # shipped with the project (clip_text.BPE_VOCAB)
PHOTOS = ROOT / "tests" / "photos"  # three real DreamBooth photos of different sizes (tests/photos/README.md)


def missing_fixture(reason):
    """Skip where a developer lacks a fixture file; fail under CI=true, where a skip would pass unseen."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason} (CI=true: a missing fixture fails the run)")
    pytest.skip(reason)


def require_bpe_vocab():
    if not BPE_VOCAB.is_file():
        missing_fixture(f"the real CLIP vocabulary is not at {BPE_VOCAB}")
    return BPE_VOCAB


@pytest.fixture
def bpe_vocab():
    return require_bpe_vocab()


def tiny_model_folder(tmp_path_factory, name, family="sd1"):
    """A fresh folder holding a tiny random diffusers model in model/ (module-scoped fixtures share one)."""
    import tiny
    root = tmp_path_factory.mktemp(name)
    tiny.write_folder(root / "model", family, require_bpe_vocab())
    return root


def photo(rng, shape, box, colour):
    """A synthetic "photo": dim noise of `shape` (h, w, 3) with a bright square at `box` (rows, cols slices)."""
    import numpy as np
    a = (rng.random(shape) * 60).astype(np.uint8)
    a[box] = colour
    return a


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


def load_with_shifts(model_path, shift_file=None, force=False, **load_args):
    """A model from `model_path` (sd.load's `load_args`: device, dtype, vocab), with the (unmerged) shifts of
    `shift_file` when one is given (`force`: also when trained on weights loaded in another precision)."""
    import sd
    from support import fast_layer, shift_files
    model = sd.load(model_path, **load_args)
    if shift_file:
        tensors, _ = shift_files.read_shift_file(shift_file)
        names = shift_files.names_by_key(model)
        fast_layer.add_spectral_shifts(model, names={names[k] for k in tensors}, progress=False)
        shift_files.load_shift_file(model, shift_file, force=force)
    return model


def random_deltas_(model, seed: int):
    """Fill every δ of `model` with random shifts of a trained run's size: N(0, mean σ) on a matrix's singular
    values, N(0, 0.05) on a norm's γ."""
    import svdiff
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in svdiff.shifts(model):
            m.delta.copy_(torch.randn(m.delta.shape, generator=g) * (0.05 if m.kind == "norm" else m.sigma.mean()))


def load_peak_rss(path, components, dtype="float32") -> int:
    """Bytes of peak RSS that `sd.load(path, components=..., dtype=torch.<dtype>)` adds to a bare Python with torch
    and sd imported, each measured in a fresh process so that the test process's own memory does not count. The
    peak is VmHWM, which belongs to the process's own memory map: getrusage's ru_maxrss would carry over the peak of
    the test process the child was forked from (Linux keeps it across exec), so a big test process hid the load."""
    import subprocess
    root = str(Path(__file__).resolve().parents[1])
    base = f"import sys, torch; sys.path.insert(0, {root!r}); import sd; "
    rss = "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    probe = base + f"m = sd.load({str(path)!r}, components={tuple(components)!r}, dtype=torch.{dtype}); " + rss
    peak = int(subprocess.check_output([sys.executable, "-c", probe]).split()[-1])
    idle = int(subprocess.check_output([sys.executable, "-c", base + rss]).split()[-1])
    return peak - idle
