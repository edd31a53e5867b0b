"""Writing a file whole or not at all."""
import os
from pathlib import Path


def atomic_write(write, path: Path):
    """Temp file in the same folder (created if missing), then rename: a crash never leaves a half-written file.
    The file gets the mode a plain open() gives it, 0666 less the umask, whatever `write` created it with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        # safetensors' save_file (0.8, Rust) creates its file 0600, so shift files, exports and the SVD cache were
        # private while PNGs and JSON were not; one chmod here sets every writer's mode. The umask can only be read
        # by setting it: put back at once (a file another thread created in that instant would get umask 022; the
        # scripts here run no other threads).
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
