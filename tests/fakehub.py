"""A fake Hugging Face Hub on 127.0.0.1: model repos served from local folders through the HTTP routes that
huggingface_hub (2.x) really calls, read from its source (hf_api.py: model_info, list_repo_tree; file_download.py:
get_hf_file_metadata, http_get):

    GET  /api/models/{owner}/{name}/revision/{rev}   model_info: {"id", "sha", "siblings": [{"rfilename"}]}
    GET  /api/models/{owner}/{name}/tree/{rev}       list_repo_tree, snapshot_download's listing (one page)
    HEAD /{owner}/{name}/resolve/{rev}/{path}        metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{owner}/{name}/resolve/{rev}/{path}        the bytes; `Range: bytes=N-` answered with 206

No X-Xet-Hash header and no xetHash in listings, so huggingface_hub downloads over plain HTTP, never the xet
protocol. Errors come as the Hub sends them: status + X-Error-Code (RepoNotFound, GatedRepo, RevisionNotFound,
EntryNotFound), which huggingface_hub turns into its exception classes. Every request is logged in `log`.
"""
import hashlib
import json
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self):
        self.repos = {}   # repo id -> folder
        self.errors = {}  # repo id -> (status, X-Error-Code or None, only its files?)
        self.drop = {}    # "repo id/file" -> how many more GETs of it to cut off half-way
        self.log = []     # (method, repo id, route, file or "", Range header or None)
        self._server = None

    def add(self, repo_id, folder):
        self.repos[repo_id] = Path(folder)

    def refuse(self, repo_id, status, code=None, files_only=False):
        """Answer every request about `repo_id` (or, as the Hub does for gated repos, only its file downloads)
        with this status and X-Error-Code."""
        self.errors[repo_id] = (status, code, files_only)

    @staticmethod
    def commit(repo_id):
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def files(self, repo_id):
        folder = self.repos[repo_id]
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def requested(self, repo_id):
        """The files of `repo_id` that any resolve request (HEAD or GET) asked for."""
        return {f for _, r, route, f, _ in self.log if r == repo_id and route == "resolve"}

    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))  # port 0: a free one
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the Hub

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _send(self, status, headers=(), body=b"", send_body=True):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _json(self, obj, send_body=True):
            self._send(200, [("Content-Type", "application/json")], json.dumps(obj).encode(), send_body)

        def _error(self, status, code, repo_id=None):
            headers = [("X-Error-Code", code)] if code else []
            if repo_id in hub.repos:
                headers.append(("X-Repo-Commit", hub.commit(repo_id)))
            self._send(status, headers, json.dumps({"error": code or "error"}).encode(), self.command != "HEAD")

        def _serve(self, body):
            # split before unquoting: revisions such as refs/pr/1 come %2F-quoted
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            if parts == ["api", "agent-harnesses"]:  # huggingface_hub's registry of AI agents: an empty one
                hub.log.append((self.command, "", "agent-harnesses", "", None))
                return self._json({"standardEnvVars": [], "harnesses": {}}, body)
            api = parts[:2] == ["api", "models"]
            repo_id = "/".join(parts[2:4] if api else parts[0:2])
            rest = parts[4:] if api else parts[2:]
            route = (rest[0] if rest else "revision") if api else (rest[0] if rest else "")
            rev = rest[1] if len(rest) > 1 else "main"
            file = "/".join(rest[2:]) if route == "resolve" else ""
            hub.log.append((self.command, repo_id, route, file, self.headers.get("Range")))
            if repo_id in hub.errors and (route == "resolve" or not hub.errors[repo_id][2]):
                return self._error(*hub.errors[repo_id][:2])
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound")
            if rev not in ("main", hub.commit(repo_id)):
                return self._error(404, "RevisionNotFound", repo_id)
            folder, sha = hub.repos[repo_id], hub.commit(repo_id)
            if route == "revision":
                return self._json({"id": repo_id, "sha": sha, "private": False,
                                   "siblings": [{"rfilename": f} for f in hub.files(repo_id)]}, body)
            if route == "tree":
                return self._json([{"type": "file", "path": f, "size": (folder / f).stat().st_size,
                                    "oid": hashlib.sha1((folder / f).read_bytes()).hexdigest()}
                                   for f in hub.files(repo_id)], body)
            if route != "resolve" or not (folder / file).is_file():
                return self._error(404, "EntryNotFound", repo_id)
            data = (folder / file).read_bytes()
            headers = [("X-Repo-Commit", sha), ("ETag", f'"{hashlib.sha256(data).hexdigest()}"'),
                       ("Accept-Ranges", "bytes")]
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            if start:
                headers.append(("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"))
            key = f"{repo_id}/{file}"
            if body and hub.drop.get(key, 0) > 0:  # the network drops half-way: headers, half the bytes, reset
                hub.drop[key] -= 1
                self.send_response(206 if start else 200)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:start + (len(data) - start) // 2])
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                return
            self._send(206 if start else 200, headers, data[start:], body)

    return Handler
