"""A transformers model folder (config.json, preprocessor_config.json, model.safetensors or pytorch_model.bin),
local or from the Hub, read into our own modules: what the evaluation's models (clip_image.py, dino.py) share.

The configs are judged before any weight is read or fetched, so a repo of the wrong kind is one line, not a
download; the weights are then read one tensor at a time (checkpoint.TensorFile: never unpickling code) into
modules built on `meta`, every tensor of the module from the file with its exact shape.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn

from support import checkpoint, hub

CONFIG_FILES = ("config.json", "preprocessor_config.json")
WEIGHT_STEMS = ("model", "pytorch_model")  # transformers' names: model.safetensors, pytorch_model.bin (or shards)


def read_json(folder: Path, name: str) -> dict:
    path = Path(folder) / name
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder}: no {name}; a model folder holds config.json, preprocessor_config.json and the "
                         "weights (model.safetensors or pytorch_model.bin)") from None
    except ValueError:
        raise ValueError(f"{path}: not valid JSON") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    return cfg


def locate(spec: str, check, what: str, example: str):
    """`spec`, a local folder or a Hub id -> (folder, where it came from: the folder's path or "owner/name@commit",
    what `check(folder)` returned). `check` reads the configs and raises ValueError for a model of the wrong kind:
    for a Hub id it runs on the fetched configs alone, before the weights are fetched."""
    path = Path(spec)
    if path.is_dir():
        return path, str(path.resolve()), check(path)
    if path.exists():
        raise ValueError(f"{spec}: a file; pass the folder of {what} (config.json, preprocessor_config.json, "
                         f"weights) or its Hub id, e.g. {example}")
    folder, source = hub.resolve_repo(spec, CONFIG_FILES, what=what, example=example)
    checked = check(folder)
    # the same commit again ("owner/name@commit"), now with the weights: the cache already holds the configs
    folder, source = hub.resolve_repo(source, CONFIG_FILES, WEIGHT_STEMS, what=what, example=example)
    return folder, source, checked


def read_weights(folder: Path, route, device, dtype) -> dict[str, dict[str, torch.Tensor]]:
    """The folder's weights (one file, or the shards of an index; safetensors before .bin), routed by
    `route(key)` -> (part, module key), or None for a tensor deliberately left out; `route` raises ValueError for
    a key it does not know, before any tensor data is read. Floating tensors are cast to `dtype` on `device`."""
    names = {p.name for p in Path(folder).iterdir()}
    if hub.pick_weights(names, WEIGHT_STEMS, half=False) is None:
        raise ValueError(f"{folder}: no weights (model.safetensors or pytorch_model.bin)")
    parts = {}
    for file in hub.weights_file(Path(folder), WEIGHT_STEMS):
        tf = checkpoint.TensorFile(file)
        try:
            routes = {k: r for k in tf.shapes if (r := route(k)) is not None}
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        for k, t in tf.tensors(list(routes)):
            part, key = routes[k]
            parts.setdefault(part, {})[key] = t.to(device, dtype if t.is_floating_point() else t.dtype)
    return parts


def build(module_fn, state: dict, name: str, where) -> nn.Module:
    """`module_fn()` built on `meta` (no memory) and given the tensors of `state` as its own: every key used,
    every shape exact, or one line naming the first differences."""
    with torch.device("meta"):
        module = module_fn()
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: the {name} weights do not match its config.json: {len(missing)} missing (e.g. "
                         f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for k, t in expected.items():
        if state[k].shape != t.shape:
            raise ValueError(f"{where}: {name} tensor {k} has shape {tuple(state[k].shape)}, but its config.json "
                             f"makes it {tuple(t.shape)}")
    module.load_state_dict(state, strict=True, assign=True)
    return module.requires_grad_(False).eval()
