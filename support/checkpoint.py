"""Weight files: tensors read one at a time from .safetensors / .ckpt / .bin (never unpickling code), and the
identity of the weights they store (svdiff.fingerprint's digests), which must not depend on how they are loaded.
"""
import hashlib
import json
import pickle
import re
import struct
from pathlib import Path

import torch


# ---------------------------------------------------------------------------------------------------------------
# The identity of the weights (svdiff.fingerprint): digests of the weights as stored, rounded to fp16


def tensor_digests(module_key: str, t: torch.Tensor) -> dict[str, str]:
    """{name: SHA-256} of one weight, rounded to fp16 (round to nearest even, as `.half()` does). Published SD weights
    are fp32, or fp16 rounded from them the same way, and fp16(fp16(x)) = fp16(x): both files digest alike, while a
    change of any weight by more than fp16's rounding changes the digest. A fused q/k/v projection (OpenCLIP's
    `attn.in_proj`) is digested as its three row blocks under the q_proj/k_proj/v_proj names that a diffusers folder
    stores them under, so the two layouts agree; so is SDXL bigG's projection, a Linear weight [proj, width] in a
    folder (`text_projection.weight`), digested as the file's [width, proj] matrix."""
    if module_key == "text_projection.weight":
        return tensor_digests("text_projection", t.T)
    if ".attn.in_proj." in module_key:
        return {k: v for name, part in zip("qkv", t.chunk(3)) for k, v in
                tensor_digests(module_key.replace(".in_proj.", f".{name}_proj."), part).items()}
    half = t.detach().to("cpu", torch.float16 if t.is_floating_point() else t.dtype).contiguous()
    return {module_key: hashlib.sha256(half.reshape(-1).view(torch.uint8).numpy()).hexdigest()}


def weights_digest(digests: dict[str, str]) -> str:
    """One component's digest from its tensors' (in name order, so the file's tensor order does not matter)."""
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Reading tensors, one at a time


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: file is empty or truncated, not a .safetensors checkpoint; download it again")
        n = int.from_bytes(head, "little")
        if n > 100_000_000 or n > path.stat().st_size - 8:
            raise ValueError(f"{path}: corrupt .safetensors header; download the file again")
        try:
            header = json.loads(f.read(n))
            # JSON of the wrong shape (not a dict of {dtype, shape, data_offsets}) is as corrupt as broken JSON
            end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
            [tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, AttributeError, TypeError, KeyError, IndexError):
            raise ValueError(f"{path}: corrupt .safetensors header; download the file again") from None
    if 8 + n + end > path.stat().st_size:
        raise ValueError(f"{path}: file is truncated ({path.stat().st_size} bytes, needs {8 + n + end}); "
                         "download it again")
    return header


def _torch_load(path: Path) -> dict:
    # weights_only=True: a .ckpt/.bin is a pickle, and unpickling arbitrary code from a download is not safe.
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialization cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any object but tensors, containers, numbers and strings (a damaged pickle may
        # also land here); torch's message is a page long, its reason one line
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(\. Please|$)", str(e), re.M)
        raise ValueError(f"{path}: refused: it holds objects other than tensors, which only unpickling (running "
                         f"code from the file) would load ({reason.group(1) if reason else 'not a weights file'}); "
                         "use the .safetensors version of the model") from None
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, AssertionError, struct.error) as e:
        # what torch.load raises for truncated or damaged files (zip reader, legacy reader, unpickler)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({reason}); is it truncated? Download "
                         "it again, or use the .safetensors version") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # .ckpt: {"state_dict": ..., "global_step"}
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds no state dict")
    return sd


class TensorFile:
    """Key -> shape without reading data, and tensors streamed one at a time, for .safetensors/.ckpt/.bin."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.suffix == ".safetensors":
            header = _safetensors_header(self.path)
            self.metadata = header.pop("__metadata__", None) or {}
            self.shapes = {k: tuple(v["shape"]) for k, v in header.items()}
            self._sd = None
        elif self.path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
            self._sd = _torch_load(self.path)
            self.metadata = {}
            self.shapes = {k: tuple(v.shape) for k, v in self._sd.items() if isinstance(v, torch.Tensor)}
        else:
            raise ValueError(f"{self.path}: unknown file type {self.path.suffix!r}; expected .safetensors, .ckpt, .bin, .pt or .pth")

    def tensors(self, keys):
        """Yield (key, tensor) for the given keys. safetensors are read with pread where the library has it, so
        the pages of a memory map do not add the file's size to the process's resident memory."""
        if self._sd is not None:
            yield from ((k, self._sd[k]) for k in keys)
            return
        from safetensors import safe_open
        try:
            f = safe_open(self.path, framework="pt", backend="pread")
        except TypeError:  # safetensors < 0.8 has only the mmap backend
            f = safe_open(self.path, framework="pt")
        try:
            with f:
                for k in keys:
                    yield k, f.get_tensor(k)
        except Exception as e:
            if isinstance(e, ValueError) and str(e).startswith(str(self.path)):
                raise
            raise ValueError(f"{self.path}: tensor data cannot be read ({e}); the file is corrupt, "
                             "download it again") from None
