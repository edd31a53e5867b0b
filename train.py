"""Personalize Stable Diffusion with spectral shifts (SVDiff, Han et al. 2023).

    python train.py --images ./dog --token sks      # base model: --model, $SVDIFF_MODEL or SD1.5 from the Hub
    python train.py --images ./dog --token sks --model stabilityai/stable-diffusion-xl-base-1.0    # SDXL, 1024 px
    python train.py --resume runs/sks               # continue a run (Ctrl-C stops one, saving its last step)

Only δ, the shifts of the singular values of every weight matrix (and of every norm's γ), is trained (svdiff.py);
the result is a ~1.6 MB `shifts.safetensors` (SDXL: 6 MB). The loss is Eq. 3: the diffusion loss on the subject's
images plus λ times the same loss on images of its class that the base model generated (prior preservation). With
several subjects, some examples are Cut-Mix collages of two, with the Unmix loss on their cross-attention (§3.3).

Outputs in --out (default runs/{token}): shifts.safetensors (every --save-every steps and at the end), resume.pt,
samples/step_XXXXX.png, config.json (the settings), log.jsonl (one line per step). Flags, their checks and --resume
are support/train_args.py's; the run folder's files support/run_folder.py's.
"""
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import ddim
import sd
import svdiff
from support import cli, fast_layer, latents, photos, run_folder, train_args
from support.fingerprint import fingerprint


@dataclass
class Settings:
    """A run's settings: each is a flag of the same name (--class-word for class_word); None: decided from the
    others or from the base model (support/train_args.py)."""
    # what to learn: each subject's photos, the rare word that will name it, and its class
    images: list = None          # a folder of the subject's photos (3-5 is typical), or one image; one per subject
    token: list = None           # e.g. sks: a rare word, so that it carries no meaning to unlearn
    class_word: list = None      # e.g. dog (default: the folder's name)
    instance_prompt: str = "a photo of {token} {class}"  # DreamBooth's prompts (a .txt beside a photo overrides)
    class_prompt: str = "a photo of a {class}"
    no_captions: bool = False
    model: str = None            # the base model (default: $SVDIFF_MODEL, else SD1.5 from the Hub)
    vocab: str = None
    # the paper's hyper-parameters (§4 and the authors' notes)
    steps: int = 500             # the paper trains 500-1000 steps and keeps the best
    batch_size: int = 1          # subject images a step, and as many class images
    lr: float = 1e-3             # AdamW on the matrices' δ
    lr_1d: float = 1e-6          # ... and on the norms' γ shifts, which move activations directly: far smaller
    subset: str = "all"          # every weight of the UNet and text encoder(s): the paper's 1.7 MB set
    rank: int = None             # shift only the k largest singular values (default: all)
    resolution: int = None       # the base model's: 512, SDXL 1024
    flip: bool = False
    seed: int = 0
    # Eq. 3: prior preservation
    prior_weight: float = 1.0    # λ
    no_prior: bool = False
    num_class_images: int = 200  # generated once by the base model, as DreamBooth's
    class_dir: str = None        # where they are kept (default: {out}/class_images)
    class_steps: int = 50        # their DDIM steps
    # §3.3 Cut-Mix-Unmix, with several subjects
    cutmix_prob: float = 0.6     # the paper's chance that an example is a collage of two
    cutmix_prompt: str = "a photo of a {left} on the left and a {right} on the right"
    # squared attention probabilities are ~1e-4: 1000 is the largest weight that cost the diffusion loss nothing
    # measurable in our tiny-model experiment (docs/usage.md, "Why --unmix-weight 1000")
    unmix_weight: float = 1000.0
    # hardware
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = None            # CUDA autocast: bf16 where supported, else fp16 (with loss scaling); CPU fp32
    grad_checkpointing: bool = None  # less memory for one more UNet forward a step (default: SDXL only)
    svd_cache: str = None        # a file that keeps the SVD of the base weights for the next run
    # outputs
    out: str = None              # default runs/{token}
    save_every: int = 100
    keep_every: int = 0          # also keep step-NNNNN.safetensors every N steps, for eval.py to compare (0: none)
    half: bool = False           # the shift file in fp16
    sample_every: int = 100      # sample grids (0: none)
    sample_prompt: str = None
    sample_steps: int = 50
    resume: object = None        # True, or the run's folder
    overwrite: bool = False
    given: set = field(default_factory=set)  # the flags typed (--resume keeps the run's values of the others)


def main(argv=None):
    a = train_args.resolve(train_args.parse(argv, Settings()))  # every check before anything is loaded
    try:
        train(a)
    except run_folder.Interrupted as e:
        print(run_folder.interrupted_line(e, a), file=sys.stderr)
        sys.exit(130)
    print(f"done: {Path(a.out) / 'shifts.safetensors'}")


def train(a: Settings, instances=None):
    """Train δ on resolved settings (train_args.resolve); returns the model with its shifts, not merged.
    `instances`: the subjects' photos as photos.load_image_folder returns them, if the caller has them."""
    out, cuda = Path(a.out), a.device.startswith("cuda")
    autocast_dtype = train_args.weight_dtype(a) if cuda else None  # the CPU computes in fp32
    instances = instances or [photos.load_image_folder(Path(p), a.resolution) for p in a.images]
    # the frozen weights in the autocast dtype (half the memory); δ and AdamW stay fp32
    model = sd.load(a.model, device=a.device, dtype=train_args.weight_dtype(a), vocab=a.vocab)
    for token in a.token or []:
        train_args.common_word_warning(model.tokenizer, token)
    torch.manual_seed(a.seed)
    gen = torch.Generator("cpu").manual_seed(a.seed)  # every random draw of training, saved in resume.pt

    # The prompts: each photo's caption or the instance prompt; each class's; each collage's, with where each
    # subject's token sits in it (found now: a prompt that cannot work is refused before anything is written)
    tokens = a.token or [None] * len(a.images)
    instance_prompts = [[(None if a.no_captions else caption) or a.instance_prompt.format(token=t, **{"class": c})
                         for caption in captions] for (_, captions, _), t, c in zip(instances, tokens, a.class_word)]
    class_prompts = [a.class_prompt.format(**{"class": c}) for c in a.class_word]
    collages = {}
    for left, right in itertools.permutations(range(len(a.images)), 2) if a.cutmix_prob > 0 else []:
        prompt, class_prompt = cutmix_prompts(a, left, right)
        positions = [(svdiff.token_positions(model.tokenizer, prompt, a.token[i]), side)  # (SDXL: both tokenizers')
                     for i, side in ((left, "left"), (right, "right"))]
        collages[left, right] = prompt, class_prompt, positions

    # The prior: class images from the base model, generated once (kept in --class-dir)
    class_images = []
    if a.prior_weight > 0:
        for word, prompt in zip(a.class_word, class_prompts):
            folder = Path(a.class_dir) / word.replace("/", "_")
            generate_class_images(model, prompt, folder, a)
            class_images.append(photos.load_image_folder(folder, a.resolution, "--class-dir", a.num_class_images))

    # The VAE is frozen: every photo is encoded once, and each step draws z from its posterior
    subjects = [latents.encode(model, x, crops, a.flip) for x, _, crops in instances]
    classes = [latents.encode(model, x, crops, a.flip) for x, _, crops in class_images]
    del class_images  # the pixels (200 images at 1024 px: 2.5 GB) are not needed again

    # Eq. 1-2: factor every weight once and wrap it with a trainable δ (the fast SVD and layer, support/)
    fast_layer.add_spectral_shifts(model, a.subset, a.rank, cache=a.svd_cache)
    fast_layer.drop_weights(model)  # the W the factored path never reads: 3.1 of SD1.5's 3.9 GB
    optimizer = torch.optim.AdamW(svdiff.param_groups(model, a.lr, a.lr_1d))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and a.dtype == "fp16")  # fp16 gradients underflow unscaled
    model.unet.grad_checkpointing = a.grad_checkpointing
    alphas = ddim.alphas_cumprod().to(a.device)
    start = run_folder.start(model, out, a, optimizer, scaler, gen)  # the step a resumed run continues from

    set_train(model, True)
    with tqdm(initial=start, total=a.steps, desc="train") as bar, run_folder.StopAfterStep() as stop:
        for step in range(start + 1, a.steps + 1):
            if stop.requested:  # Ctrl-C: save the last step, whole, and stop (raises run_folder.Interrupted)
                run_folder.save_and_stop(model, out, a, step - 1, start, optimizer, scaler, gen)
            t0 = time.time()
            # one subject, or (several subjects, Cut-Mix) a collage of two, left and right in random order
            chosen = draw_subjects(gen, len(subjects), a.cutmix_prob)
            if len(chosen) == 2:
                left, right = chosen
                z = svdiff.cutmix(latents.draw(subjects[left], a, gen).z, latents.draw(subjects[right], a, gen).z)
                prompt, class_prompt, positions = collages[left, right]
                prompts, sizes = [prompt] * a.batch_size, [latents.whole(a)]
            else:
                s, = chosen
                z, rows, crops = latents.draw(subjects[s], a, gen)
                prompts, sizes, class_prompt = [instance_prompts[s][i] for i in rows], [crops], class_prompts[s]
            if a.prior_weight > 0:  # the class images, as a collage or not, alike
                if len(chosen) == 2:
                    zc = svdiff.cutmix(latents.draw(classes[left], a, gen).z, latents.draw(classes[right], a, gen).z)
                    sizes.append(latents.whole(a))
                else:
                    zc, _, crops = latents.draw(classes[s], a, gen)
                    sizes.append(crops)
                prompts += [class_prompt] * a.batch_size
                z = torch.cat([z, zc])
            # noise the latents at random timesteps; the model predicts the noise (or v)
            noise = torch.randn(z.shape, generator=gen).to(a.device)
            t = torch.randint(0, len(alphas), (len(z),), generator=gen).to(a.device)
            x_t = ddim.add_noise(z, noise, t, alphas)
            target = noise if model.prediction_type == "epsilon" else ddim.velocity(z, noise, t, alphas)
            model.unet.record_cross_attention(len(chosen) == 2)  # for the Unmix loss
            with torch.autocast("cuda", dtype=autocast_dtype, enabled=cuda):
                cond = sd.encode_prompts(model, prompts, **latents.micro_conditioning(sizes, a))  # (SDXL's sizes)
                pred = model.unet(x_t.to(cond.context.dtype), t, cond.context, cond.y).float()
            # Eq. 3, and on collages the Unmix loss of the subjects' rows (class collages have no subject tokens)
            n = a.batch_size
            loss, prior_loss = svdiff.prior_preservation_loss(pred[:n], target[:n], pred[n:], target[n:],
                                                              a.prior_weight)
            unmix_loss = None
            if len(chosen) == 2:
                unmix_loss = svdiff.unmix_loss(model.unet.cross_attention_probs(), [positions] * n, *z.shape[-2:])
                loss = loss + a.unmix_weight * unmix_loss
            run_folder.check_loss(loss, step, out)
            # the step (fp16: its gradients made with a loss scale, halved after an overflow, the step skipped)
            optimizer.zero_grad(set_to_none=True)
            loss_scale = scaler.get_scale() if scaler.is_enabled() else None
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            run_folder.check_deltas(model, step, out)  # only finite δ are ever saved
            run_folder.log_step(out, step, loss, prior_loss, unmix_loss, optimizer, loss_scale, time.time() - t0)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % a.save_every == 0 or step == a.steps:
                run_folder.save_step(model, out, step, optimizer, scaler, gen, a)
            if a.keep_every and (step % a.keep_every == 0 or step == a.steps):
                run_folder.keep_step(model, out, step, a)
            if a.sample_every and (step % a.sample_every == 0 or step == a.steps):
                set_train(model, False)
                write_samples(model, out, step, a.sample_prompt or sample_prompt(a, instance_prompts[0][0]), a)
                set_train(model, True)
    set_train(model, False)
    model.unet.record_cross_attention(False)
    return model


def generate_class_images(model, prompt, folder: Path, a: Settings):
    """Prior preservation's class images, from the base model (DDIM), kept as PNGs and reused by later runs of the
    same base model, resolution and class prompt (photos.reusable_class_images)."""
    made_for = {"model": fingerprint(model), "resolution": a.resolution, "prompt": prompt}
    have = photos.reusable_class_images(folder, made_for)
    if len(have) >= a.num_class_images:
        return
    print(f"generating {cli.plural(a.num_class_images - len(have), 'class image')} for {prompt!r} in {folder}")
    batch = 4 if a.device.startswith("cuda") else 1
    for i in tqdm(range(len(have), a.num_class_images, batch), desc="class images"):
        g = torch.Generator("cpu").manual_seed(a.seed * 100_003 + i)
        k = min(batch, a.num_class_images - i)
        x = sd.text_to_image(model, [prompt] * k, steps=a.class_steps, generator=g, height=a.resolution,
                             width=a.resolution, progress=False)
        for j, im in enumerate(sd.to_pil(x)):
            photos.save_png(im, folder / f"{i + j:05d}.png")


def draw_subjects(gen, n_subjects: int, cutmix_prob: float) -> list[int]:
    """Which subjects a training example shows: with several subjects and probability `cutmix_prob`, a Cut-Mix
    collage of two different ones, [left, right] in random order (§3.3); else one, [s], drawn uniformly."""
    if n_subjects >= 2 and float(torch.rand((), generator=gen)) < cutmix_prob:
        return torch.randperm(n_subjects, generator=gen)[:2].tolist()
    return [int(torch.randint(n_subjects, (1,), generator=gen))]


def cutmix_prompts(a: Settings, left: int, right: int) -> tuple[str, str]:
    """A collage's prompt, --cutmix-prompt naming each subject with its place ("a photo of a sks dog on the left and
    a zwx sculpture on the right"), and the same with the class words alone for the prior collage. (SDXL's context
    is its two encoders' states side by side, and both tokenizers give the same ids but for the padding after EOS:
    a subject's token positions hold for both.)"""
    names = [f"{a.token[i]} {a.class_word[i]}" for i in (left, right)]
    return (a.cutmix_prompt.format(left=names[0], right=names[1]),
            a.cutmix_prompt.format(left=a.class_word[left], right=a.class_word[right]))


def sample_prompt(a: Settings, first_instance_prompt: str) -> str:
    """The sample grids' default prompt: the first instance prompt, or with several subjects a composition of the
    first two, "a {token1} {class1} sitting beside a {token2} {class2}"."""
    if len(a.images) == 1:
        return first_instance_prompt
    return f"a {a.token[0]} {a.class_word[0]} sitting beside a {a.token[1]} {a.class_word[1]}"


def write_samples(model, out: Path, step: int, prompt: str, a):
    """samples/step_XXXXX.png: 4 images of `prompt` from the model as it trains (its shifted layers, unmerged, under
    the run's autocast), the same seed every time."""
    cuda = a.device.startswith("cuda")
    model.unet.record_cross_attention(False)
    with torch.autocast("cuda", dtype=train_args.weight_dtype(a) if cuda else None, enabled=cuda):
        x = sd.text_to_image(model, [prompt] * 4, steps=a.sample_steps, height=a.resolution, width=a.resolution,
                             generator=torch.Generator("cpu").manual_seed(a.seed), progress=False)
    (out / "samples").mkdir(exist_ok=True)
    photos.save_png(sd.grid(sd.to_pil(x)), out / "samples" / f"step_{step:05d}.png")


def set_train(model, on: bool):
    """Training (or eval) mode of what trains: the UNet (gradient checkpointing works in training mode only) and
    the text encoder(s)."""
    for module in (model.unet, model.text_encoder, model.text_encoder_2):
        if module is not None:
            module.train(on)


if __name__ == "__main__":
    cli.run(main, "--grad-checkpointing, --batch-size 1, a smaller --resolution, --subset unet (no text encoder) "
                  "or --dtype fp16")
