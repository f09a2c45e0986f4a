"""A local stand-in for the Hugging Face Hub's write API, for tests.

It answers, over real HTTP on 127.0.0.1, the requests huggingface_hub's
`HfApi` makes to push a model: whoami, create_repo, repo info, validate-yaml,
preupload, the git-LFS batch / upload / verify protocol and the NDJSON commit.
It keeps what it receives (repos, files, LFS objects, commits, a request log)
so tests can compare it byte for byte with the local files. Accounts, tokens,
organisations and failures (an HTTP status, a malformed answer, a request held
until released) are set up by the test.

The client's xet transfer must be off against it (`HF_HUB_DISABLE_XET`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

LFS_PATTERNS = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|onnx|msgpack|gguf|npy|npz|pkl|zip|tar|gz)$")
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the Hub reports in preupload: sha256 for LFS, the git blob sha1 otherwise."""
        if self.lfs:
            return hashlib.sha256(self.data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    paths: list[str]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    files: dict[str, StoredFile] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1].oid


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = 1  # None: every matching request
    hold: bool = False  # keep the request waiting until release() or stop()
    raw: bytes | None = None  # send these bytes as the body instead of JSON


@dataclass
class Request:
    method: str
    path: str
    authenticated: bool
    headers: dict[str, str]
    body: bytes


class HubServer:
    """The server; use as a context manager or call start() / stop()."""

    def __init__(
        self,
        *,
        users: dict[str, str] | None = None,
        orgs: dict[str, set[str]] | None = None,
        tokens: dict[str, tuple[str, str]] | None = None,
        lfs_threshold: int = 10 * 1024 * 1024,
        names_unique_across_types: bool = True,
    ):
        self.users = users if users is not None else {"alice": "Alice Example"}
        self.orgs = orgs if orgs is not None else {"alice-lab": {"alice"}, "other-lab": set()}
        #: token -> (user, role) where role is "write" or "read"
        self.tokens = tokens if tokens is not None else {}
        self.lfs_threshold = lfs_threshold
        self.names_unique_across_types = names_unique_across_types
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self._tickets: dict[str, tuple[str, int]] = {}
        self._lock = threading.RLock()
        self._released = threading.Event()
        self._arrived = threading.Condition(self._lock)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> "HubServer":
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- set-up helpers -----------------------------------------------------
    def add_token(self, user: str, role: str = "write") -> str:
        token = "hf_" + uuid.uuid4().hex + uuid.uuid4().hex[:6]
        self.tokens[token] = (user, role)
        return token

    def add_repo(self, repo_type: str, repo_id: str, *, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        repo.files[".gitattributes"] = StoredFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)
        repo.commits.append(Commit(_new_oid(), "initial commit", "", [".gitattributes"]))
        for path, data in (files or {}).items():
            repo.files[path] = StoredFile(data, self._is_lfs(path, len(data)))
            if repo.files[path].lfs:
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def fail(self, method: str, path_regex: str, status: int = 500, body: Any = None, *, times: int | None = 1,
             headers: dict[str, str] | None = None, raw: bytes | None = None) -> Fault:
        """Answer the next `times` matching requests with `status` (and `body` or `raw` bytes)."""
        fault = Fault(method.upper(), re.compile(path_regex), status, body, headers or {}, times, raw=raw)
        self.faults.append(fault)
        return fault

    def hold(self, method: str, path_regex: str, *, times: int | None = 1) -> Fault:
        """Keep matching requests waiting until `release()`; then they are served normally."""
        fault = Fault(method.upper(), re.compile(path_regex), times=times, hold=True)
        self.faults.append(fault)
        return fault

    def release(self) -> None:
        self._released.set()

    def wait_for_request(self, method: str, path_regex: str, timeout: float = 10.0) -> Request:
        """Block until a matching request has arrived (it may still be held)."""
        pattern = re.compile(path_regex)
        with self._arrived:
            ok = self._arrived.wait_for(lambda: self._find(method, pattern) is not None, timeout)
            if not ok:
                raise TimeoutError(f"no {method} {path_regex} within {timeout} s")
            return self._find(method, pattern)

    def _find(self, method: str, pattern: re.Pattern) -> Request | None:
        for request in self.requests:
            if request.method == method.upper() and pattern.search(request.path):
                return request
        return None

    # -- inspection ---------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def count(self, method: str, path_regex: str) -> int:
        pattern = re.compile(path_regex)
        return sum(1 for r in self.requests if r.method == method.upper() and pattern.search(r.path))

    # -- the Hub's rules ----------------------------------------------------
    def _is_lfs(self, path: str, size: int) -> bool:
        return size > 0 and (LFS_PATTERNS.match(path) is not None or size >= self.lfs_threshold)

    def _namespaces(self, user: str) -> set[str]:
        return {user} | {org for org, members in self.orgs.items() if user in members}

    def _can_read(self, user: str | None, repo: Repo) -> bool:
        return not repo.private or (user is not None and repo.repo_id.split("/")[0] in self._namespaces(user))

    def _can_write(self, user: str | None, role: str | None, namespace: str) -> bool:
        return user is not None and role == "write" and namespace in self._namespaces(user)


def _new_oid() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex[:8]


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None):
        self.status, self.body, self.headers, self.raw = status, body, headers or {}, raw


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    server_version = "LocalHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    # -- plumbing -----------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self, method: str) -> None:
        hub = self.hub
        path = urlsplit(self.path).path
        body = self._read_body()
        auth = self.headers.get("Authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"}
        with hub._arrived:
            hub.requests.append(Request(method, path, token is not None, headers, body))
            hub._arrived.notify_all()
            fault = self._matching_fault(method, path)
        try:
            if fault is not None and fault.hold:
                hub._released.wait(60)
                fault = None
            if fault is not None:
                raise _Reply(fault.status, fault.body, fault.headers, fault.raw)
            self._route(method, path, body, token)
        except _Reply as reply:
            self._send(reply)

    def _matching_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.hub.faults:
            if fault.method == method and fault.pattern.search(path) and (fault.times is None or fault.times > 0):
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    def _send(self, reply: _Reply) -> None:
        if reply.raw is not None:
            data = reply.raw
            content_type = "application/json"
        else:
            data = json.dumps(reply.body if reply.body is not None else {}).encode()
            content_type = reply.headers.pop("Content-Type", "application/json")
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- auth ---------------------------------------------------------------
    def _identity(self, token: str | None, *, required: bool) -> tuple[str | None, str | None]:
        if token is None:
            if required:
                raise _Reply(401, {"error": "Unauthorized"})
            return None, None
        if token not in self.hub.tokens:
            raise _Reply(
                401,
                {"error": "Invalid credentials in Authorization header"},
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        return self.hub.tokens[token]

    # -- routes -------------------------------------------------------------
    def _route(self, method: str, path: str, body: bytes, token: str | None) -> None:
        hub = self.hub
        if method == "GET" and path == "/api/whoami-v2":
            return self._whoami(token)
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body or b"{}"), token)
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if method == "GET" and match:
            return self._repo_info(_REPO_TYPES[match[1]], unquote(match[2]), token)
        match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if method == "POST" and match:
            repo = self._writable_repo(_REPO_TYPES[match[1]], unquote(match[2]), token)
            if match[3] == "preupload":
                return self._preupload(repo, json.loads(body or b"{}"))
            return self._commit(repo, body)
        match = re.fullmatch(r"/(datasets/|spaces/)?([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)", path)
        if method == "POST" and match:
            repo_type = {"datasets/": "dataset", "spaces/": "space"}.get(match[1] or "", "model")
            self._writable_repo(repo_type, match[2], token)
            if match[3] == "batch":
                return self._lfs_batch(json.loads(body or b"{}"), path)
            payload = json.loads(body or b"{}")
            if payload.get("oid") not in hub.blobs:
                raise _Reply(404, {"error": "object not found"})
            raise _Reply(200, {"message": "verified"})
        match = re.fullmatch(r"/lfs-upload/([0-9a-f]+)", path)
        if method == "PUT" and match:
            return self._lfs_put(match[1], body)
        raise _Reply(404, {"error": f"no route for {method} {path}"})

    def _whoami(self, token: str | None) -> None:
        user, role = self._identity(token, required=True)
        orgs = [{"type": "org", "name": org, "roleInOrg": "write"} for org, members in self.hub.orgs.items() if user in members]
        raise _Reply(200, {
            "type": "user",
            "name": user,
            "fullname": self.hub.users.get(user, user),
            "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": {"displayName": "alloy-tests", "role": role}},
        })

    def _create(self, payload: dict, token: str | None) -> None:
        hub = self.hub
        user, role = self._identity(token, required=True)
        namespace = payload.get("organization") or user
        name = payload.get("name")
        repo_type = payload.get("type") or "model"
        if not name or repo_type not in _URL_PREFIX:
            raise _Reply(400, {"error": "bad request"})
        if namespace not in hub.users and namespace not in hub.orgs:
            raise _Reply(404, {"error": f"Namespace {namespace} does not exist"})
        if not hub._can_write(user, role, namespace):
            raise _Reply(403, {"error": f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"'})
        repo_id = f"{namespace}/{name}"
        with hub._lock:
            if (repo_type, repo_id) in hub.repos:
                raise _Reply(409, {"error": f"You already created this {repo_type} repo", "url": self._repo_url(repo_type, repo_id)})
            if hub.names_unique_across_types:
                for other in _URL_PREFIX:
                    if (other, repo_id) in hub.repos:
                        raise _Reply(409, {"error": f"A {other} repository with this name already exists"})
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            hub.add_repo(repo_type, repo_id, private=private)
        raise _Reply(200, {"url": self._repo_url(repo_type, repo_id), "name": repo_id, "id": uuid.uuid4().hex})

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _repo_info(self, repo_type: str, repo_id: str, token: str | None) -> None:
        user, _ = self._identity(token, required=False)
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or not self.hub._can_read(user, repo):
            raise _Reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        raise _Reply(200, {
            "id": repo_id,
            "sha": repo.sha,
            "private": repo.private,
            "siblings": [{"rfilename": p} for p in sorted(repo.files)],
        })

    def _writable_repo(self, repo_type: str, repo_id: str, token: str | None) -> Repo:
        user, role = self._identity(token, required=True)
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or not self.hub._can_read(user, repo):
            raise _Reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if not self.hub._can_write(user, role, repo_id.split("/")[0]):
            raise _Reply(403, {"error": "You don't have write access to this repository"})
        return repo

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content") or ""
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if match:
            try:
                data = yaml.safe_load(match[1])
            except yaml.YAMLError as exc:
                raise _Reply(400, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []})
            if data is not None and not isinstance(data, dict):
                raise _Reply(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        raise _Reply(200, {"errors": [], "warnings": []})

    def _preupload(self, repo: Repo, payload: dict) -> None:
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            existing = repo.files.get(path)
            files.append({
                "path": path,
                "uploadMode": "lfs" if self.hub._is_lfs(path, size) else "regular",
                "shouldIgnore": False,
                "oid": existing.oid if existing is not None else None,
            })
        raise _Reply(200, {"files": files, "commitOid": repo.sha})

    def _lfs_batch(self, payload: dict, path: str) -> None:
        hub = self.hub
        verify_href = hub.url + path[: -len("batch")] + "verify"
        if payload.get("operation") != "upload":
            raise _Reply(400, {"message": "only uploads"})
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if oid in hub.blobs and len(hub.blobs[oid]) == size:
                objects.append({"oid": oid, "size": size})
                continue
            ticket = uuid.uuid4().hex
            with hub._lock:
                hub._tickets[ticket] = (oid, size)
            objects.append({
                "oid": oid,
                "size": size,
                "authenticated": True,
                "actions": {
                    "upload": {"href": f"{hub.url}/lfs-upload/{ticket}", "header": {}},
                    "verify": {"href": verify_href, "header": {}},
                },
            })
        raise _Reply(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, ticket: str, body: bytes) -> None:
        hub = self.hub
        with hub._lock:
            expected = hub._tickets.pop(ticket, None)
        if expected is None:
            raise _Reply(403, {"error": "unknown upload ticket"})
        oid, size = expected
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise _Reply(400, {"error": "content does not match the announced oid/size"})
        with hub._lock:
            hub.blobs[oid] = body
        raise _Reply(200, {})

    def _commit(self, repo: Repo, body: bytes) -> None:
        hub = self.hub
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, {"error": "the first line must be the header"})
        header = lines[0]["value"]
        changes: dict[str, StoredFile | None] = {}
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Reply(400, {"error": "unsupported encoding"})
                changes[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                blob = hub.blobs.get(value["oid"])
                if blob is None or len(blob) != value["size"]:
                    raise _Reply(422, {"error": f"LFS object {value['oid']} for {value['path']} was not uploaded"})
                changes[value["path"]] = StoredFile(blob, True)
            elif key == "deletedFile":
                changes[value["path"]] = None
            else:
                raise _Reply(400, {"error": f"unsupported operation {key}"})
        with hub._lock:
            for path, stored in changes.items():
                if stored is None:
                    repo.files.pop(path, None)
                else:
                    repo.files[path] = stored
            commit = Commit(_new_oid(), header.get("summary", ""), header.get("description", ""), sorted(changes))
            repo.commits.append(commit)
        url = f"{self._repo_url(repo.repo_type, repo.repo_id)}/commit/{commit.oid}"
        raise _Reply(200, {"commitUrl": url, "commitOid": commit.oid, "success": True, "pullRequestUrl": None})


# -- pytest fixtures (import them into a test module) -------------------------

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

BIG_SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture
def hf_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub pointed at nothing of the user's: own HF_HOME, no env token, no xet."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    home.mkdir()
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return home


@pytest.fixture
def hub(hf_local: Path):
    with HubServer() as server:
        yield server


@pytest.fixture
def token(hub: HubServer) -> str:
    return hub.add_token("alice")


def _write_export(folder: Path) -> Path:
    """What an Alloy export looks like: two shards + index, config, card, recipe."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    big = {"model.embed.weight": rng.standard_normal((2700, 1024)).astype(np.float32)}  # 11.06 MB: LFS by size too
    small = {"lm_head.weight": rng.standard_normal((16, 32)).astype(np.float32), "bias": np.arange(5, dtype=np.int64)}
    save_file(big, str(folder / BIG_SHARD), metadata={"format": "pt"})
    save_file(small, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {name: BIG_SHARD for name in big} | {name: "model-00002-of-00002.safetensors" for name in small}
    total = sum(a.nbytes for a in big.values()) + sum(a.nbytes for a in small.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 1024}))
    recipe = "method: ties\nbase_model: org/base\nmodels:\n  - model: org/math\n  - model: org/code\nparameters:\n  density: 0.2\n"
    (folder / "alloy_recipe.yaml").write_text(recipe)
    (folder / "README.md").write_text(
        "---\nbase_model:\n- org/base\n- org/math\n- org/code\ntags:\n- merge\n- alloy\n"
        "library_name: transformers\nlicense: apache-2.0\n---\n\n# merged\n\nMerged with Alloy (TIES).\n\n"
        f"```yaml\n{recipe}```\n"
    )
    return folder


@pytest.fixture(scope="session")
def export_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_export(tmp_path_factory.mktemp("export") / "merged")


@pytest.fixture
def export_dir(export_template: Path, tmp_path: Path) -> Path:
    """A private copy of the fake export, free to edit."""
    return Path(shutil.copytree(export_template, tmp_path / "merged"))
