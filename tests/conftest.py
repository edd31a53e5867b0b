import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # the program's flat modules: unet, vae, clip_text, ddim, sd, svdiff
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: tiny random SD models in both layouts

BPE_VOCAB = ROOT / "bpe_simple_vocab_16e6.txt.gz"  # shipped with the project (clip_text.BPE_VOCAB)


def require_bpe_vocab():
    if not BPE_VOCAB.is_file():
        pytest.skip(f"the real CLIP vocabulary is not at {BPE_VOCAB}")
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
def _seed_and_threads():
    torch.manual_seed(0)


def load_with_shifts(model_path, shift_file=None):
    """A model from `model_path`, with the (unmerged) shifts of `shift_file` when one is given."""
    import sd
    import shifts
    import svdiff
    model = sd.load(model_path)
    if shift_file:
        tensors, _ = shifts.read_shift_file(shift_file)
        svdiff.add_spectral_shifts(model, keys=set(tensors), progress=False)
        shifts.load_shift_file(model, shift_file)
    return model
