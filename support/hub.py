"""Hugging Face Hub ids: "owner/name[@revision]" -> a diffusers folder in the Hub cache that diffusers and
transformers share, fetched with huggingface_hub (imported only when an id is resolved) — and the one rule for
which weight files of a diffusers folder are read, used for local folders and for downloads alike.

The cache comes first, with no network request; a download fetches only what sd.load reads. Errors are one line.
"""
import json
import re
from pathlib import Path

# What train.py and edit.py run on when neither --model nor $SVDIFF_MODEL names a model
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# ---------------------------------------------------------------------------------------------------------------
# The weight files of a diffusers component


# File names without extension (transformers calls its safetensors model.safetensors but its pickles
# pytorch_model.bin)
WEIGHT_STEMS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                "text_encoder": ("model", "pytorch_model"), "text_encoder_2": ("model", "pytorch_model")}


def weight_names(stems: tuple[str, ...], half: bool) -> list[tuple[str, str]]:
    """(single file, shard index) names of one component's weights, most wanted first: safetensors before .bin (a
    pickle); for a half-precision load the fp16 variant first (half the bytes), else the fp32 file.
    save_pretrained(max_shard_size=...) writes {stem}{variant}-00001-of-0000N.{ext} and {stem}.{ext}.index{variant}.json."""
    variants = (".fp16", "") if half else ("", ".fp16")
    return [(f"{stem}{v}.{ext}", f"{stem}.{ext}.index{v}.json")
            for ext in ("safetensors", "bin") for v in variants for stem in stems]


def pick_weights(names: set[str], stems: tuple[str, ...], half: bool) -> str | None:
    """The one weight file (or shard index) of a component to read, from the names its folder holds."""
    for single, index in weight_names(stems, half):
        for candidate in (single, index):
            if candidate in names:
                return candidate
    return None


def weights_file(folder: Path, stems: tuple[str, ...], half: bool = False) -> list[Path]:
    """The weight file(s) of one diffusers component, chosen by `pick_weights`: one file, or the shards its
    index lists."""
    name = pick_weights({p.name for p in folder.iterdir()} if folder.is_dir() else set(), stems, half)
    if name is None:
        raise ValueError(f"{folder}: no weights file ({stems[0]}.safetensors or .bin); the diffusers folder is "
                         "incomplete")
    return _shards(folder / name) if name.endswith(".json") else [folder / name]


def _shards(index: Path) -> list[Path]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{index}: not a valid shard index (a JSON object with a weight_map); the diffusers "
                         "folder is corrupt") from None
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise ValueError(f"{index}: lists {len(missing)} shard(s) that are not there (e.g. {missing[0]}); the "
                         "download is incomplete")
    return [index.parent / n for n in names]


# ---------------------------------------------------------------------------------------------------------------
# Hub ids


NEEDED = ("tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json")  # besides the weights
NEEDED_SDXL = ("tokenizer_2/vocab.json", "tokenizer_2/merges.txt")  # and text_encoder_2/'s weights
REPO_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # the Hub's owner/name: letters, digits, - _ .


def split_repo_id(spec: str) -> tuple[str, str | None] | None:
    """"owner/name[@revision]" -> (repo id, revision or None), or None when `spec` cannot be a Hub id (a path
    with more parts, a checkpoint file name)."""
    repo_id, at, revision = spec.partition("@")
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or (at and not revision) or \
            repo_id.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth")):
        return None
    return repo_id, revision or None


def _is_sdxl(files) -> bool:
    """An SDXL pipeline has a second text encoder and tokenizer (sd.load reads the same from a folder)."""
    return any(f.startswith(("text_encoder_2/", "tokenizer_2/")) for f in files)


def _weight_components(files) -> list[str]:
    """The components whose weights `load` reads: SD 1.x/2.x's three, SDXL's four."""
    return [c for c in WEIGHT_STEMS if c != "text_encoder_2" or _is_sdxl(files)]


def _hub_files(files, half: bool) -> list[str] | None:
    """What `load` reads of a diffusers repo, given its file list, as snapshot_download's allow_patterns; None
    when the repo lacks a part. Never the safety checker, the feature extractor, the single-file checkpoints
    some repos keep at their root (4-8 GB of them in SD1.5's, 7-14 GB in SDXL's), nor SDXL's other VAE copies
    (vae_1_0/, vae_encoder/, vae_decoder/) or ONNX/OpenVINO exports."""
    files = set(files)
    sdxl = _is_sdxl(files)
    if not all(f in files for f in NEEDED + (NEEDED_SDXL if sdxl else ())):
        return None
    patterns = ["model_index.json", "tokenizer/*", "scheduler/*"] + (["tokenizer_2/*"] if sdxl else [])
    for component in _weight_components(files):
        stems = WEIGHT_STEMS[component]
        names = {f.split("/", 1)[1] for f in files if f.startswith(component + "/") and f.count("/") == 1}
        name = pick_weights(names, stems, half)
        if "config.json" not in names or name is None:
            return None
        patterns += [f"{component}/config.json", f"{component}/{name}"]
        if name.endswith(".json"):  # the index {stem}.{ext}.index{variant}.json: shards {stem}{variant}-*-of-*.{ext}
            stem, ext, index = name.removesuffix(".json").split(".", 2)
            patterns.append(f"{component}/{stem}{index.removeprefix('index')}-*-of-*.{ext}")
    return patterns


def _complete(folder: Path, half: bool) -> bool:
    """Does a cached snapshot hold everything `load` reads (in either precision)? The cache shows a file only
    once it is fully downloaded, so this is a check for missing files, not for partial ones."""
    listing = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    try:
        return _hub_files(listing, half) is not None and all(
            f.is_file() for c in _weight_components(listing) for f in weights_file(folder / c, WEIGHT_STEMS[c], half))
    except (ValueError, KeyError, OSError):  # an unreadable shard index
        return False


def _foreign_repo(files) -> str | None:
    """What a repo is, from its file list, when it is plainly not an SD 1.x/2.x/XL diffusers pipeline (checked
    before any download: such a repo may hold gigabytes that load would refuse)."""
    files = set(files)
    top = {f.split("/")[0] for f in files if "/" in f}
    singles = sorted(f for f in files if "/" not in f and f.endswith((".safetensors", ".ckpt")))
    if "text_encoder_2" in top and "text_encoder" not in top:
        return "an SDXL refiner (image to image on bigG alone; only the SDXL base model is supported)"
    if "transformer" in top:
        return "a transformer pipeline (SD3, Flux, PixArt, ...), not an SD 1.x/2.x/XL UNet pipeline"
    if "unet/config.json" in files:  # a pipeline, whatever else it keeps (SDXL base: an offset-noise LoRA example)
        return None
    if "adapter_config.json" in files or any("lora" in f.lower() and f.endswith((".safetensors", ".bin"))
                                             for f in files):
        return "a LoRA, not a base model; pass the base model it was trained on"
    if "unet" in top:
        return None
    if "config.json" in files and any(f.startswith("diffusion_pytorch_model") for f in files):
        return "a single diffusers model (a ControlNet, a UNet or a VAE alone), not a whole pipeline"
    if singles:
        return f"a repo of single-file checkpoints ({', '.join(singles[:3])}): download one and pass its path"
    return "no diffusers pipeline (no unet/ folder)"


def _hub_error(spec: str, e: Exception, downloading: bool, local: str = "a local single file or diffusers folder",
               example: str = DEFAULT_MODEL) -> str | None:
    """One line for an error met on the way to the Hub (None for one that is not about the Hub); `local` is what
    may be passed instead of a Hub id, `example` a valid id of the kind wanted."""
    from huggingface_hub import constants, errors
    repo_id = spec.partition("@")[0]
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    hub = f"the Hub ({constants.ENDPOINT})"
    cache = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    local = f"or pass {local}"
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    network = type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3") or \
        isinstance(e, (errors.LocalEntryNotFoundError, ConnectionError, TimeoutError))
    if isinstance(e, errors.GatedRepoError) or \
            (status in (401, 403) and not isinstance(e, errors.RepositoryNotFoundError)):
        return (f"{spec}: {hub} refused access (HTTP {status}): the model is gated or private; accept the licence on "
                f"its page ({constants.ENDPOINT}/{repo_id}) and set HF_TOKEN to a token of that account")
    if isinstance(e, errors.RepositoryNotFoundError):
        private = "; if it is private or gated, set HF_TOKEN" if status == 401 else ""
        return (f"{spec}: no such file or folder, and {hub} has no model repo of that name (HTTP {status}){private}; "
                f"check the id, e.g. {example}")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{spec}: the repo has no revision {spec.partition('@')[2]!r}; name a branch, tag or commit of it"
    if isinstance(e, errors.OfflineModeIsEnabled) or (network and constants.HF_HUB_OFFLINE):
        return f"{spec} is not in {cache} and HF_HUB_OFFLINE is set: unset it to download the model, {local}"
    if isinstance(e, errors.HfHubHTTPError):
        return f"{spec}: {hub} answered HTTP {status} ({detail}); try again later, set HF_ENDPOINT to a mirror, {local}"
    if downloading and (network or isinstance(e, OSError)):
        return (f"{spec}: the download stopped ({type(e).__name__}: {detail}); no partial file is kept or loaded: "
                "run the command again to fetch the rest")
    if network:
        return (f"{spec} is not in {cache} and {hub} cannot be reached ({type(e).__name__}: {detail}); connect to "
                f"the network (or set HF_ENDPOINT to a mirror) and run again, {local}")
    return None


def _on_hub(spec: str, call, downloading: bool, **wording):
    """`call()`, with an error met on the way to the Hub turned into one line (ValueError, `_hub_error`'s)."""
    try:
        return call()
    except Exception as e:
        message = _hub_error(spec, e, downloading, **wording)
        if message is None:
            raise
        raise ValueError(message) from None


def _is_config(pattern: str) -> bool:
    return pattern == "model_index.json" or pattern.endswith("/config.json")


def resolve_model(spec: str, half: bool = False, configs_only: bool = False) -> tuple[Path, str]:
    """A Hub id "owner/name[@revision]" -> (its diffusers folder in the Hugging Face cache, "owner/name@commit").

    The cache comes first: a model already there (fetched by us, by diffusers or by transformers) loads with no
    network request at all. Else huggingface_hub (imported only here) downloads what `load` reads, `_hub_files`:
    the fp16 variant for a half-precision load (`half`) where the repo has one, else the fp32 files, with its progress
    bars, its cache layout and its environment (HF_HOME / HF_HUB_CACHE, HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE).
    A file enters the cache only once complete, so a cut-off download is never read; the next run fetches the rest.
    `configs_only`: model_index.json and the components' config.json alone (kilobytes: what `loading.peek_family`
    reads), after the same checks of the repo; the later full resolve finds them in the cache, not fetching them
    again."""
    ids = split_repo_id(spec)
    if ids is None:
        raise FileNotFoundError(f"{spec}: no such file or folder, and not a Hugging Face Hub id (owner/name"
                                "[@revision]); pass an SD checkpoint (.safetensors/.ckpt), a diffusers folder or a "
                                f"Hub id such as {DEFAULT_MODEL}")
    repo_id, revision = ids
    try:
        import huggingface_hub as hf
    except ImportError:
        raise ValueError(f"{spec}: no such file or folder; to load it from the Hugging Face Hub, "
                         "pip install huggingface_hub") from None
    cached = hf.try_to_load_from_cache(repo_id, "unet/config.json", revision=revision)
    if isinstance(cached, str):
        folder = Path(cached).parents[1]
        if _complete(folder, half) or (configs_only and (folder / "text_encoder" / "config.json").is_file()):
            return folder, f"{repo_id}@{folder.name}"
    info = _on_hub(spec, lambda: hf.HfApi().model_info(repo_id, revision=revision), downloading=False)
    files = [s.rfilename for s in info.siblings or []]
    what = _foreign_repo(files)
    patterns = None if what else _hub_files(files, half)
    if patterns is None:
        what = what or f"an incomplete diffusers repo (it needs {', '.join(NEEDED)} and config.json + weights in " \
                       f"{', '.join(_weight_components(files))}" + \
                       (f"; SDXL also {', '.join(NEEDED_SDXL)})" if _is_sdxl(files) else ")")
        raise ValueError(f"{spec}: not an SD 1.x/2.x/XL diffusers repo: it looks like {what}")
    if configs_only:
        patterns = [p for p in patterns if _is_config(p)]
    folder = Path(_on_hub(spec, lambda: hf.snapshot_download(repo_id, revision=revision, allow_patterns=patterns),
                          downloading=True))
    return folder, f"{repo_id}@{folder.name}"


# ---------------------------------------------------------------------------------------------------------------
# Any transformers model repo (the evaluation's CLIP and DINO)


def _repo_patterns(names, files: tuple[str, ...], stems: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(allow_patterns for snapshot_download, what the repo lacks) for `files` and, where `stems` are given, the one
    set of weights `pick_weights` chooses among the repo's root files (a shard index brings its shards)."""
    names = set(names)
    patterns, missing = [f for f in files if f in names], [f for f in files if f not in names]
    if stems:
        name = pick_weights({n for n in names if "/" not in n}, stems, half=False)
        if name is None:
            missing.append(f"{stems[0]}.safetensors or {stems[-1]}.bin")
        else:
            patterns.append(name)
            if name.endswith(".json"):  # {stem}.{ext}.index{variant}.json: shards {stem}{variant}-*-of-*.{ext}
                stem, ext, index = name.removesuffix(".json").split(".", 2)
                patterns.append(f"{stem}{index.removeprefix('index')}-*-of-*.{ext}")
    return patterns, missing


def _has_repo_files(folder: Path, files: tuple[str, ...], stems: tuple[str, ...]) -> bool:
    try:
        return all((folder / f).is_file() for f in files) and \
            (not stems or all(p.is_file() for p in weights_file(folder, stems)))
    except (ValueError, OSError):  # no weights yet, or an unreadable shard index
        return False


def resolve_repo(spec: str, files: tuple[str, ...], stems: tuple[str, ...] = (), *, what: str, example: str,
                 local: str = "a local model folder") -> tuple[Path, str]:
    """A Hub id "owner/name[@revision]" of a transformers model repo -> (its snapshot folder in the Hugging Face
    cache, "owner/name@commit"), holding `files` (names at the repo's root) and, when `stems` are given (e.g.
    ("model", "pytorch_model")), one set of weights as `pick_weights` chooses it: safetensors before a .bin, a shard
    index with its shards. Nothing else of the repo is fetched (not its TF/Flax/ONNX copies, nor a .bin beside a
    .safetensors). For the messages: `what` is the kind of repo wanted, `example` an id of that kind, `local` what
    may be passed instead.

    As `resolve_model`: the cache first, with no request; else huggingface_hub (imported only here) fetches those
    files; errors are one line (ValueError). A repo that lacks one of them is refused before anything is fetched.
    Call it once for the configs, judge them, then again with the returned "owner/name@commit" and the weights:
    nothing heavy is fetched for a repo of the wrong kind, and both calls read the same commit."""
    ids = split_repo_id(spec)
    if ids is None:
        raise ValueError(f"{spec}: no such folder, and not a Hugging Face Hub id (owner/name[@revision]); pass "
                         f"{local} or the Hub id of {what}, e.g. {example}")
    repo_id, revision = ids
    try:
        import huggingface_hub as hf
    except ImportError:
        raise ValueError(f"{spec}: no such folder; to load it from the Hugging Face Hub, pip install "
                         "huggingface_hub") from None
    cached = hf.try_to_load_from_cache(repo_id, files[0], revision=revision)
    if isinstance(cached, str):
        folder = Path(cached).parents[files[0].count("/")]
        if _has_repo_files(folder, files, stems):
            return folder, f"{repo_id}@{folder.name}"
    wording = dict(local=local, example=example)
    info = _on_hub(spec, lambda: hf.HfApi().model_info(repo_id, revision=revision), downloading=False, **wording)
    names = [s.rfilename for s in info.siblings or []]
    patterns, missing = _repo_patterns(names, files, stems)
    if missing:
        raise ValueError(f"{spec}: not {what}: the repo has no {', '.join(missing)} at its root")
    folder = Path(_on_hub(spec, lambda: hf.snapshot_download(repo_id, revision=revision, allow_patterns=patterns),
                          downloading=True, **wording))
    return folder, f"{repo_id}@{folder.name}"
