"""A run's folder (run_folder.py, train.py): --resume continues the run recorded in it, Ctrl-C saves the last step
and says how to continue, a folder with no saved step is started afresh, and class images are reused only for the
base model, resolution and prompt they were made for."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import ROOT, photo, tiny_model_folder
from support import shift_files, train_args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tiny_model_folder(tmp_path_factory, "run-folder")
    rng = np.random.default_rng(0)
    for name in ("dog", "cat"):
        (root / name).mkdir()
        for i in range(2):
            Image.fromarray(photo(rng, (64, 80, 3), np.s_[20:50, 30:70], [220, 40, 40])).save(root / name / f"{i}.png")
    return root


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def flags(setup, out, steps, *extra):
    """A run whose settings all differ from train.py's defaults where that matters: 64 px, class images, lr."""
    return ["--images", setup / "dog", "--token", "sks", "--model", setup / "model", "--resolution", 64, "--steps",
            steps, "--num-class-images", 2, "--class-steps", 1, "--lr", "5e-3", "--flip", "--sample-every", 0,
            "--out", out, *extra]


def errors(r):
    return [l for l in r.stderr.splitlines() if l.startswith("error:")]


def final_state(out):
    state = torch.load(out / "resume.pt", weights_only=True)
    return state["step"], state["delta"]


def same_deltas(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def whole(setup):
    """The uninterrupted 6-step run the others must end equal to."""
    out = setup / "whole"
    r = run(*flags(setup, out, 6, "--save-every", 2))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_resume_needs_only_the_run_folder_and_ends_bit_exact(setup, whole):
    out = setup / "part"
    assert run(*flags(setup, out, 4, "--save-every", 2)).returncode == 0
    r = run("--resume", out, "--steps", 6)  # every other setting from the run's config.json
    assert r.returncode == 0, r.stderr[-2000:]
    assert "generating" not in r.stdout  # its 64 px class images, not 200 new ones at 512 px
    config = json.loads((out / "config.json").read_text())
    assert config["resolution"] == 64 and config["steps"] == 6 and config["num_class_images"] == 2
    (step, a), (_, b) = final_state(whole), final_state(out)
    assert step == 6 and same_deltas(a, b)


@pytest.mark.parametrize("flag,value,recorded", [
    ("--resolution", 32, "64"), ("--lr", "1e-2", "0.005"), ("--seed", 1, "0"), ("--rank", 2, "None"),
    ("--subset", "unet", "all"), ("--token", "zwx", "sks"), ("--num-class-images", 3, "2"), ("--no-prior", None, "False"),
    ("--images", "cat", "dog"),
])
def test_resume_refuses_a_flag_that_would_change_what_is_trained_naming_both_values(setup, whole, flag, value,
                                                                                   recorded):
    given = [flag] + ([] if value is None else [str(setup / value if flag == "--images" else value)])
    with pytest.raises(ValueError) as e:
        train_args.resolve(train_args.parse(["--resume", str(whole), "--steps", "8", *given], train.Settings()))
    assert str(e.value).startswith(f"{flag} ") and recorded in str(e.value) and "differs from the run's" in str(e.value)


def test_a_refused_resume_is_one_line_and_changes_nothing(whole):
    before = {p.name: p.read_bytes() for p in whole.iterdir() if p.is_file()}
    r = run("--resume", whole, "--steps", 8, "--resolution", 32)
    assert r.returncode == 1 and len(errors(r)) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert errors(r)[0].startswith("error: --resolution 32 differs from the run's 64")
    assert {p.name: p.read_bytes() for p in whole.iterdir() if p.is_file()} == before


def test_resume_accepts_the_flags_that_may_change_and_refuses_a_finished_run_without_more_steps(setup, whole):
    a = train_args.resolve(train_args.parse(list(map(str, ["--resume", whole, "--steps", 9, "--save-every", 3,
                                                      "--sample-every", 5, "--sample-prompt", "a sks dog",
                                                      "--device", "cpu", "--resolution", 64])), train.Settings()))
    assert (a.steps, a.save_every, a.sample_every, a.sample_prompt, a.resolution, a.lr) == (9, 3, 5, "a sks dog", 64,
                                                                                            5e-3)
    with pytest.raises(ValueError, match="already reached step 6 of --steps 6; pass a larger --steps"):
        train_args.resolve(train_args.parse(["--resume", str(whole)], train.Settings()))
    with pytest.raises(ValueError, match="not a train.py run folder"):
        train_args.resolve(train_args.parse(["--resume", str(setup / "dog")], train.Settings()))


def test_ctrl_c_saves_the_last_step_and_its_printed_command_continues_bit_exact(setup, tmp_path):
    steps = 20
    whole, out = tmp_path / "whole", tmp_path / "interrupted"
    args = flags(setup, out, steps, "--save-every", 1000, "--no-prior")  # no save before the end but Ctrl-C's
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "log.jsonl", time.time() + 300
    while time.time() < deadline and p.poll() is None and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 130, stderr[-2000:]
    step, _ = final_state(out)
    assert 3 <= step < steps and shift_files.read_shift_file(out / "shifts.safetensors")[1]["step"] == str(step)
    assert len(log.read_text().splitlines()) == step
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped at step {step} of {steps}, saved in {out}; continue with: python train.py "), last
    command = last.split("continue with: ")[1].split()
    r = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=ROOT)  # as printed
    assert r.returncode == 0, r.stderr[-2000:]
    assert run(*flags(setup, whole, steps, "--save-every", 1000, "--no-prior")).returncode == 0
    (n, a), (m, b) = final_state(whole), final_state(out)
    assert n == m == steps and same_deltas(a, b)


def test_a_folder_with_no_saved_step_is_started_afresh_by_the_same_command_or_by_resume(setup, whole, tmp_path):
    """What a run stopped before its first step ended leaves: config.json, class images, a log line or two."""
    for out, command in ((tmp_path / "again", lambda out: flags(setup, out, 2, "--no-prior")),
                         (tmp_path / "resumed", lambda out: ["--resume", out])):
        out.mkdir()
        config = json.loads((whole / "config.json").read_text()) | {"out": str(out), "steps": 2, "no_prior": True,
                                                                     "prior_weight": 0.0}
        (out / "config.json").write_text(json.dumps(config))
        (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
        (out / "class_images").mkdir()
        r = run(*command(out))
        assert r.returncode == 0, r.stderr[-2000:]
        assert final_state(out)[0] == 2 and len((out / "log.jsonl").read_text().splitlines()) == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a run")  # a folder of other files is never written into
    r = run(*flags(setup, mine, 2, "--no-prior"))
    assert r.returncode == 1 and "holds other files" in errors(r)[0] and sorted(os.listdir(mine)) == ["notes.txt"]


def class_image_sizes(folder):
    return sorted({Image.open(p).size for p in folder.glob("*.png")})


def test_class_images_of_another_resolution_or_class_prompt_are_made_anew_and_say_so(setup, tmp_path):
    class_dir = tmp_path / "classes"
    common = ["--images", setup / "dog", "--token", "sks", "--model", setup / "model", "--steps", 1, "--class-steps",
              1, "--num-class-images", 2, "--sample-every", 0, "--class-dir", class_dir, "--overwrite"]
    assert run(*common, "--resolution", 64, "--out", tmp_path / "a").returncode == 0
    assert class_image_sizes(class_dir / "dog") == [(64, 64)]
    r = run(*common, "--resolution", 32, "--out", tmp_path / "b")
    assert r.returncode == 0 and "made for another resolution; making new ones" in r.stderr, r.stderr[-2000:]
    assert class_image_sizes(class_dir / "dog") == [(32, 32)] and len(list((class_dir / "dog").glob("*.png"))) == 2
    r = run(*common, "--resolution", 32, "--class-prompt", "a {class} in a field", "--out", tmp_path / "c")
    assert r.returncode == 0 and "made for another prompt" in r.stderr, r.stderr[-2000:]
    r = run(*common, "--resolution", 32, "--class-prompt", "a {class} in a field", "--out", tmp_path / "d")
    assert r.returncode == 0 and "generating" not in r.stdout and "note:" not in r.stderr  # the same: reused
    # images with no record of what they were made for (put there by hand) are used, saying so
    (class_dir / "dog" / "made_for.json").unlink()
    r = run(*common, "--resolution", 32, "--out", tmp_path / "e")
    assert r.returncode == 0 and "which record no base model, resolution or prompt" in r.stderr, r.stderr[-2000:]


def test_keep_every_keeps_each_nth_steps_shift_file_and_the_last(setup, tmp_path):
    """--keep-every 2 over 5 steps: step-00002, -00004 and -00005.safetensors, each the shift file of its step
    (step 2's bit-exact as a 2-step run's), the last equal to shifts.safetensors; a fresh run in the folder drops
    an earlier run's numbered files."""
    out, two = tmp_path / "kept", tmp_path / "two"
    common = ["--no-prior", "--lr", "5e-3"]
    assert run(*flags(setup, two, 2, *common)).returncode == 0
    (out).mkdir()
    (out / "step-00009.safetensors").write_bytes(b"an earlier run's")
    r = run(*flags(setup, out, 5, *common, "--keep-every", 2))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00002.safetensors", "step-00004.safetensors",
                                                          "step-00005.safetensors"]
    for step in (2, 4, 5):
        assert shift_files.read_shift_file(out / f"step-{step:05d}.safetensors")[1]["step"] == str(step)
    kept2, _ = shift_files.read_shift_file(out / "step-00002.safetensors")
    ref2, _ = shift_files.read_shift_file(two / "shifts.safetensors")
    last, _ = shift_files.read_shift_file(out / "shifts.safetensors")
    kept5, _ = shift_files.read_shift_file(out / "step-00005.safetensors")
    assert all(torch.equal(kept2[k], ref2[k]) for k in ref2) and all(torch.equal(kept5[k], last[k]) for k in last)
    assert any(not torch.equal(kept2[k], kept5[k]) for k in last)
