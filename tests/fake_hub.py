"""A small fake Hugging Face Hub on 127.0.0.1: just the endpoints `push_to_hub` and `from_pretrained` use.

Repos live in memory: {repo_id: {path: bytes}}. Uploads are answered "regular" (the file content travels
base64-encoded in the commit's NDJSON body), so no LFS or Xet storage is involved. Every request is
logged in `requests` as "METHOD path" so tests can see what the client did.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_REPO_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<verb>preupload|commit)/(?P<revision>[^/]+)$")
_REPO_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?$")


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}  # repo -> last commit id
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(hub):  # noqa: N805  (the handler class closes over the hub)
        class Handler(BaseHTTPRequestHandler):
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
                self._reply(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _not_found(self, code: str) -> None:
                self._json(404, {"error": code}, {"X-Error-Code": code, "X-Error-Message": code})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                if match := _RESOLVE.match(path):
                    files = hub.repos.get(match["repo"])
                    if files is None:
                        return self._not_found("RepoNotFound")
                    if match["path"] not in files:
                        return self._not_found("EntryNotFound")
                    content = files[match["path"]]
                    return self._reply(200, content, {
                        "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                        "X-Repo-Commit": hub.commits[match["repo"]],
                        "Content-Type": "application/octet-stream",
                    })
                if match := _REPO_INFO.match(path):
                    if match["repo"] not in hub.repos:
                        return self._not_found("RepoNotFound")
                    return self._json(200, {
                        "id": match["repo"], "modelId": match["repo"], "sha": hub.commits[match["repo"]], "private": False,
                        "siblings": [{"rfilename": name} for name in sorted(hub.repos[match["repo"]])],
                    })
                self._not_found("NotFound")

            def do_POST(self) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"POST {path}")
                body = self._body()
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request.get('organization') or 'user'}/{request['name']}"
                    if repo not in hub.repos:
                        hub.repos[repo] = {}
                        hub.commits[repo] = hashlib.sha1(repo.encode()).hexdigest()
                    return self._json(200, {"url": f"{hub.endpoint}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                if (match := _REPO_API.match(path)) and match["repo"] in hub.repos:
                    if match["verb"] == "preupload":
                        files = json.loads(body)["files"]
                        return self._json(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                        ]})
                    return self._commit(match["repo"], body)
                self._not_found("RepoNotFound")

            def _commit(self, repo: str, body: bytes) -> None:
                files = hub.repos[repo]
                for line in body.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] in ("deletedFile", "deletedFolder"):
                        files.pop(value["path"], None)
                    elif item["key"] != "header":
                        return self._json(400, {"error": f"unsupported commit operation {item['key']}"})
                commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
                hub.commits[repo] = commit
                self._json(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{commit}", "commitOid": commit,
                                 "success": True})

        return Handler
