"""A local Hugging Face Hub-compatible HTTP server, and the context (:func:`hub_client_env`) that
points the real ``huggingface_hub`` client at it.

Only the endpoints huggingface_hub 1.33 really calls for downloading and publishing models
(read from its source: ``hf_api.py``, ``file_download.py``, ``_snapshot_download.py``,
``_commit_api.py``, ``lfs.py``):

=======  ===============================================  =============================================
method   path                                             client call
=======  ===============================================  =============================================
GET      /api/models/{repo}                               ``model_info`` / ``repo_info`` (main)
GET      /api/models/{repo}/revision/{rev}                ``model_info(revision=)``, ``snapshot_download``
GET      /api/models/{repo}/tree/{rev}[/{path}]           ``list_repo_tree`` (paginated with ``Link``)
GET      /api/models/{repo}/refs                          ``list_repo_refs``
HEAD/GET /{repo}/resolve/{rev}/{path}                     ``hf_hub_download`` (ETag, X-Repo-Commit,
                                                          Content-Length; LFS files: 302 to a signed
                                                          storage URL on another host + X-Linked-Etag
                                                          / X-Linked-Size, as the real Hub)
GET      /lfs-storage/{oid}?sig=                          the "CDN" (host ``localhost``, no auth)
POST     /api/repos/create                                ``create_repo`` (409 when it exists)
POST     /api/models/{repo}/branch/{branch}               ``create_branch`` (409 when it exists)
POST     /api/validate-yaml                               ``create_commit`` with a README.md
POST     /api/models/{repo}/preupload/{rev}               upload modes (regular / lfs) + remote oids
POST     /{repo}.git/info/lfs/objects/batch               LFS batch: basic, or multipart above
                                                          ``multipart_chunk`` bytes
PUT      /lfs-storage/{oid}[/part/{n}]?sig=               object / part upload (sha256 checked)
POST     /lfs-storage/{oid}/complete?sig=                 multipart completion
POST     /{repo}.git/info/lfs/objects/verify              LFS verify
POST     /api/models/{repo}/commit/{rev}                  NDJSON commit (file, lfsFile, deletedFile,
                                                          deletedFolder; 412 on a stale parentCommit)
GET      /api/whoami-v2                                   ``whoami``
=======  ===============================================  =============================================

Xet is not offered (no ``X-Xet-*`` headers), so the client must run with Xet disabled: it reads
``HF_HUB_DISABLE_XET`` into ``huggingface_hub.constants`` at import, and :func:`hub_client_env` patches
that constant (and ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE``, ``HF_TOKEN_PATH``), which the client reads at call time.

Repos live in a temp folder: ``repos/<owner>/<name>.json`` (refs, commits with their trees,
visibility) and ``objects/<sha256>`` (file contents). Commit, tree and blob ids are real git
object ids (SHA-1 of the git objects; LFS files are stored in git as their pointer files).
Tokens map to ``(user, role)``; a missing or unknown token, or a read token, cannot write.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock
from urllib.parse import quote, unquote, urlencode

import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelfactory.testing.env import settings_env

WRITE_TOKEN = "hf_modelfactoryTestWriteToken0000000001"
READ_TOKEN = "hf_modelfactoryTestReadToken00000000002"
OWNER = "acme"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".onnx", ".msgpack", ".model",
                ".zip", ".gz", ".npy", ".npz", ".pkl", ".tflite")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
REGULAR_MAX = 5 * 1024 * 1024  # larger files must go through LFS
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}

    def response(self) -> Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


# --------------------------------------------------------------------------- git objects
def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_tree_oid(files: dict[str, dict], prefix: str = "") -> str:
    """Git tree id of the files under *prefix* (nested trees hashed recursively)."""
    entries: list[tuple[str, bytes]] = []
    children: set[str] = set()
    for path, entry in files.items():
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if "/" in rest:
            children.add(rest.split("/", 1)[0])
        else:
            entries.append((rest, b"100644 " + rest.encode() + b"\0" + bytes.fromhex(entry["oid"])))
    for child in children:
        oid = git_tree_oid(files, prefix + child + "/")
        entries.append((child + "/", b"40000 " + child.encode() + b"\0" + bytes.fromhex(oid)))
    body = b"".join(e for _, e in sorted(entries))
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def git_commit_oid(tree: str, parent: str | None, message: str, when: int) -> str:
    lines = [f"tree {tree}"] + ([f"parent {parent}"] if parent else [])
    who = f"hub <hub@localhost> {when} +0000"
    body = ("\n".join(lines + [f"author {who}", f"committer {who}", "", message]) + "\n").encode()
    return hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()


# --------------------------------------------------------------------------- storage
@dataclass
class Repo:
    id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit
    commits: dict[str, dict] = field(default_factory=dict)  # oid -> {parent, tree, files, title, ...}
    created_at: str = ""

    def resolve(self, rev: str) -> str:
        if rev in self.refs:
            return self.refs[rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in self.commits:
            return rev
        raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


class HubStore:
    """Repos + object storage in a folder."""

    def __init__(self, root: Path):
        self.root = root
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "repos").mkdir(exist_ok=True)
        (root / "uploads").mkdir(exist_ok=True)
        self.repos: dict[str, Repo] = {}

    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        path = self.object_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_object(sha):
            self.object_path(sha).write_bytes(data)
        return sha

    def save(self, repo: Repo) -> None:
        path = self.root / "repos" / f"{repo.id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"id": repo.id, "private": repo.private, "refs": repo.refs,
                                    "commits": repo.commits}, indent=1))

    def commit(self, repo: Repo, *, branch: str, files: dict[str, dict], title: str, description: str = "",
               parent: str | None) -> str:
        when = int(time.time())
        tree = git_tree_oid(files)
        message = title + ("\n\n" + description if description else "")
        oid = git_commit_oid(tree, parent, message, when)
        repo.commits[oid] = {"parent": parent, "tree": tree, "files": files, "title": title,
                             "description": description, "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                                                                               time.gmtime(when))}
        repo.refs[branch] = oid
        self.save(repo)
        return oid

    def regular_entry(self, data: bytes) -> dict:
        return {"sha256": self.put_bytes(data), "size": len(data), "lfs": False, "oid": git_blob_oid(data)}

    def lfs_entry(self, sha256: str, size: int) -> dict:
        return {"sha256": sha256, "size": size, "lfs": True, "oid": git_blob_oid(lfs_pointer(sha256, size))}


# --------------------------------------------------------------------------- the app
class LocalHub:
    """The server: ``LocalHub(root).start()``; ``.endpoint`` is its base URL."""

    def __init__(self, root: Path, *, tokens: dict[str, tuple[str, str]] | None = None, page_size: int = 50,
                 multipart_chunk: int = 4 * 1024 * 1024):
        self.store = HubStore(root)
        self.tokens = tokens if tokens is not None else {WRITE_TOKEN: (OWNER, "write"), READ_TOKEN: (OWNER, "read")}
        self.page_size = page_size
        self.multipart_chunk = multipart_chunk
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.failures: list[tuple[str, re.Pattern, int]] = []  # injected (method, path regex, status)
        self.secret = os.urandom(16)
        self.port = 0
        self._server = None
        self._thread: threading.Thread | None = None
        self.routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)", self.model_info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)", self.model_info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/refs", self.refs),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self.tree),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)", self.create_branch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self.commit),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/verify", self.lfs_verify),
            ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", self.lfs_put),
            ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})/part/(?P<part>\d+)", self.lfs_put_part),
            ("POST", r"/lfs-storage/(?P<oid>[0-9a-f]{64})/complete", self.lfs_complete),
            ("GET", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", self.lfs_get),
            ("HEAD", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", self.lfs_get),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
        ]
        self.app = Starlette(routes=[Route("/{rest:path}", self.dispatch,
                                           methods=["GET", "HEAD", "POST", "PUT", "DELETE"])])

    # ----------------------------------------------------------------- lifecycle
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage(self) -> str:
        """The 'CDN' base: another host name for the same server, as the Hub's signed storage URLs."""
        return f"http://localhost:{self.port}"

    def start(self) -> LocalHub:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="local-hub")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("local Hub server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def fail_next(self, method: str, path_regex: str, status: int) -> None:
        """Answer the next matching request with *status* (failure injection)."""
        self.failures.append((method, re.compile(path_regex), status))

    def calls(self, method: str, path_regex: str) -> list[tuple[str, str, int]]:
        return [r for r in self.requests if r[0] == method and re.search(path_regex, r[1])]

    # ----------------------------------------------------------------- admin (tests)
    def repo(self, repo_id: str) -> Repo:
        return self.store.repos[repo_id]

    # ----------------------------------------------------------------- plumbing
    async def dispatch(self, request: Request) -> Response:
        raw = request.scope.get("raw_path", request.url.path.encode()).decode().split("?", 1)[0]
        method = request.method
        response: Response
        try:
            for i, (m, regex, status) in enumerate(self.failures):
                if m == method and regex.search(raw):
                    del self.failures[i]
                    raise HubHTTPError(status, f"injected failure {status}")
            for m, pattern, handler in self.routes:
                match = re.fullmatch(pattern, raw)
                if m == method and match:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    response = await handler(request, **params)
                    break
            else:
                raise HubHTTPError(404, f"no route for {method} {raw}")
        except HubHTTPError as exc:
            response = exc.response()
        self.requests.append((method, raw, response.status_code))
        return response

    def user(self, request: Request) -> tuple[str, str] | None:
        auth = request.headers.get("authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def need_write(self, request: Request, namespace: str) -> str:
        who = self.user(request)
        if who is None:
            raise HubHTTPError(401, "You must be authenticated to do this (no token)")
        user, role = who
        if role != "write":
            raise HubHTTPError(403, "You don't have the rights to write with a read token")
        if namespace != user:
            raise HubHTTPError(403, f"You don't have the rights to write under the namespace {namespace}")
        return user

    def readable(self, request: Request, repo_id: str) -> Repo:
        repo = self.store.repos.get(repo_id)
        who = self.user(request)
        if repo is None or (repo.private and (who is None or who[0] != repo_id.split("/")[0])):
            raise HubHTTPError(401 if who is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, request: Request, repo_id: str) -> Repo:
        repo = self.readable(request, repo_id)
        self.need_write(request, repo_id.split("/")[0])
        return repo

    def sign(self, oid: str, action: str) -> str:
        sig = hmac.new(self.secret, f"{action}:{oid}".encode(), "sha256").hexdigest()
        return urlencode({"X-Amz-Expires": "3600", "X-Amz-Signature": sig})

    def check_sig(self, request: Request, oid: str, action: str) -> None:
        expected = hmac.new(self.secret, f"{action}:{oid}".encode(), "sha256").hexdigest()
        if not hmac.compare_digest(request.query_params.get("X-Amz-Signature", ""), expected):
            raise HubHTTPError(403, "SignatureDoesNotMatch")

    # ----------------------------------------------------------------- account / repos
    async def whoami(self, request: Request) -> Response:
        who = self.user(request)
        if who is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return JSONResponse({"type": "user", "name": who[0], "orgs": [],
                             "auth": {"accessToken": {"role": who[1], "displayName": "test"}}})

    async def create_repo(self, request: Request) -> Response:
        body = await request.json()
        if body.get("type") not in (None, "model"):
            raise HubHTTPError(400, "this local Hub only hosts model repos")
        who = self.user(request)
        namespace = body.get("organization") or (who[0] if who else "")
        self.need_write(request, namespace)
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.store.repos:
            return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
        repo = Repo(id=repo_id, private=body.get("visibility") == "private" or bool(body.get("private")),
                    created_at=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        self.store.repos[repo_id] = repo
        self.store.commit(repo, branch="main", files={".gitattributes": self.store.regular_entry(GITATTRIBUTES)},
                          title="initial commit", parent=None)
        return JSONResponse({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    async def create_branch(self, request: Request, repo: str, branch: str) -> Response:
        r = self.writable(request, repo)
        body = await request.json() if (await request.body()) else {}
        start = r.resolve(body.get("startingPoint") or "main")
        if branch in r.refs:
            raise HubHTTPError(409, f"Reference already exists: refs/heads/{branch}")
        r.refs[branch] = start
        self.store.save(r)
        return JSONResponse({})

    async def validate_yaml(self, request: Request) -> Response:
        body = await request.json()
        content: str = body.get("content", "")
        errors = []
        if content.startswith("---"):
            parts = content.split("\n---", 1)
            try:
                meta = yaml.safe_load(parts[0].removeprefix("---")) or {}
            except yaml.YAMLError as exc:
                meta, errors = {}, [{"message": f"YAML error: {exc}"}]
            if not isinstance(meta, dict):
                errors.append({"message": "metadata must be a YAML mapping"})
            else:
                relation = meta.get("base_model_relation")
                if relation is not None and relation not in BASE_MODEL_RELATIONS:
                    errors.append({"message": f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}'})
                if relation is not None and not meta.get("base_model"):
                    errors.append({"message": '"base_model_relation" needs "base_model"'})
                if "tags" in meta and not isinstance(meta["tags"], list):
                    errors.append({"message": '"tags" must be an array'})
        return JSONResponse({"errors": errors, "warnings": []}, status_code=400 if errors else 200)

    # ----------------------------------------------------------------- reading
    async def model_info(self, request: Request, repo: str, rev: str = "main") -> Response:
        r = self.readable(request, repo)
        sha = r.resolve(rev)
        commit = r.commits[sha]
        files = commit["files"]
        card = {}
        if "README.md" in files:
            text = self.store.object_path(files["README.md"]["sha256"]).read_text()
            if text.startswith("---"):
                card = yaml.safe_load(text.split("\n---", 1)[0].removeprefix("---")) or {}
        return JSONResponse({
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
            "author": repo.split("/")[0], "sha": sha, "private": r.private, "gated": False, "disabled": False,
            "lastModified": commit["date"], "createdAt": r.created_at, "downloads": 0, "likes": 0,
            "tags": card.get("tags", []), "library_name": card.get("library_name"), "cardData": card or None,
            "siblings": [{"rfilename": p} for p in sorted(files)],
        })

    async def refs(self, request: Request, repo: str) -> Response:
        r = self.readable(request, repo)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(r.refs.items())]
        return JSONResponse({"branches": branches, "tags": [], "converts": []})

    def tree_entries(self, files: dict[str, dict], path: str, recursive: bool) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        out: dict[str, dict] = {}
        for p, e in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # folders on the way
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in out:
                    out[folder] = {"type": "directory", "path": folder, "size": 0,
                                   "oid": git_tree_oid(files, folder + "/")}
            if recursive or len(parts) == 1:
                entry = {"type": "file", "path": p, "size": e["size"], "oid": e["oid"]}
                if e["lfs"]:
                    entry["lfs"] = {"oid": e["sha256"], "size": e["size"],
                                    "pointerSize": len(lfs_pointer(e["sha256"], e["size"]))}
                out[p] = entry
        if prefix and not out:
            raise HubHTTPError(404, f"{path} does not exist", "EntryNotFound")
        return list(out.values())

    async def tree(self, request: Request, repo: str, rev: str, path: str = "") -> Response:
        r = self.readable(request, repo)
        sha = r.resolve(rev)
        recursive = request.query_params.get("recursive", "false").lower() in ("1", "true")
        entries = self.tree_entries(r.commits[sha]["files"], path, recursive)
        cursor = int(request.query_params.get("cursor", "0"))
        page = entries[cursor:cursor + self.page_size]
        headers = {}
        if cursor + self.page_size < len(entries):
            query = urlencode({**dict(request.query_params), "cursor": cursor + self.page_size})
            raw = request.scope["raw_path"].decode()
            headers["Link"] = f'<{self.endpoint}{raw}?{query}>; rel="next"'
        return JSONResponse(page, headers=headers)

    async def resolve(self, request: Request, repo: str, rev: str, path: str) -> Response:
        r = self.readable(request, repo)
        sha = r.resolve(rev)
        entry = r.commits[sha]["files"].get(path)
        if entry is None:
            raise HubHTTPError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry["lfs"]:  # like the Hub: a redirect to signed storage on another host
            location = f"{self.storage}/lfs-storage/{entry['sha256']}?{self.sign(entry['sha256'], 'get')}"
            headers.update({"Location": location, "ETag": f'"{entry["oid"]}"',
                            "X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
            return Response(status_code=302, headers=headers)
        headers["ETag"] = f'"{entry["oid"]}"'
        return self.file_response(request, self.store.object_path(entry["sha256"]), headers)

    def file_response(self, request: Request, path: Path, headers: dict) -> Response:
        data = path.read_bytes()
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("range", ""))
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        headers["Content-Length"] = str(len(data))
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")
        return Response(data, status_code=status, headers=headers, media_type="application/octet-stream")

    async def lfs_get(self, request: Request, oid: str) -> Response:
        self.check_sig(request, oid, "get")
        if not self.store.has_object(oid):
            raise HubHTTPError(404, "NoSuchKey")
        return self.file_response(request, self.store.object_path(oid), {"ETag": f'"{oid}"'})

    # ----------------------------------------------------------------- writing
    async def preupload(self, request: Request, repo: str, rev: str) -> Response:
        r = self.writable(request, repo)
        sha = r.resolve(rev)
        files = r.commits[sha]["files"]
        out = []
        for f in (await request.json())["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["size"] > REGULAR_MAX or f["path"].endswith(LFS_SUFFIXES) or b"\x00" in sample
            remote = files.get(f["path"])
            remote_oid = (remote["sha256"] if remote["lfs"] else remote["oid"]) if remote else None
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": remote_oid})
        return JSONResponse({"files": out, "commitOid": sha})

    async def lfs_batch(self, request: Request, repo: str) -> Response:
        self.writable(request, repo)
        body = await request.json()
        if body.get("operation") != "upload" or body.get("hash_algo", "sha256") != "sha256":
            raise HubHTTPError(400, "only sha256 uploads are supported")
        transfers = body.get("transfers") or ["basic"]
        verify = {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/verify", "header": {}}
        objects, chosen = [], "basic"
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            if self.store.has_object(oid, size):
                objects.append({"oid": oid, "size": size, "authenticated": True})
                continue
            if size > self.multipart_chunk and "multipart" in transfers:
                chosen = "multipart"
                n = -(-size // self.multipart_chunk)
                header = {"chunk_size": str(self.multipart_chunk)}
                header.update({str(i): f"{self.storage}/lfs-storage/{oid}/part/{i}?{self.sign(oid, 'put')}"
                               for i in range(1, n + 1)})
                upload = {"href": f"{self.storage}/lfs-storage/{oid}/complete?{self.sign(oid, 'put')}",
                          "header": header}
            else:
                upload = {"href": f"{self.storage}/lfs-storage/{oid}?{self.sign(oid, 'put')}", "header": {}}
            objects.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": {"upload": upload, "verify": verify}})
        return JSONResponse({"transfer": chosen, "objects": objects, "hash_algo": "sha256"})

    async def _receive(self, request: Request, target: Path) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        with target.open("wb") as out:
            async for chunk in request.stream():
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        return digest.hexdigest(), size

    async def lfs_put(self, request: Request, oid: str) -> Response:
        self.check_sig(request, oid, "put")
        tmp = self.store.root / "uploads" / f"{oid}.{os.urandom(4).hex()}"
        sha, _ = await self._receive(request, tmp)
        if sha != oid:
            tmp.unlink()
            raise HubHTTPError(400, f"content sha256 {sha} does not match the object id {oid}")
        os.replace(tmp, self.store.object_path(oid))
        return Response(status_code=200, headers={"ETag": f'"{oid}"'})

    async def lfs_put_part(self, request: Request, oid: str, part: str) -> Response:
        self.check_sig(request, oid, "put")
        target = self.store.root / "uploads" / f"{oid}.part{int(part):05d}"
        await self._receive(request, target)
        return Response(status_code=200, headers={"ETag": f'"{hashlib.md5(target.read_bytes()).hexdigest()}"'})

    async def lfs_complete(self, request: Request, oid: str) -> Response:
        self.check_sig(request, oid, "put")
        body = await request.json()
        parts = sorted(body["parts"], key=lambda p: p["partNumber"])
        digest, tmp = hashlib.sha256(), self.store.root / "uploads" / f"{oid}.assembled"
        with tmp.open("wb") as out:
            for p in parts:
                part = self.store.root / "uploads" / f"{oid}.part{p['partNumber']:05d}"
                data = part.read_bytes()
                if f'"{hashlib.md5(data).hexdigest()}"' != p["etag"]:
                    raise HubHTTPError(400, f"part {p['partNumber']} etag mismatch")
                digest.update(data)
                out.write(data)
                part.unlink()
        if digest.hexdigest() != oid:
            tmp.unlink()
            raise HubHTTPError(400, f"assembled content does not match the object id {oid}")
        os.replace(tmp, self.store.object_path(oid))
        return JSONResponse({})

    async def lfs_verify(self, request: Request, repo: str) -> Response:
        self.writable(request, repo)
        body = await request.json()
        if not self.store.has_object(body["oid"], body["size"]):
            raise HubHTTPError(404, f"object {body['oid']} ({body['size']} bytes) was not uploaded")
        return JSONResponse({})

    async def commit(self, request: Request, repo: str, rev: str) -> Response:
        r = self.writable(request, repo)
        if rev not in r.refs:
            raise HubHTTPError(404, f"Invalid rev id: {rev} (commits go to branches)", "RevisionNotFound")
        lines = [json.loads(line) for line in (await request.body()).decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the first NDJSON line must be the commit header")
        header = lines[0]["value"]
        head = r.refs[rev]
        parent = header.get("parentCommit")
        if parent is not None and parent != head:
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(r.commits[head]["files"])
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = self.store.regular_entry(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                if not self.store.has_object(value["oid"], value.get("size")):
                    raise HubHTTPError(400, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                size = value.get("size") or self.store.object_path(value["oid"]).stat().st_size
                files[value["path"]] = self.store.lfs_entry(value["oid"], size)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubHTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            else:
                raise HubHTTPError(400, f"unknown commit operation {key!r}")
        oid = self.store.commit(r, branch=rev, files=files, title=header.get("summary", ""),
                                description=header.get("description", ""), parent=head)
        return JSONResponse({"success": True, "commitOid": oid, "commitUrl": f"{self.endpoint}/{repo}/commit/{oid}",
                             "hookOutput": ""})


# --------------------------------------------------------------------------- client wiring
@contextlib.contextmanager
def hub_client_env(endpoint: str, cache: Path, *, token: str | None = WRITE_TOKEN) -> Iterator[None]:
    """Point the real huggingface_hub client at *endpoint* (online, Xet off, own cache, *token*).

    huggingface_hub reads these variables into ``huggingface_hub.constants`` when it is imported;
    its functions read the constants at call time, so both are set (and restored afterwards).
    """
    from huggingface_hub import constants

    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_CACHE": str(cache),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": token or None, "HUGGING_FACE_HUB_TOKEN": None,
           "MODELFACTORY_HF_TOKEN_SECRET": None}
    hub_constants = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HUB_CACHE": str(cache),
        "HF_TOKEN_PATH": str(cache / "no-saved-token"), "HF_STORED_TOKENS_PATH": str(cache / "no-saved-tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    # settings_env clears the factory's settings cache on the way in and out.
    with settings_env(**env), mock.patch.multiple(constants, **hub_constants):
        yield


def upload_model(server: LocalHub, folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Create *repo_id* and push *folder* to main through the real client; returns the commit SHA."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=server.endpoint, token=WRITE_TOKEN)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"add {folder.name}").oid


def repo_url(server: LocalHub, repo_id: str, *parts: str) -> str:
    return "/".join([server.endpoint, repo_id, *(quote(p, safe="") for p in parts)])
