"""A small fake Hugging Face Hub on 127.0.0.1: just the endpoints `push_to_hub` and `from_pretrained` use.

Repos live in memory: {repo_id: {path: bytes}}. Uploads follow the two protocols huggingface_hub speaks when
Xet is disabled (`HF_HUB_DISABLE_XET=1`), as the real Hub answers them:
- "regular" files (small, not matching an LFS pattern) travel base64-encoded in the commit's NDJSON body;
- "lfs" files (weights, or 10 MB and more) are announced to the LFS batch endpoint, PUT to a storage URL,
  verified, then committed as `lfsFile` pointers (sha256 + size).
Downloads of LFS files are redirected to a "CDN" (the same server reached as `localhost`, another host for the
client), with the metadata (X-Linked-Etag, X-Linked-Size, X-Repo-Commit) on the redirect, as the Hub does.
Every request is logged in `requests` as "METHOD path" so tests can see what the client did.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_LFS_MIN_SIZE = 10 * 1024 * 1024
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_REPO_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<verb>preupload|commit)/(?P<revision>[^/]+)$")
_REPO_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?$")
_LFS_API = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/(?P<verb>batch|verify)$")
_STORAGE = re.compile(r"^/lfs-storage/(?P<oid>[0-9a-f]{64})$")


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.lfs_files: dict[str, set[str]] = {}  # repo -> paths committed as LFS pointers
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content uploaded to the storage
        self.commits: dict[str, str] = {}  # repo -> last commit id
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def storage(self) -> str:
        """The LFS storage / CDN: the same server under another host name, as the client sees hosts."""
        return f"http://localhost:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(hub):  # noqa: N805  (the handler class closes over the hub)
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
                self._reply(
                    status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
                )

            def _error(self, status: int, code: str) -> None:
                self._json(status, {"error": code}, {"X-Error-Code": code, "X-Error-Message": code})

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _path(self) -> str:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                return path

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                path = self._path()
                if match := _RESOLVE.match(path):
                    return self._resolve(match["repo"], match["path"])
                if match := _STORAGE.match(path):
                    if match["oid"] not in hub.lfs_objects:
                        return self._error(404, "NotFound")
                    return self._reply(200, hub.lfs_objects[match["oid"]], {"ETag": f'"{match["oid"]}"'})
                if match := _REPO_INFO.match(path):
                    return self._repo_info(match["repo"])
                self._error(404, "NotFound")

            def do_PUT(self) -> None:
                path = self._path()
                body = self._body()
                if (match := _STORAGE.match(path)) and hashlib.sha256(body).hexdigest() == match["oid"]:
                    hub.lfs_objects[match["oid"]] = body
                    return self._reply(200)
                self._error(400, "BadUpload")

            def do_POST(self) -> None:
                path = self._path()
                body = self._body()
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request.get('organization') or 'user'}/{request['name']}"
                    if repo not in hub.repos:
                        hub.repos[repo], hub.lfs_files[repo] = {}, set()
                        hub.commits[repo] = hashlib.sha1(repo.encode()).hexdigest()
                    return self._json(200, {"url": f"{hub.endpoint}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                match = _REPO_API.match(path) or _LFS_API.match(path)
                if match is None or match["repo"] not in hub.repos:
                    return self._error(404, "RepoNotFound")
                if match["verb"] == "preupload":
                    return self._json(
                        200,
                        {
                            "files": [
                                {
                                    "path": f["path"],
                                    "uploadMode": "lfs" if self._is_lfs(f) else "regular",
                                    "shouldIgnore": False,
                                }
                                for f in json.loads(body)["files"]
                            ]
                        },
                    )
                if match["verb"] == "batch":
                    return self._lfs_batch(match["repo"], json.loads(body))
                if match["verb"] == "verify":
                    request = json.loads(body)
                    stored = hub.lfs_objects.get(request["oid"])
                    return (
                        self._reply(200)
                        if stored is not None and len(stored) == request["size"]
                        else self._error(404, "ObjectNotFound")
                    )
                return self._commit(match["repo"], body)

            @staticmethod
            def _is_lfs(file: dict) -> bool:
                return file["path"].endswith(_LFS_SUFFIXES) or file["size"] >= _LFS_MIN_SIZE

            def _lfs_batch(self, repo: str, request: dict) -> None:
                objects = []
                for obj in request["objects"]:
                    answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if obj["oid"] not in hub.lfs_objects:  # already stored objects need no upload
                        answer["actions"] = {
                            "upload": {"href": f"{hub.storage}/lfs-storage/{obj['oid']}", "header": {}},
                            "verify": {"href": f"{hub.endpoint}/{repo}.git/info/lfs/objects/verify"},
                        }
                    objects.append(answer)
                self._json(
                    200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}
                )

            def _commit(self, repo: str, body: bytes) -> None:
                files, lfs_files = dict(hub.repos[repo]), set(hub.lfs_files[repo])
                for line in body.splitlines():
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                        lfs_files.discard(value["path"])
                    elif key == "lfsFile":
                        content = hub.lfs_objects.get(value["oid"])
                        if content is None or len(content) != value["size"]:
                            return self._error(400, "LfsObjectNotUploaded")
                        files[value["path"]] = content
                        lfs_files.add(value["path"])
                    elif key in ("deletedFile", "deletedFolder"):
                        files.pop(value["path"], None)
                        lfs_files.discard(value["path"])
                    elif key != "header":
                        return self._error(400, f"UnsupportedCommitOperation:{key}")
                commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
                hub.repos[repo], hub.lfs_files[repo], hub.commits[repo] = files, lfs_files, commit
                self._json(
                    200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{commit}", "commitOid": commit, "success": True}
                )

            def _resolve(self, repo: str, path: str) -> None:
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound")
                content = hub.repos[repo].get(path)
                if content is None:
                    return self._error(404, "EntryNotFound")
                headers = {"X-Repo-Commit": hub.commits[repo]}
                if path in hub.lfs_files[repo]:
                    oid = hashlib.sha256(content).hexdigest()
                    return self._reply(
                        302,
                        headers={
                            **headers,
                            "Location": f"{hub.storage}/lfs-storage/{oid}",
                            "X-Linked-Etag": f'"{oid}"',
                            "X-Linked-Size": str(len(content)),
                            "ETag": f'"{_git_blob_sha1(content)}"',
                        },
                    )
                self._reply(
                    200,
                    content,
                    {**headers, "ETag": f'"{_git_blob_sha1(content)}"', "Content-Type": "application/octet-stream"},
                )

            def _repo_info(self, repo: str) -> None:
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound")
                siblings = []
                for name, content in sorted(hub.repos[repo].items()):
                    sibling = {"rfilename": name}
                    if name in hub.lfs_files[repo]:
                        sibling["lfs"] = {
                            "size": len(content),
                            "sha256": hashlib.sha256(content).hexdigest(),
                            "pointerSize": 134,
                        }
                    siblings.append(sibling)
                self._json(
                    200, {"id": repo, "modelId": repo, "sha": hub.commits[repo], "private": False, "siblings": siblings}
                )

        return Handler
