"""Atomic writes: every artifact goes to a temporary name first, then is renamed into place. A write that
fails (a full disk, a lost mount, no permission) leaves the previous version of the file and no temporary file,
and becomes one KitError naming the file: the CLI prints it on one line and exits 2.

Outputs are only ever regular files: a path that exists as anything else (a symlink, a device such as /dev/null, a
FIFO, a folder) is refused before anything is written, never replaced. Files that belong together (a submission
and its probabilities) are committed together by `atomic_paths`: both or neither."""

import os
import shutil
import stat
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from kit.errors import KitError
from kit.faults import fault_point

# what libraries that write through C code (torch.save, safetensors, TorchScript) say when the write fails
IO_FAILURE_TEXT = ("No space left", "file write failed", "os error", "I/O error", "Errno", "Disk quota")


def check_output(path: str | Path) -> Path:
    """`path` as an output: absent or a regular file (not through a symlink); anything else is one KitError."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as err:
        raise KitError(f"{path}: cannot be written ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = ("a symlink" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise KitError(f"{path}: exists and is {kind}, not a regular file; kit writes only regular files and replaces "
                       f"nothing else: name another output")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(paths: list[str | Path]) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of `paths`; once the block succeeds, rename them all into place, or (a
    rename failing half-way) put every earlier one back as it was: all or nothing."""
    paths = [check_output(p) for p in paths]
    failing = paths[0]
    try:
        with ExitStack() as cleanup:
            temps = []
            for path in paths:
                failing = path
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
                temps.append(Path(tmp))
                cleanup.callback(_remove, tmp)
            yield temps
            for path, tmp in zip(paths, temps):
                failing = path
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give artifacts the usual mode
                fault_point(f"write:{path.name}")  # written in full, not yet in place
                check_output(path)  # the block may have run long: a link made meanwhile is not replaced either
            _commit(paths, temps, cleanup)
    except KitError:
        raise
    except Exception as err:
        failure = write_failure(failing, err, paths)
        if failure is None:
            raise
        raise failure from None


def write_failure(path: Path, err: Exception, together: list[Path] = ()) -> KitError | None:
    """The one line for a write of `path` that failed (None: not a failure to write); `together`, the files committed
    with it, whose previous versions are kept too."""
    if not (isinstance(err, OSError) or any(text in str(err) for text in IO_FAILURE_TEXT)):
        return None
    reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[-1]
    others = [p.name for p in together if p != path]
    kept = f"the previous versions of it and {', '.join(others)} are kept" if others else "its previous version is kept"
    return KitError(f"{path}: could not be written ({reason}); {kept}")


def _commit(paths: list[Path], temps: list[Path], cleanup: ExitStack) -> None:
    """Rename every temporary file onto its path; on a failure, restore the paths already replaced."""
    done: list[tuple[Path, Path | None]] = []  # (path, its previous version kept aside, or None if it had none)
    try:
        for path, tmp in zip(paths, temps):
            kept = None
            if len(paths) > 1 and path.exists():
                kept = Path(f"{tmp}.previous")
                cleanup.callback(_remove, kept)
                try:
                    os.link(path, kept)  # a second name for the previous version, until every rename has succeeded
                except OSError:  # a file system without hard links
                    shutil.copy2(path, kept)
            os.replace(tmp, path)
            done.append((path, kept))
    except BaseException:
        for path, kept in reversed(done):
            if kept is None:
                os.unlink(path)
            else:
                os.replace(kept, path)
        raise


def _remove(path: str | Path) -> None:
    if os.path.lexists(path):
        os.unlink(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
