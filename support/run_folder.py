"""A training run's folder (train.py --out): what makes it a run, its settings (config.json) for --resume, the state
of its last saved step (shifts.safetensors + resume.pt, which must belong together), its log, and Ctrl-C, which
stops at the end of a step and saves it.

    python train.py --images ./dog --token sks      # runs/sks: config.json, log.jsonl, shifts.safetensors, resume.pt
    python train.py --resume runs/sks               # the same run, continued: every setting from its config.json
    python train.py --resume runs/sks --steps 800   # ... trained longer
"""
import json
import os
import pickle
import re
import shlex
import signal
import sys
import threading
from pathlib import Path

import torch

import svdiff
from support import shift_files
from support.files import atomic_write

CONFIG = "config.json"
# What resuming may change: how long, where and how fast it runs, and what it writes on the way. Everything else
# decides what is trained (the images and prompts, the model, the resolution, the optimiser, the seed, ...), so a
# value that differs from the run's is refused rather than silently mixed into it. --dtype and
# --grad-checkpointing change rounding and memory, not the method, as --device does.
MAY_CHANGE = {"steps", "save_every", "keep_every", "sample_every", "sample_prompt", "sample_steps", "device", "dtype",
              "grad_checkpointing", "svd_cache", "half"}
NOT_SETTINGS = {"resume", "overwrite", "out", "given"}  # how this command runs, not what the run is
PATHS = {"images", "class_dir", "vocab"}
KEPT = re.compile(r"step-(\d{5,})\.safetensors(\.tmp)?")  # --keep-every's numbered shift files  # compared as the files they name, not as typed (runs/x is ./runs/x/)


def holds_run(out: Path) -> bool:
    """A folder holds a run once a step has been saved in it. A folder with only config.json, class images or
    samples (a run stopped before its first step ended) is not one: the same command starts it afresh."""
    return (out / "shifts.safetensors").is_file() or (out / "resume.pt").is_file()


def only_run_files(out: Path) -> bool:
    """Is `out` new, empty, or holding only what a run writes before its first save? (Such a folder, a run stopped
    early, is started afresh; a folder of other files is not written into.)"""
    ours = {CONFIG, "log.jsonl", "class_images", "samples", "shifts.safetensors.tmp", "resume.pt.tmp"}
    return not out.is_dir() or all(p.name in ours or KEPT.fullmatch(p.name) for p in out.iterdir())


def write_config(a, out: Path):
    """The resolved settings, as --resume reads them back."""
    settings = {k: v for k, v in vars(a).items() if k != "given"}
    atomic_write(lambda p: p.write_text(json.dumps(settings, indent=2)), out / CONFIG)


def read_config(run: Path) -> dict:
    try:
        config = json.loads((run / CONFIG).read_text())
    except FileNotFoundError:
        raise ValueError(f"--resume {run}: no {CONFIG} there, so not a train.py run folder; pass the folder a run "
                         "wrote (its --out, e.g. runs/sks)") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"--resume {run}: its {CONFIG} cannot be read ({type(e).__name__}); pass --overwrite to "
                         "start afresh") from None
    if not isinstance(config, dict):
        raise ValueError(f"--resume {run}: its {CONFIG} is not a run's settings; pass --overwrite to start afresh")
    return config


def _same(name: str, given, recorded) -> bool:
    if name in PATHS and given is not None and recorded is not None:
        norm = lambda v: [os.path.abspath(p) for p in v] if isinstance(v, list) else os.path.abspath(v)
        return norm(given) == norm(recorded)
    if isinstance(given, (int, float)) and isinstance(recorded, (int, float)) and not isinstance(given, bool):
        return float(given) == float(recorded)
    return given == recorded


def merge_config(a, given: set[str], config: dict, run: Path):
    """--resume: the run's recorded settings, with today's flags only where they may change (MAY_CHANGE); a flag
    that would change what is trained is refused, naming both values. `given`: the flags on today's command line
    (their argparse names). --model may name the run's base model at another place (a moved file): the weights'
    fingerprint decides whether it is the same."""
    for name in sorted(given - MAY_CHANGE - NOT_SETTINGS - {"model"}):
        if name in config and not _same(name, getattr(a, name), config[name]):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {_show(getattr(a, name))} differs from the run's {_show(config[name])} "
                             f"({run / CONFIG}): resuming continues that run; leave {flag} out, or start a new run "
                             "with another --out")
    for name, value in config.items():
        if hasattr(a, name) and name not in given and name not in NOT_SETTINGS:
            setattr(a, name, value)


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def continue_command(out) -> str:
    return f"python train.py --resume {shlex.quote(str(out))}"


# ---------------------------------------------------------------------------------------------------------------
# The state of a saved step: shifts.safetensors (the δ users apply) + resume.pt (δ in fp32, AdamW, random state)


def start(model, out: Path, a, optimizer, scaler, gen) -> int:
    """The step training starts after: --resume's saved step (its δ, AdamW's state, the loss scale and the random
    state restored, and the log's later lines dropped: they are replayed), or 0 in a folder made ready for a new
    run. Writes config.json, the settings as --resume reads them."""
    step = 0
    if a.resume and holds_run(out):
        step = resume_state(model, out, optimizer, scaler, gen)
        trim_log(out, step)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("log.jsonl", "shifts.safetensors", "resume.pt"):
            (out / stale).unlink(missing_ok=True)
    for kept_file in out.iterdir():  # numbered files of steps to be trained (again) are not this run's
        m = KEPT.fullmatch(kept_file.name)
        if m and int(m[1]) > step:
            kept_file.unlink()
    write_config(a, out)
    return step


def keep_step(model, out: Path, step: int, a):
    """--keep-every: the shift file of `step` kept as step-NNNNN.safetensors beside the run's latest."""
    shift_files.save_shift_file(model, out / f"step-{step:05d}.safetensors", half=a.half, subset=a.subset,
                                rank=a.rank, step=step)


def save_step(model, out: Path, step: int, optimizer, scaler, gen, a):
    """The shift file and resume.pt of `step`: δ (fp32 in resume.pt, whatever --half makes of the shift file),
    AdamW's state, and the random state now, before step + 1 draws its batch, so that a resumed run draws exactly
    what this one would have. Only finite δ are ever written."""
    layers = shift_files.shifts_by_key(model)
    if not all(torch.isfinite(m.delta).all() for _, m in layers):  # (check_deltas ran after the step)
        raise ValueError(f"the shifts δ are not finite at step {step}; not saved")
    shift_files.save_shift_file(model, out / "shifts.safetensors", half=a.half, subset=a.subset, rank=a.rank,
                                step=step)
    state = {"step": step, "delta": {k: m.delta.detach().float().cpu() for k, m in layers},
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "generator": gen.get_state(),
             "torch_rng": torch.get_rng_state()}
    atomic_write(lambda p: torch.save(state, p), out / "resume.pt")


def check_loss(loss, step: int, out: Path):
    """A loss that is not finite stops the run (no step is taken with it), keeping the last save."""
    if not torch.isfinite(loss):
        raise ValueError(f"the loss became {loss.item()} with the shifts of step {step - 1}; stopped. "
                         f"{kept(out, step - 1)} Lower --lr, or use --dtype fp32/bf16")


def check_deltas(model, step: int, out: Path):
    """δ that are not finite after a step stop the run before anything saves them (one sync for all)."""
    deltas = torch.cat([m.delta.detach().flatten() for _, m in svdiff.shifts(model)])
    if not bool(torch.isfinite(deltas).all()):
        raise ValueError(f"the shifts δ became non-finite at step {step}; stopped. {kept(out)} Lower --lr")


def saved_step(out: Path) -> int | None:
    """The step of resume.pt (None without one)."""
    return resume_files(out)[0]["step"] if (out / "resume.pt").is_file() else None


def resume_files(out: Path):
    """resume.pt and the shift file's metadata, refused unless both belong to the same step (a shift file from
    elsewhere, or a run stopped between the two writes, is never mixed with the optimizer state of another step)."""
    try:
        # on the CPU: AdamW's moments were saved from the GPU (optimizer.load_state_dict moves them back)
        state = torch.load(out / "resume.pt", weights_only=True, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:  # what torch.load raises on a bad file
        raise ValueError(f"--resume: {out / 'resume.pt'} cannot be read ({type(e).__name__}); pass --overwrite to "
                         "start afresh") from None
    path = out / "shifts.safetensors"
    _, meta = shift_files.read_shift_file(path) if path.is_file() else (None, {})
    if "delta" not in state or meta.get("step") != str(state["step"]):
        raise ValueError(f"--resume: {path} is of step {meta.get('step', 'none')} but resume.pt of step "
                         f"{state.get('step')}; they do not belong together. Pass --overwrite to start afresh")
    return state, meta


def resume_state(model, out: Path, optimizer, scaler, gen) -> int:
    """--resume: δ, AdamW's state, the fp16 loss scale and the random state from resume.pt (δ in fp32 even with
    --half), after checking that the shift file beside it belongs to the same step and that the base model is the
    one it was trained on. Returns the step to continue from."""
    state, meta = resume_files(out)
    shift_files.check_shift_file(model, out / "shifts.safetensors", meta,
                            hint="resume with the --model of the interrupted run, or pass --overwrite to start afresh")
    layers = dict(shift_files.shifts_by_key(model))
    if set(layers) != set(state["delta"]):
        raise ValueError(f"--resume: {out / 'resume.pt'} holds shifts of other layers; resume with the --subset and "
                         "--rank of the interrupted run, or pass --overwrite to start afresh")
    with torch.no_grad():
        for k, m in layers.items():
            m.delta.copy_(state["delta"][k])
    optimizer.load_state_dict(state["optimizer"])
    if scaler.is_enabled() and state.get("scaler"):  # fp16 loss scaling (an empty dict where it was off)
        scaler.load_state_dict(state["scaler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def kept(out: Path, failed: int | None = None) -> str:
    """What a stopped run leaves: the last shift file saved (its δ finite), if any; `failed`: the step whose shifts
    gave a loss that is not finite, which may be that file's own."""
    f = out / "shifts.safetensors"
    if not f.is_file():
        return "No shift file had been saved yet."
    step = shift_files.read_shift_file(f)[1].get("step", "?")
    if str(failed) == step:
        return f"The last shift file saved, {f} (step {step}), holds those very shifts."
    return f"The last good shift file is kept: {f} (step {step})."


# ---------------------------------------------------------------------------------------------------------------
# log.jsonl


def logged_step(line: str) -> float:
    """The step of a log.jsonl line; a line cut off by a crash mid-write counts as after every step (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def trim_log(out: Path, step: int):
    """Resuming from `step` replays the steps after it, so their lines (and a line cut off mid-write) go."""
    log = out / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    log.write_text("".join(l + "\n" for l in lines if logged_step(l) <= step))


def log_step(out: Path, step: int, loss, prior_loss, unmix_loss, optimizer, loss_scale, seconds: float):
    """One line of log.jsonl; `loss_scale` (fp16 on CUDA) is the scale the step's gradients were made with."""
    record = {"step": step, "loss": loss.detach().item(), "prior_loss": float(prior_loss.detach()),
              "unmix_loss": None if unmix_loss is None else float(unmix_loss.detach()),
              "lr": optimizer.param_groups[0]["lr"], "seconds": seconds}
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record | ({"loss_scale": loss_scale} if loss_scale is not None else {})) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C


def save_and_stop(model, out: Path, a, done: int, start: int, optimizer, scaler, gen):
    """Ctrl-C: save step `done` (if this run took one: a resumed run's first is on disk already) and raise
    Interrupted."""
    if done > start:
        save_step(model, out, done, optimizer, scaler, gen, a)
    raise Interrupted(done, saved=done > 0)


def interrupted_line(e, a) -> str:
    if e.saved:
        return (f"stopped at step {e.step} of {a.steps}, saved in {a.out}; continue with: "
                f"{continue_command(a.out)}")
    return "stopped before the first step ended; nothing saved: the same command starts afresh"


class Interrupted(Exception):
    """Ctrl-C stopped training at the end of `step`; `saved`: that step's shift file and resume.pt are on disk."""

    def __init__(self, step: int, saved: bool):
        super().__init__(step, saved)
        self.step, self.saved = step, saved


class StopAfterStep:
    """`with StopAfterStep() as stop:` ... `if stop.requested:` — the first Ctrl-C (SIGINT) asks the loop to stop
    once the step under way has ended, so that it can save a whole step: interrupting AdamW half-way through its
    update would leave δ and its moments from different steps. A second Ctrl-C stops at once, without saving (the
    last save stays). Outside the main thread (where no signal arrives) it does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping once this step ends, to save it (Ctrl-C again: stop now without saving it)",
              file=sys.stderr)
