"""Atomic writes: every artifact goes to a temporary name first, then is renamed into place. A write that
fails (a full disk, a lost mount, no permission) leaves the previous version of the file and no temporary file,
and becomes one KitError naming the file: the CLI prints it on one line and exits 2."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kit.errors import KitError
from kit.faults import fault_point

# what libraries that write through C code (torch.save, safetensors, TorchScript) say when the write fails
IO_FAILURE_TEXT = ("No space left", "file write failed", "os error", "I/O error", "Errno", "Disk quota")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give artifacts the usual mode
        fault_point(f"write:{path.name}")  # written in full, not yet in place
        os.replace(tmp, path)
    except KitError:
        raise
    except Exception as err:
        if isinstance(err, OSError) or any(text in str(err) for text in IO_FAILURE_TEXT):
            reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[-1]
            raise KitError(f"{path}: could not be written ({reason}); its previous version is kept") from None
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
