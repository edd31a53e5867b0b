"""What the commands share: --help's defaults, the checks of --device and --out, which flags were typed, counts in
messages, and the one way bad input ends a command (`main`: one `error:` line, exit 1, no traceback)."""
import argparse
import os
import sys
from pathlib import Path

import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The scripts' --help: each flag's default after its help, unless the help already says what the default is
    (one that depends on other flags or on the model: `default=None`)."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def given_flags(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The flags on the command line (argparse names), as opposed to those left at their defaults: `parser` parses
    `argv` again with every default suppressed, so only what was typed gets an attribute. (A value equal to the
    default is still given: `--steps 500` on a run of 300 steps means 500.)"""
    parser._defaults.clear()  # set_defaults' values (argparse has no public way to list or clear them)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_args(argv)))


def check_device(device: str):
    """A --device that torch knows, and CUDA only where there is a CUDA device (before anything is loaded)."""
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use cuda, cuda:N or cpu") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available; use --device cpu")


def check_writable(out: Path, flag: str):
    """--out must be creatable/writable, checked without creating anything (nothing is written on bad input)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a folder; choose a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out} is not writable; choose another folder")


def plural(n: int, noun: str) -> str:
    """"1 image", "2 images", "12,288 values": the scripts' counts (every noun they count takes an -s)."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def run(main, out_of_memory: str = ""):
    """A command's `__main__`: bad input (ValueError, FileNotFoundError) is one `error:` line and exit 1, never a
    traceback; running out of GPU memory is one line naming the flags that reduce it (`out_of_memory`); Ctrl-C
    exits 130 (train.py and edit.py first save what they can and say so)."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory{'; try ' + out_of_memory if out_of_memory else ''}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
