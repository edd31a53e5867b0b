"""The machinery under the reading path (svdiff.py, train.py, edit.py): speed, memory, file formats, the Hub and
compatibility, one idea per file. Nothing here imports the commands or sd.py.

    fast_svd.py       the SVD of Eq. 1, faster than LAPACK's (svdiff.svd is the readable one)
    fast_layer.py     SpectralShift's cheaper path per call, and the W it never reads freed (the scripts' layer)
    svd_cache.py      the SVD of a base model kept in a file (--svd-cache)
    fingerprint.py    the identity of the base weights, which shift files and the SVD cache are checked against
    shift_files.py    shift files: writing, reading, checking, combining (Eq. 4-5), style mixing
    svdiff_pytorch.py the other public implementation's shift files, applied as it computes them, or converted
    apply_shifts.py   shift files applied to a model for sampling (sample.py, edit.py, the exports)
    exports.py        a LoRA (kohya's names) or a merged checkpoint, for every other SD tool
    loading.py        the two layouts SD weights come in (single file, diffusers folder), read into our modules
    checkpoint.py     tensors read one at a time from .safetensors / .ckpt / .bin; the digests of the weights
    hub.py            Hugging Face Hub ids: only the files a run reads, from the cache when it has them
    hf_folder.py      a transformers model folder (local or from the Hub) read into our modules, configs judged first
    image_processing.py  images -> pixel values as a preprocessor_config.json says (CLIP's, ViT's processors)
    clip_image.py     CLIP's image and text features (CLIP-I, CLIP-T), as CLIPModel.get_*_features
    dino.py           DINO ViT-S/16's [CLS] features (DreamBooth's DINO score), as ViTModel
    dreambench.py     DreamBench's 25 object and 25 live-subject prompts (eval.py)
    photos.py         the training photos and class images as tensors (any format, EXIF, crops); the class cache
    latents.py        the training examples' latents: the VAE once, a posterior draw per step, SDXL's crop sizes
    run_folder.py     a run's folder: config.json for --resume, the saved step, log.jsonl, Ctrl-C
    train_args.py     train.py's flags, their checks and the defaults that depend on the model
    edit_args.py      edit.py's flags and their checks
    sheet.py          the comparison sheet: images in rows, captions under them
    cli.py            what the commands share: --help, device and --out checks, counts, the error line
    files.py          writing a file whole or not at all
"""
