"""Prompt folders at fsspec URLs (``s3://``, ``gs://``, ``az://``, ``hf://``, ``memory://``,
``file://``, ...): what a URL source resolves to on this machine.

A prompt source written as a URL is copied into softprompt's cache
(``$SOFTPROMPT_CACHE/remote``, default ``~/.cache/softprompt/remote``) and loaded from
there, through the same loaders and checks as a local folder (the base model's identity
and embedding fingerprint among them). Only a prompt folder's own files are copied
(``prompt_config.json``, the tensors, ``task.json``, the card: `io.prompt.PROMPT_FILES`), at
the URL itself or in the one folder under it that holds a prompt (a run directory's
``prompt/``), never a run's checkpoints.

Integrity: a copy is made in a temporary folder, each file's size checked against the
listing, and only then put in place in one rename (`io.atomic.write_directory_atomically`):
a transfer that breaks off never leaves a folder that loads. The copy's folder is named
after the URL and the listing (names, sizes, and the modification stamp or ETag the file
system gives), so a prompt changed at the source is copied afresh and an unchanged one is
read from the cache without a transfer.

The file system's package comes from fsspec's registry: ``s3fs`` for ``s3://``, ``gcsfs``
for ``gs://``, ... (the error names the one to install).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PromptFileError, first_line

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
# the listing fields that change when a file does, by file system (the first present is used)
_STAMPS = ("ETag", "etag", "md5Hash", "LastModified", "mtime", "updated", "created")


def is_url(source: Any) -> bool:
    """Whether a prompt source is an fsspec URL (``scheme://...``)."""
    return isinstance(source, str) and _URL.match(source) is not None


def _filesystem(url: str):
    """(file system, path inside it) of `url`."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # an unknown scheme, or its package missing (named by fsspec)
        raise ConfigError(f"{url}: no file system for this URL ({first_line(e)})") from None


def _prompt_files(fs, root: str, url: str) -> dict[str, dict]:
    """The prompt folder's files at `root` or in the one folder under it that holds a
    prompt (a run directory's ``prompt/``): {path relative to root: listing entry}.

    Raises:
        PromptFileError: no prompt there, or several folders under it that hold one.
    """
    from .prompt import CONFIG_FILE, PROMPT_FILES

    try:
        found = fs.find(root, maxdepth=2, withdirs=False, detail=True)
    except FileNotFoundError:
        found = {}
    except OSError as e:
        raise PromptFileError(f"{url}: cannot be listed ({first_line(e)})") from None
    files = {posixpath.relpath(path, root): info for path, info in found.items()}
    homes = sorted(posixpath.dirname(rel) for rel in files if posixpath.basename(rel) == CONFIG_FILE)
    if "" not in homes and len(homes) != 1:
        inside = f"; it holds the prompts {', '.join(homes)}: name one as {url.rstrip('/')}/{homes[0]}" if homes else ""
        raise PromptFileError(f"{url}: no {CONFIG_FILE} there{inside or ' or one folder down'}: not a softprompt "
                              "prompt folder")
    home = "" if "" in homes else homes[0]
    return {rel: info for rel, info in files.items()
            if posixpath.dirname(rel) == home and posixpath.basename(rel) in PROMPT_FILES}


def listing_token(files: dict[str, dict]) -> str:
    """What names this listing's version: its files' names, sizes and change stamps."""
    items = []
    for rel, info in sorted(files.items()):
        stamp = next((str(info[k]) for k in _STAMPS if info.get(k) is not None), None)
        items.append((rel, info.get("size"), stamp))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def remote_cache() -> Path:
    from ..base_models import cache_dir

    return cache_dir() / "remote"


def fetch_folder(url: str) -> Path:
    """The prompt folder at `url`, copied into the cache (or found there unchanged).

    Raises:
        ConfigError: no file system for the URL's scheme (its package named).
        PromptFileError: nothing of a prompt folder there, a transfer that failed or came
            back short (nothing is left in the cache then).
    """
    from .atomic import write_directory_atomically

    fs, root = _filesystem(url)
    root = root.rstrip("/")
    files = _prompt_files(fs, root, url)
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    target = remote_cache() / key / listing_token(files)
    if (target / ".complete").is_file():
        return target

    def copy(tmp: Path) -> None:
        for rel, info in files.items():  # the prompt folder's own files, side by side
            local = tmp / posixpath.basename(rel)
            fs.get_file(f"{root}/{rel}", str(local))
            size = local.stat().st_size
            if info.get("size") is not None and size != info["size"]:
                raise PromptFileError(f"{url}/{rel}: {size} bytes arrived of the {info['size']} listed; "
                                      "nothing was kept")
        (tmp / ".complete").write_text(url + "\n")

    try:
        write_directory_atomically(target, copy)
    except (OSError, ValueError) as e:  # the transfer broke off (the temporary folder is gone)
        raise PromptFileError(f"{url}: the copy failed ({type(e).__name__}: {first_line(e)}); nothing was kept") from None
    return target


def read_remote_config(url: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The prompt folder's ``prompt_config.json`` at `url` (or in the one folder under
    it), checked as `io.prompt.read_config` checks a local one, and its ``task.json`` (None:
    saved without a task), without copying the tensors."""
    import tempfile

    from .atomic import read_json_object
    from .prompt import CONFIG_FILE, TASK_FILE, read_config

    fs, root = _filesystem(url)
    root = root.rstrip("/")
    wanted = {posixpath.basename(rel): rel for rel in _prompt_files(fs, root, url)
              if posixpath.basename(rel) in (CONFIG_FILE, TASK_FILE)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rel in wanted.items():
            try:
                fs.get_file(f"{root}/{rel}", str(Path(tmp) / name))
            except OSError as e:
                raise PromptFileError(f"{url}/{rel}: cannot be read ({first_line(e)})") from None
        task = read_json_object(Path(tmp) / TASK_FILE) if TASK_FILE in wanted else None
        return read_config(Path(tmp)), task


def subfolders(url: str) -> list[tuple[str, str]]:
    """(name, URL) of each folder directly under `url`, names starting with '.' left out.

    Raises:
        ConfigError: no such folder (or none readable).
    """
    fs, root = _filesystem(url)
    root = root.rstrip("/")
    try:
        entries = fs.ls(root, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"prompt directory {url} does not exist") from None
    except OSError as e:
        raise ConfigError(f"prompt directory {url}: cannot be listed ({first_line(e)})") from None
    names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")
    return [(n, f"{url.rstrip('/')}/{n}") for n in names if n and not n.startswith(".")]


__all__ = ["fetch_folder", "is_url", "listing_token", "read_remote_config", "remote_cache", "subfolders"]
