"""A Hugging Face Hub stand-in on 127.0.0.1, for the hub round-trip tests (no network).

It answers the routes `huggingface_hub` (2.x) calls for `snapshot_download` and for
`HfApi.create_repo` / `create_branch` / `upload_folder`, read from that package's source:

    POST /api/repos/create                          create a repository (409 + url if it exists)
    POST /api/validate-yaml                         the model card's metadata check
    GET  /api/models/{repo}[/revision/{rev}]        repository info: sha of the revision, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]     the file listing snapshot_download caches
    POST /api/models/{repo}/preupload/{rev}         upload modes: always "regular" (inline base64)
    POST /api/models/{repo}/commit/{rev}            an NDJSON commit: files added, files deleted
    POST /api/models/{repo}/branch/{branch}         a branch from main
    HEAD / GET /{repo}/resolve/{rev}/{path}         a file, with the commit, ETag and size headers

Repositories live in memory as git-like commits (path -> bytes), so a revision pinned by
commit hash keeps its files after later pushes. Errors carry the ``X-Error-Code`` headers
`huggingface_hub` turns into `RepositoryNotFoundError`, `RevisionNotFoundError`, ...

Writes need ``Authorization: Bearer <token>`` with a token of `tokens` (the real Hub refuses
anonymous writes); reads are open. `requests` records every request, so that a test can show
that a load made none; `truncate` names files whose downloads arrive cut short (a transfer
that broke), to show that a partial download never loads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def blob_id(data: bytes) -> str:
    """git's object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha
    private: bool = False

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """The stand-in server; `url` is its endpoint (HF_ENDPOINT)."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = tokens if tokens is not None else {"hf_test": USER}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.truncate: set[str] = set()
        self.commits_made = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- state ------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])

    def _new_commit(self, repo: Repo, files: dict[str, bytes]) -> str:
        self.commits_made += 1
        sha = hashlib.sha1(f"commit {self.commits_made} {sorted(files)}".encode()).hexdigest()
        repo.commits[sha] = files
        return sha

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def _commit_of(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    # -- routes -----------------------------------------------------------------------
    def create_repo(self, user: str, body: dict) -> tuple[int, dict]:
        repo_id = f"{body.get('organization') or user}/{body['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        repo = Repo(private=body.get("visibility") == "private")
        repo.refs["main"] = self._new_commit(repo, {".gitattributes": GITATTRIBUTES})
        self.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id}

    def info(self, repo_id: str, revision: str) -> dict:
        repo = self._repo(repo_id)
        sha = self._commit_of(repo, revision)
        return {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]}

    def tree(self, repo_id: str, revision: str, prefix: str) -> list[dict]:
        repo = self._repo(repo_id)
        files = repo.commits[self._commit_of(repo, revision)]
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        return [{"type": "file", "path": p, "size": len(data), "oid": blob_id(data)}
                for p, data in sorted(files.items()) if p.startswith(prefix)]

    def commit(self, repo_id: str, revision: str, lines: list[dict]) -> dict:
        repo = self._repo(repo_id)
        if revision not in repo.refs:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(repo.commits[repo.refs[revision]])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            elif key != "header":
                raise HubError(400, f"the stand-in does not take {key!r} operations")
        sha = self._new_commit(repo, files)
        repo.refs[revision] = sha
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True}


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest's output clean
            pass

        # -- plumbing ---------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  length: int | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, value) -> None:
            self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _user(self) -> str:
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            if token not in hub.tokens:
                raise HubError(401, "Invalid credentials in Authorization header")
            return hub.tokens[token]

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            hub.requests.append((self.command, url.path))
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            try:
                with hub._lock:
                    self._route(parts, parse_qs(url.query))
            except HubError as e:
                headers = {"Content-Type": "application/json", "X-Error-Message": e.message}
                if e.code:
                    headers["X-Error-Code"] = e.code
                self._send(e.status, json.dumps({"error": e.message}).encode(), headers)

        do_GET = do_POST = do_HEAD = _dispatch

        # -- routes -------------------------------------------------------------------
        def _route(self, parts: list[str], query: dict) -> None:
            method = self.command
            if parts[:3] == ["api", "repos", "create"] and method == "POST":
                status, value = hub.create_repo(self._user(), json.loads(self._body()))
                return self._json(status, value)
            if parts[:2] == ["api", "validate-yaml"]:
                self._body()
                return self._json(200, {})
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                if not rest and method == "GET":
                    return self._json(200, hub.info(repo_id, "main"))
                action = rest[0]
                if action == "revision" and method == "GET":
                    return self._json(200, hub.info(repo_id, rest[1]))
                if action == "tree" and method == "GET":
                    return self._json(200, hub.tree(repo_id, rest[1], "/".join(rest[2:])))
                if action == "preupload" and method == "POST":
                    self._user()
                    files = json.loads(self._body())["files"]
                    hub._commit_of(hub._repo(repo_id), rest[1])
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if action == "commit" and method == "POST":
                    self._user()
                    lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
                    return self._json(200, hub.commit(repo_id, rest[1], lines))
                if action == "branch" and method == "POST":
                    self._user()
                    repo = hub._repo(repo_id)
                    body = json.loads(self._body() or b"{}")
                    if rest[1] in repo.refs:
                        raise HubError(409, f"Branch {rest[1]} already exists")
                    repo.refs[rest[1]] = hub._commit_of(repo, body.get("startingPoint") or "main")
                    return self._json(200, {})
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                repo_id, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = hub._repo(repo_id)
                sha = hub._commit_of(repo, revision)
                files = repo.commits[sha]
                if path not in files:
                    raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
                data = files[path]
                headers = {"X-Repo-Commit": sha, "ETag": f'"{blob_id(data)}"',
                           "Content-Type": "application/octet-stream"}
                if method == "GET" and path in hub.truncate:
                    data = data[: len(data) // 2]  # a transfer cut short: fewer bytes than the HEAD announced
                return self._send(200, data, headers)
            raise HubError(404, f"the stand-in has no route {method} /{'/'.join(parts)}")

    return Handler


__all__ = ["FakeHub", "USER", "blob_id"]
