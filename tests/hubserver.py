"""A stand-in for the Hugging Face hub on 127.0.0.1 (the tests have no network): the two
endpoints ``huggingface_hub.hf_hub_download`` uses, with the headers it reads.

``HEAD /{org}/{name}/resolve/{revision}/{file}`` answers with ``X-Repo-Commit`` (the resolved
revision), ``ETag`` and ``Content-Length`` (for an LFS file, as the hub serves weights:
``X-Linked-Etag`` = its sha256 and ``X-Linked-Size``); ``GET`` of the same path sends the file
(honouring ``Range``). A missing repo or file is a 404 with the hub's ``X-Error-Code``.
``truncate`` makes a GET send half the body under the full ``Content-Length``, then close (a
connection that dies mid-transfer), and the retry that asks for the rest get a 503 (the hub
went away); ``corrupt`` sends bytes of the right length that are not the file. Every request is counted.
"""
from __future__ import annotations

import hashlib
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the revision "main" resolves to


class Hub:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: Counter = Counter()  # (method, path) -> count
        self.truncate = False
        self.corrupt = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def count(self, method: str, file: str) -> int:
        return sum(n for (m, path), n in self.requests.items() if m == method and path.endswith("/" + file))

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        method = "GET" if body else "HEAD"
        self.requests[(method, handler.path)] += 1
        parts = handler.path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(handler, 404, "RepoNotFound")
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        if repo not in self.repos:
            return self._error(handler, 404, "RepoNotFound")
        if filename not in self.repos[repo]:
            return self._error(handler, 404, "EntryNotFound")
        data = self.repos[repo][filename]
        start = 0
        if body and self.truncate and handler.headers.get("Range"):
            return self._error(handler, 503, "")
        if body and handler.headers.get("Range", "").startswith("bytes="):
            start = int(handler.headers["Range"][6:].split("-")[0])
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        if filename.endswith(".json"):  # a small file kept in git: a git-style etag
            handler.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        else:
            sha = hashlib.sha256(data).hexdigest()
            handler.send_header("ETag", f'"{sha}"')
            handler.send_header("X-Linked-Etag", f'"{sha}"')
            handler.send_header("X-Linked-Size", str(len(data)))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        if not body:
            return
        payload = data[start:]
        if self.corrupt:
            payload = bytes(len(payload))
        if self.truncate:
            handler.wfile.write(payload[: len(payload) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(payload)

    @staticmethod
    def _error(handler: BaseHTTPRequestHandler, status: int, code: str) -> None:
        handler.send_response(status)
        if code:
            handler.send_header("X-Error-Code", code)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


def timm_repo(architecture: str, seed: int = 0) -> tuple[dict[str, bytes], dict]:
    """A repo in timm's hub layout for ``architecture`` (config.json, model.safetensors of
    1000-class weights drawn from ``seed``), and the served state dict."""
    import json

    import timm
    import torch
    from safetensors.torch import save

    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = {"architecture": architecture, "num_classes": 1000, "pretrained_cfg": dict(model.pretrained_cfg)}
    return {"config.json": json.dumps(config, default=list).encode(), "model.safetensors": save(state)}, state
