"""Crash-safe writes, and the reads that name the file they fail on.

Every file softprompt writes (a prompt folder, a checkpoint, metrics, curves) goes through
here: a file is written under a hidden temporary name and renamed onto its target; a
folder is built in a hidden temporary folder beside the target and swapped into place in
one rename, so a crash leaves either the old content or the new, never half of it. Reads
accept JSON and safetensors only (nothing is ever unpickled) and raise `PromptFileError`
naming the file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import PromptFileError, first_line

# -- atomic directory replacement ----------------------------------------------------
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A temporary folder's name says who made it: ``.{target}.{tmp|old}-{host}-{pid}-{random}``,
# so a later save can tell a folder left by a killed process (kill -9, power cut: no
# `except` ran to remove it) from one a live process is still writing.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[a-z0-9_]{8}$")
STALE_AFTER_S = 24 * 3600  # no save takes this long: older temporaries are abandoned


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{_host_tag()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Remove the temporary folders that dead writers left in `parent`; return them.

    Only folders named by `write_directory_atomically` (see `_TEMP_NAME`) are touched, and
    only when their process is gone (same host) or they were untouched for `STALE_AFTER_S`
    (another host's, on a shared disk, or a dead writer's pid taken by a new process). A
    folder moved aside by the no-exchange fallback whose target is missing (killed between
    its two renames) is moved back first: the previous content is restored, not lost.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    here = _host_tag()
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            dead = match["host"] == here and not _pid_alive(int(match["pid"]))
            # age also covers a dead writer whose pid a live process took over since
            if not dead and time.time() - entry.stat().st_mtime <= STALE_AFTER_S:
                continue
            if match["kind"] == "old":
                target, kept = entry.parent / match["target"], entry / "old"
                if kept.is_dir() and not os.path.lexists(target):
                    os.rename(kept, target)
            shutil.rmtree(entry)
        except OSError:  # another process cleaning up at the same time, a read-only disk: not ours to fail on
            continue
        removed.append(entry)
    return removed


def write_file_atomically(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename `tmp_path` onto `path` (one step on POSIX): a
    reader, or a run killed mid-write, sees the old file or the new one, never half of one.
    The temporary file is hidden beside `path` and keeps its suffix (matplotlib picks the
    format by it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, value: Any) -> None:
    """`value` as indented JSON at `path`, by `write_file_atomically`."""
    write_file_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8"))


def write_directory_atomically(target: Path, write) -> None:
    """Call ``write(tmp_dir)`` then put `tmp_dir` at `target` in one step.

    If `target` exists it is swapped out atomically (renameat2) and removed afterwards;
    where the kernel lacks the exchange, the old folder is moved aside first (a crash
    in between leaves it intact beside the target, hidden, and the next save moves it
    back). Temporary folders left in the same parent by killed processes are removed
    first (`remove_stale_temporaries`).
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "tmp"), dir=parent))
    try:
        write(tmp)
        _modes_of_the_umask(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists() and not target.is_dir():
            raise PromptFileError(f"{target} exists and is not a directory; refusing to replace it")
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # tmp now holds the old prompt
        else:
            aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "old"), dir=parent))
            os.rename(target, aside / "old")
            os.rename(tmp, target)
            shutil.rmtree(aside)
        _fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):  # a full disk, a size limit, no permission
            raise PromptFileError(f"{target}: could not be written ({first_line(e)}); "
                                  "what was there before is unchanged") from e
        raise


def _modes_of_the_umask(folder: Path) -> None:
    """Give a finished temporary folder and what it holds the modes they would have had if
    made in place (0o777 / 0o666 less the umask): `tempfile.mkdtemp` makes the folder 0700,
    private while it is written, and a server running as another user of the group could
    not read the prompt it becomes."""
    mask = _umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    folder.chmod(0o777 & ~mask)


def _umask() -> int:
    """The process's umask: read from /proc where the kernel shows it (setting it to read it
    back would change it for every thread meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- reads -------------------------------------------------------------------------------
#: the largest JSON file read (a prompt's config or task is a few KiB; a server loading a
#: folder an admin names must not read gigabytes into memory first)
MAX_JSON_BYTES = 16 << 20


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; PromptFileError naming the file (and line and column),
    or saying it is over `MAX_JSON_BYTES` or nested past the parser's depth."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise PromptFileError(f"{path}: {size} bytes, over the limit of {MAX_JSON_BYTES} for a JSON file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptFileError(f"{path}: missing") from None
    except RecursionError:
        raise PromptFileError(f"{path}: JSON nested too deeply to read") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise PromptFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; PromptFileError naming the file when it is
    missing (and a pickled file beside it, which is never loaded) or corrupt."""
    if not path.is_file():
        pickled = sorted(p.name for p in path.parent.glob(path.stem + ".*") if p.suffix in PICKLED) \
            if path.parent.is_dir() else []
        if pickled:
            raise PromptFileError(f"{path}: missing; {pickled[0]} beside it is a pickle file, which softprompt never "
                                  "loads (it can run code): save the tensors with safetensors")
        raise PromptFileError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PromptFileError(f"{path}: corrupt or truncated safetensors file ({e})") from None
