"""The identity of a model's base weights, which shift files and the SVD cache are checked against."""
import hashlib

import svdiff
from support import checkpoint


def fingerprint(model) -> str:
    """The identity of the base weights (UNet + text encoder(s), svdiff.COMPONENTS) that shift files and the SVD cache are
    checked against.

    It must not depend on how the model was loaded — fp32, bf16 or fp16, single file or diffusers folder, CPU or
    CUDA — so that a file trained in bf16 applies to an fp16 load, yet it must change when any weight does (another
    fine-tune of the same architecture). So it is a digest of the weights AS STORED, each rounded to fp16
    (`checkpoint.tensor_digests`: published weights are fp32 or fp16 rounded from them, and both round to the same fp16
    bits), computed by sd.load while it streams the files, before the cast: a bf16 load no longer holds the fp16
    values. A model built in memory (no digests from sd.load) is digested from its weights on first use. The
    identity is fixed from then on: it names the weights that were loaded, not later edits such as a merge. (A
    checkpoint stored in bf16 is coarser than fp16, so it differs from the fp32 original of the same model.)"""
    for component in svdiff.COMPONENTS:
        root = getattr(model, component)
        if root is not None and component not in model.digests:
            digests = {}
            for name, p in root.named_parameters():
                if not name.endswith("delta"):
                    if p.is_meta:
                        raise ValueError(f"{component}.{name} was dropped before the model's fingerprint was taken")
                    digests.update(checkpoint.tensor_digests(name.replace("base.", ""), p))
            model.digests[component] = checkpoint.weights_digest(digests)
    h = "".join(f"{c}:{model.digests[c]}\n" for c in svdiff.COMPONENTS if getattr(model, c) is not None)
    return hashlib.sha256(h.encode()).hexdigest()[:16]
