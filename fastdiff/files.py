"""Writing files so that nothing already written is lost.

``atomic_write`` is the one way fastdiff writes a file (weights, configs, checkpoints, images,
plots): into a temporary file in the target's folder, flushed to disk, then renamed onto the
target, so a reader (or a crash at any moment) sees the old file or the new one, never a torn one.
``check_output_path`` is what a command runs on its output paths before any work: it fails on a
folder that is missing or not writable, and on a file that exists unless told to replace it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def check_output_path(
    path: str | os.PathLike, *, overwrite: bool, option: str = "--out", suffix: str | None = None
) -> Path:
    """``path`` as a Path, once it is known that a file can be written there: its folder exists
    and is writable, it is not a folder, it ends in ``suffix`` (e.g. ".png") when one is given,
    and it does not exist yet unless ``overwrite``. ``option`` names the command-line option in
    the errors."""
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{option}: output directory does not exist: {folder}")
    if target.is_dir():
        raise ValueError(f"{option}: {target} is a directory, not a file name")
    if suffix is not None and target.suffix.lower() != suffix:
        raise ValueError(f"{option} must name a {suffix} file, got {str(target)!r}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{option}: cannot write to directory {folder} (permission denied)")
    if (target.exists() or target.is_symlink()) and not overwrite:  # a dangling link counts
        raise FileExistsError(f"{option}: {target} already exists; pass --overwrite to replace it")
    return target


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = True
) -> Path:
    """Call ``write(temporary_path)``, then move the file onto ``path`` in one rename (creating
    the folder if needed). With ``overwrite=False`` an existing ``path`` is never replaced, even
    one that appeared while ``write`` ran: ``FileExistsError``. On any failure the temporary file
    is removed and ``path`` is as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes 0600 files; ours are meant to be shared
        if overwrite:
            os.replace(temporary, target)
        else:
            move_without_replacing(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return target


def move_without_replacing(source: str, target: Path) -> None:
    """Rename ``source`` to ``target`` unless ``target`` exists (``FileExistsError``). A hard
    link makes the check and the move one step; where the file system has none, the check comes
    just before the rename."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it") from None
    except OSError:  # no hard links here (some network and FAT file systems)
        if target.exists():
            raise FileExistsError(
                f"{target} already exists; pass --overwrite to replace it"
            ) from None
        os.replace(source, target)
        return
    with contextlib.suppress(OSError):  # the file is in place: a leftover link is no failure
        os.unlink(source)
