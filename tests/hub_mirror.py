"""A local stand-in for the few Hugging Face Hub endpoints one model repo needs, so that
huggingface_hub's own code runs against it offline: downloads (repo info, tree listing, HEAD + GET
of each file, cache writes) and uploads (create repo, preupload, a commit of regular files and
deletions). Nothing else is served; every request is logged. Uploaded files are kept in `uploaded`,
each commit's parent, additions and deletions in `commits`. `exists=False`: the repository is not
there (404 RepoNotFound) until it is created. A commit whose parentCommit is not the current commit
is refused (412), as the Hub does."""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubMirror:
    def __init__(self, repo_id: str, folder: Path | None = None,
                 commit: str = "0123456789abcdef0123456789abcdef01234567", exists: bool = True):
        self.repo_id, self.commit, self.exists = repo_id, commit, exists
        self.files = {f.name: f.read_bytes() for f in sorted(Path(folder).iterdir()) if f.is_file()} if folder else {}
        self.requests: list[str] = []
        self.uploaded: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.card_metadata: dict | None = None
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                mirror._serve(self, body=False)

            def do_GET(self):
                mirror._serve(self, body=True)

            def do_POST(self):
                mirror._receive(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "HubMirror":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id

    def _reply(self, handler: BaseHTTPRequestHandler, status: int, payload: object | None = None) -> None:
        data = json.dumps(payload).encode() if payload is not None else b""
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _receive(self, handler: BaseHTTPRequestHandler) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"POST {path}")
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        api = f"/api/models/{self.repo_id}/"
        if path == "/api/repos/create":
            request = json.loads(body)
            if f"{request.get('organization')}/{request.get('name')}" != self.repo_id:
                return self._reply(handler, 404)
            self.exists = True
            return self._reply(handler, 200, {"url": f"{self.url}/{self.repo_id}", "name": self.repo_id})
        if path == "/api/validate-yaml":  # the model card's front matter must be a YAML mapping
            import yaml

            content = json.loads(body)["content"]
            try:
                meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
            except yaml.YAMLError as err:
                meta = str(err)
            if not isinstance(meta, dict):
                return self._reply(handler, 400, {"errors": [{"message": f"bad front matter: {meta!r}"}]})
            self.card_metadata = meta
            return self._reply(handler, 200, {"warnings": []})
        if path.startswith(api + "preupload/"):
            files = json.loads(body)["files"]
            return self._reply(handler, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if path.startswith(api + "commit/"):
            if not self.exists:
                return self._reply(handler, 404, {"error": "Repository not found"})
            added: dict[str, bytes] = {}
            commit: dict = {"parent": None, "added": [], "deleted": []}
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    commit["parent"] = item["value"].get("parentCommit")
                elif item["key"] == "file":
                    added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    commit["deleted"].append(item["value"]["path"])
                else:
                    return self._reply(handler, 400, {"error": f"unsupported commit entry {item['key']}"})
            if commit["parent"] not in (None, self.commit):
                return self._reply(handler, 412, {"error": "A commit has happened since; refresh and try again"})
            missing = [name for name in commit["deleted"] if name not in self.files]
            if missing:  # the Hub refuses to delete what is not there
                return self._reply(handler, 404, {"error": f"{missing} not found"})
            for name in commit["deleted"]:
                del self.files[name]
            commit["added"] = sorted(added)
            self.commits.append(commit)
            self.uploaded.update(added)
            self.files.update(added)
            return self._reply(handler, 200, {"commitUrl": f"{self.url}/{self.repo_id}/commit/{self.commit}",
                                              "commitOid": self.commit})
        self._reply(handler, 404)

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        api = f"/api/models/{self.repo_id}/"
        data, headers = None, {}
        if not self.exists:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "RepoNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if path in (api + "revision/main", api + f"revision/{self.commit}"):
            data = json.dumps({"id": self.repo_id, "sha": self.commit,
                               "siblings": [{"rfilename": n} for n in self.files]}).encode()
            headers["Content-Type"] = "application/json"
        elif path.startswith(api + f"tree/{self.commit}"):
            # The top level only, as the Hub lists it unless recursive=true (nested files: their folder).
            recursive = "recursive=true" in urlparse(handler.path).query.lower()
            entries = [{"type": "file", "path": n, "size": len(b), "oid": self._oid(b)}
                       for n, b in self.files.items() if recursive or "/" not in n]
            entries += [{"type": "directory", "path": d, "oid": "0" * 40}
                        for d in sorted({n.split("/")[0] for n in self.files if "/" in n}) if not recursive]
            data = json.dumps(entries).encode()
            headers["Content-Type"] = "application/json"
        elif path.startswith(f"/{self.repo_id}/resolve/"):
            revision, _, name = path[len(f"/{self.repo_id}/resolve/"):].partition("/")
            if revision in ("main", self.commit) and name in self.files:
                data = self.files[name]
                headers.update({"X-Repo-Commit": self.commit, "ETag": f'"{self._oid(data)}"'})
        if data is None:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(200)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
