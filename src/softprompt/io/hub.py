"""Prompt folders on the Hugging Face Hub: where a prompt source resolves to, and pushes.

A prompt source is a local folder or a Hub location written ``user/repo[@revision][:subdir]``:

    user/sst2                   the repository's root, branch main
    user/sst2@v1                a branch, tag or commit hash
    user/prompts:sst2           the folder sst2/ inside the repository (one repository, many prompts)
    user/prompts@3f2a...:rte    both

An fsspec URL (``s3://bucket/prompts/sst2``, ``gs://...``, ``memory://...``) is copied
into softprompt's cache first (`io.remote`). A local folder wins when one exists at that
path, so ``runs/sst2`` stays the run folder it always was; a `pathlib.Path` is always local. Everything else of that form is fetched with
`huggingface_hub.snapshot_download` into its cache (``HF_HUB_CACHE``, from ``HF_ENDPOINT``;
``HF_HUB_OFFLINE=1`` serves it from the cache alone). A download that did not finish never
loads: `snapshot_download` keeps unfinished files out of the snapshot folder and, when it
cannot reach the Hub, refuses a cached snapshot that its tree listing shows incomplete
(`IncompleteSnapshotError`); a prompt file of the wrong shape is refused by `io.prompt`.

Pushing is the other way: `push_prompt_folder` uploads a saved folder as one commit and
deletes the prompt files of an earlier push that the new folder lacks (a head, a trainable
state), so that a repository never mixes two prompts' files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, PromptFileError, first_line
from .prompt import CONFIG_FILE, PROMPT_FILES, read_config
from .remote import fetch_folder, is_url

# A namespace or repository name as the Hub takes it (huggingface_hub's validate_repo_id):
# letters, digits, '-', '_', '.', neither first nor last '-' or '.'; '--' and '..' are refused after the match.
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_TAIL = r"(?:@(?P<revision>[^:@\s]+))?(?::(?P<subfolder>[^:@\s]+))?"
_SPEC = re.compile(rf"(?P<repo>{_NAME}/{_NAME}){_TAIL}")
_SPEC_OR_BARE = re.compile(rf"(?P<repo>(?:{_NAME}/)?{_NAME}){_TAIL}")  # pushes: "repo" goes under the token's user



@dataclass(frozen=True)
class HubLocation:
    """A prompt folder on the Hub: repository, revision (None: main), folder inside it."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    @classmethod
    def parse(cls, spec: str, *, bare_name: bool = False) -> "HubLocation | None":
        """``user/repo[@revision][:subdir]`` as a location; None when `spec` is not of that
        form (a local path such as ``./x``, ``/x``, ``a/b/c``).

        Args:
            bare_name: also take ``repo`` without its user (pushes: the Hub puts it under
                the token's user).

        Raises:
            ConfigError: the form is right but the folder part leaves the repository (``..``).
        """
        match = (_SPEC_OR_BARE if bare_name else _SPEC).fullmatch(spec)
        if match is None or "--" in match["repo"] or ".." in match["repo"]:
            return None
        repo_id, subfolder = match["repo"], match["subfolder"]
        if subfolder is not None:
            parts = PurePosixPath(subfolder).parts
            if subfolder.startswith("/") or ".." in parts:
                raise ConfigError(f"{spec!r}: the folder after ':' must be a relative path inside the repository")
            subfolder = "/".join(parts)
        return cls(repo_id, match["revision"], subfolder or None)

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (
            f":{self.subfolder}" if self.subfolder else "")


def resolve_prompt_source(source: str | os.PathLike, *, revision: str | None = None,
                          token: str | bool | None = None) -> Path:
    """The local folder a prompt source names: the folder itself, or the Hub snapshot's.

    Args:
        source: a local folder (str or Path), ``user/repo[@revision][:subdir]`` (str), or
            an fsspec URL (str: ``s3://...``, copied into the cache by `io.remote`).
        revision: the revision when `source` names none (a Hub source only).
        token: Hub token for private repositories (default: ``HF_TOKEN`` or the stored login).

    Returns:
        A local path. A local source is returned as it is, existing or not: its loader
        reports what is missing, as before.

    Raises:
        ConfigError: `revision` differs from the one `source` names.
        PromptFileError: a Hub source that cannot be had (no such repository, revision or
            folder; Hub unreachable or offline without a complete cached copy); the
            message names the source.
    """
    if is_url(source):  # s3://, gs://, memory://, ...: copied into the cache (`io.remote`)
        if revision is not None:
            raise ConfigError(f"{source!r}: a revision is a Hub source's; an fsspec URL has none")
        return fetch_folder(source)
    if not isinstance(source, str) or Path(source).expanduser().exists():
        return Path(source).expanduser()
    location = HubLocation.parse(source)
    if location is None:
        return Path(source).expanduser()
    if revision is not None and location.revision not in (None, revision):
        raise ConfigError(f"{source!r} names revision {location.revision!r} but revision={revision!r} was given")
    if revision is not None:
        location = HubLocation(location.repo_id, revision, location.subfolder)
    return download(location, token=token)


def download(location: HubLocation, *, token: str | bool | None = None) -> Path:
    """`location`'s folder in the Hub cache, fetched (only that folder) if needed."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{location}: no such local folder, and"
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    try:
        root = snapshot_download(location.repo_id, revision=location.revision, token=token,
                                 allow_patterns=[f"{location.subfolder}/*"] if location.subfolder else None)
    except IncompleteSnapshotError:
        raise PromptFileError(f"{where} its copy in the Hub cache is incomplete (a download that did not finish), "
                              f"and the Hub cannot be reached{offline} to complete it") from None
    except LocalEntryNotFoundError:
        raise PromptFileError(f"{where} it is not in the Hub cache ({constants.HF_HUB_CACHE}) and the Hub "
                              f"({constants.ENDPOINT}) cannot be reached{offline}") from None
    except GatedRepoError:
        raise PromptFileError(f"{where} the Hub repository {location.repo_id!r} is gated: accept its conditions "
                              "on the Hub and log in (hf auth login, or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise PromptFileError(f"{where} there is no Hub repository {location.repo_id!r} that this login can read "
                              "(private repositories need HF_TOKEN or hf auth login)") from None
    except RevisionNotFoundError:
        raise PromptFileError(f"{where} the Hub repository {location.repo_id!r} has no revision "
                              f"{location.revision!r}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:  # a broken transfer, a full disk, a Hub error
        raise PromptFileError(f"{location}: download from the Hub failed ({type(e).__name__}: {first_line(e)})") from None
    folder = Path(root) / (location.subfolder or "")
    revision = location.revision or "main"
    if not folder.is_dir():
        raise PromptFileError(f"{location}: the Hub repository {location.repo_id!r} has no folder "
                              f"{location.subfolder!r} at revision {revision!r}")
    if (folder / CONFIG_FILE).is_file():
        return folder
    inside = sorted(p.parent.relative_to(folder).as_posix() for p in folder.rglob(CONFIG_FILE))
    if len(inside) == 1 and "/" not in inside[0]:
        return folder  # one prompt folder inside, as a run directory holds its prompt/: folder.prompt_directory
    if inside:
        example = HubLocation(location.repo_id, location.revision, inside[0])
        raise PromptFileError(f"{location}: no prompt at that level at revision {revision!r}; it holds the prompts "
                              f"{', '.join(inside)}: name one as {example}")
    raise PromptFileError(f"{location}: no {CONFIG_FILE} in it at revision {revision!r}: not a softprompt prompt")


def push_prompt_folder(folder: str | os.PathLike, destination: str, *, private: bool = True,
                       token: str | bool | None = None, commit_message: str | None = None) -> str:
    """Upload a saved prompt folder to ``user/repo[@branch][:subdir]`` as one commit.

    The repository (private by default) and the branch are created when missing. Prompt
    files of an earlier push that `folder` lacks are deleted in the same commit.

    Args:
        folder: a prompt folder (``prompt_config.json`` and the rest, as `save_pretrained`
            writes it).
        destination: ``user/repo`` (or ``repo``: under the token's user), optionally with
            ``@branch`` and ``:subdir``.
        private: create the repository private (an existing one keeps its visibility).
        token: Hub token with write access (default: ``HF_TOKEN`` or the stored login).
        commit_message: default "Upload <method> prompt with softprompt".

    Returns:
        The URL of the commit.

    Raises:
        PromptFileError: `folder` is not a prompt folder.
        ConfigError: a malformed destination, or the Hub refused the push (the reason named).
    """
    folder = Path(folder)
    method = read_config(folder)["method"]
    location = HubLocation.parse(destination, bare_name=True)
    if location is None:
        raise ConfigError(f"{destination!r} is not a Hub destination: write user/repo[@branch][:subdir]")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(location.repo_id, private=private, exist_ok=True).repo_id
        if location.revision not in (None, "main"):
            api.create_branch(repo_id, branch=location.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), path_in_repo=location.subfolder, revision=location.revision,
            commit_message=commit_message or f"Upload {method} prompt with softprompt",
            delete_patterns=list(PROMPT_FILES))
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        hint = (" (log in with hf auth login, set HF_TOKEN or pass a token with write access)"
                if status in (401, 403) else "")
        raise ConfigError(f"cannot push to {location}: {first_line(e)}{hint}") from None
    except (OSError, ValueError) as e:  # offline mode, an unreachable Hub, a rejected model card
        raise ConfigError(f"cannot push to {location}: {type(e).__name__}: {first_line(e)}") from None
    return str(commit.commit_url)


__all__ = ["HubLocation", "PROMPT_FILES", "download", "push_prompt_folder", "resolve_prompt_source"]
