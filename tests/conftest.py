import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # the program's flat modules: unet, vae, clip_text, ddim, sd, svdiff
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: tiny random SD models in both layouts

BPE_VOCAB = ROOT.parent / "shared" / "clip" / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture
def bpe_vocab():
    if not BPE_VOCAB.is_file():
        pytest.skip(f"the real CLIP vocabulary is not at {BPE_VOCAB}")
    return BPE_VOCAB


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
