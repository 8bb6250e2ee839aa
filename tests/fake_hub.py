"""A small in-memory stand-in for the Hugging Face Hub, served on loopback for the real client.

It answers only what ``cpl_masks.hub`` calls through ``huggingface_hub``: repo creation, branch
creation, model card validation, preupload (every file "regular", so contents travel inline in the
commit), commits, model info (optionally at a revision) and ``resolve`` downloads with the
ETag / X-Repo-Commit / Content-Length headers the download cache relies on.
Tokens other than :data:`TOKEN` get a 401.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "hf_fake_valid_token"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = (
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"), "resolve"),
)


class HubError(Exception):
    """An HTTP error answer: status, and the X-Error-Code the client maps to an exception class."""

    def __init__(self, status: int, code: str | None = None, message: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Repo:
    """A model repo: branches pointing at commits, each commit a full snapshot of files."""

    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]]:
        sha = self.branches.get(revision, revision)
        if sha not in self.commits:
            raise HubError(404, "RevisionNotFound", f"revision {revision} not found")
        return sha, self.commits[sha]


class FakeHub:
    """The Hub's state and the handlers for each route."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "RepoNotFound", f"repository {repo_id} not found")
        return self.repos[repo_id]

    def create_repo(self, body: bytes, **_: str) -> dict[str, Any]:
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            raise HubError(409, None, "You already created this model repo")
        repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        empty = hashlib.sha1(repo_id.encode()).hexdigest()
        repo.commits[empty], repo.branches["main"] = {".gitattributes": b""}, empty
        self.repos[repo_id] = repo
        return {"url": f"/{repo_id}", "name": repo_id}

    def validate_yaml(self, body: bytes) -> dict[str, Any]:
        return {"errors": [], "warnings": []}

    def create_branch(self, body: bytes, repo: str, rev: str) -> dict[str, Any]:
        found = self.repo(repo)
        if rev in found.branches:
            raise HubError(409, None, "Reference already exists")
        found.branches[rev] = found.branches["main"]
        return {}

    def preupload(self, body: bytes, repo: str, rev: str) -> dict[str, Any]:
        self.repo(repo).snapshot(rev)
        files = json.loads(body)["files"]
        return {"files": [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False} for item in files]}

    def commit(self, body: bytes, repo: str, rev: str) -> dict[str, Any]:
        found = self.repo(repo)
        _, files = found.snapshot(rev)
        files = dict(files)
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        sha = hashlib.sha1(
            json.dumps(sorted((k, v.hex()) for k, v in files.items())).encode() + rev.encode()
        ).hexdigest()
        found.commits[sha], found.branches[rev] = files, sha
        return {"commitUrl": f"/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

    def model_info(self, body: bytes, repo: str, rev: str | None) -> dict[str, Any]:
        sha, files = self.repo(repo).snapshot(rev or "main")
        return {
            "id": repo,
            "sha": sha,
            "private": self.repos[repo].private,
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }

    def resolve(self, body: bytes, repo: str, rev: str, file: str) -> tuple[bytes, dict[str, str]]:
        sha, files = self.repo(repo).snapshot(rev)
        if file not in files:
            raise HubError(404, "EntryNotFound", f"{file} not found")
        content = files[file]
        return content, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}

    def tamper(self, repo_id: str, filename: str, content: bytes) -> None:
        """Replace a file in the head of ``main`` without a new commit id (a corrupted mirror)."""
        repo = self.repos[repo_id]
        repo.commits[repo.branches["main"]][filename] = content


def make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one :class:`FakeHub`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            self.dispatch("GET")

        def do_HEAD(self) -> None:
            self.dispatch("HEAD")

        def do_POST(self) -> None:
            self.dispatch("POST")

        def dispatch(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?")[0]
            try:
                self.check_token()
                for verb, pattern, action in _ROUTES:
                    match = pattern.match(path)
                    if verb == method and match:
                        with hub.lock:
                            result = getattr(hub, action)(body, **match.groupdict())
                        break
                else:
                    raise HubError(404, None, f"no route {method} {path}")
            except HubError as error:
                self.answer(
                    error.status,
                    json.dumps({"error": error.message}).encode(),
                    method,
                    {"X-Error-Code": error.code or "", "X-Error-Message": error.message},
                )
                return
            content, headers = result if isinstance(result, tuple) else (json.dumps(result).encode(), {})
            self.answer(200, content, method, headers)

        def check_token(self) -> None:
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if given and given != TOKEN:
                raise HubError(401, None, "Invalid credentials in Authorization header")

        def answer(self, status: int, content: bytes, method: str, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                if value:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(content)

    return Handler


class FakeHubServer:
    """The fake Hub on a free loopback port, served from a daemon thread until :meth:`close`."""

    def __init__(self) -> None:
        self.hub = FakeHub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.hub))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
