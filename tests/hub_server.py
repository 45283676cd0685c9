"""A tiny local stand-in for the Hugging Face Hub HTTP API (stdlib only), for hermetic tests.

The real ``huggingface_hub`` client (2.x, httpx2 based) talks plain HTTP to this server on 127.0.0.1,
so ``snapshot_download`` / ``hf_hub_download`` / ``HfApi().model_info`` run unmocked. Endpoints served
(the only ones those calls need; checked against huggingface_hub 2.4.0):

* ``GET /api/models/{repo_id}[/revision/{rev}]`` -> model info JSON (``id``, ``sha``, ``siblings``; with
  ``?blobs=true`` siblings also carry ``size``/``blobId``/``lfs``). Used by ``model_info``/``repo_info``
  and by ``snapshot_download`` when the revision is not a 40-hex sha.
* ``GET /api/models/{repo_id}/tree/{rev}[/{path}]?recursive=...`` -> file/directory listing (one page).
  ``snapshot_download`` always lists the tree, then filters it with allow/ignore patterns client side.
* ``HEAD``/``GET /{repo_id}/resolve/{rev}/{path}`` -> file metadata / bytes. Headers: ``X-Repo-Commit``,
  ``ETag`` (quoted git blob sha1; sha256 for "LFS" files, i.e. size >= ``lfs_threshold``, which also get
  ``X-Linked-Etag``/``X-Linked-Size``), ``Content-Length``, ``Accept-Ranges``; ``Range: bytes=a-[b]`` -> 206.
  No ``X-Xet-*`` headers are ever sent, so the client uses plain HTTP even when ``hf_xet`` is installed.

Errors use the Hub's conventions: 404 + ``X-Error-Code: RepoNotFound|RevisionNotFound|EntryNotFound``
(+ JSON ``{"error": ...}``), and with ``require_token`` a 401 (no token: ``RepoNotFound`` code like a
private repo; wrong token: ``X-Error-Message: Invalid credentials in Authorization header``).

Fault injection: ``fail_after_bytes={"path/in/repo": N}`` sabotages the first ``fail_times`` GETs of that
file.  ``fault="drop"`` (default) sends the full ``Content-Length`` then closes after N bytes: the client
sees ``RemoteProtocolError`` and *resumes by itself* (new GET with ``Range: bytes=N-`` after ~1 s), so the
download succeeds.  ``fault="short"`` sends a well-formed response of only N bytes while HEAD announced
the full size: the client raises ``OSError("Consistency check failed ...")`` at once, no retry.
``corrupt={"path/in/repo": N}`` serves the first ``fail_times`` GETs of that file whole but with byte N
flipped (a corrupted or swapped download of the right size, which the client does not notice).

Usage::

    with LocalHub({"org/name": {"dir": path, "commit": "ab" * 20}}) as hub:
        snapshot_download("org/name", revision="main", endpoint=hub.endpoint, cache_dir=tmp)
        hub.requests  # [(method, path_with_query, {lower-cased header: value}), ...]
        hub.point_client(monkeypatch)  # in-process code calling snapshot_download() without endpoint=
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n"


class _Repo:
    def __init__(self, repo_id: str, spec: dict, lfs_threshold: int) -> None:
        self.repo_id, self.root = repo_id, Path(spec["dir"])
        self.commit = spec.get("commit") or hashlib.sha1(repo_id.encode()).hexdigest()
        self.branches = {spec.get("branch", "main")}
        self.files: dict[str, dict] = {}
        for p in sorted(q for q in self.root.rglob("*") if q.is_file()):
            data = p.read_bytes()
            info = {"disk": p, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "git": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                    "lfs": len(data) >= lfs_threshold}
            if info["lfs"]:
                ptr = _LFS_POINTER.format(sha=info["sha256"], size=len(data)).encode()
                info.update(pointer_size=len(ptr), git=hashlib.sha1(b"blob %d\0" % len(ptr) + ptr).hexdigest())
            self.files[p.relative_to(self.root).as_posix()] = info

    def resolve(self, rev: str) -> str | None:
        return self.commit if rev in self.branches or rev == self.commit else None

    def tree_entry(self, path: str) -> dict:
        f = self.files[path]
        entry = {"type": "file", "oid": f["git"], "size": f["size"], "path": path}
        if f["lfs"]:
            entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": f["pointer_size"]}
        return entry


class LocalHub:
    """Serve ``{repo_id: {"dir": Path, "commit": "<40 hex>", "branch": "main"}}`` on 127.0.0.1."""

    def __init__(self, repos: dict[str, dict], *, require_token: str | None = None,
                 fail_after_bytes: dict[str, int] | None = None, fail_times: int = 1,
                 fault: str = "drop", lfs_threshold: int = 100_000,
                 corrupt: dict[str, int] | None = None) -> None:
        assert fault in ("drop", "short"), fault
        self.repos = {rid: _Repo(rid, spec, lfs_threshold) for rid, spec in repos.items()}
        self.require_token, self.fault = require_token, fault
        self.faults_left = {p: fail_times for p in (fail_after_bytes or {})}
        self.fail_after_bytes = dict(fail_after_bytes or {})
        self.corrupt = dict(corrupt or {})
        self.corrupt_left = {p: fail_times for p in self.corrupt}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.endpoint = ""

    def __enter__(self) -> "LocalHub":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def point_client(self, monkeypatch) -> None:
        """Aim an already-imported huggingface_hub at this server (calls without ``endpoint=``).

        ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` are read once at import (``constants.ENDPOINT``, the resolve URL
        template, ``constants.HF_HUB_OFFLINE``), so setting the env var alone only helps subprocesses.
        """
        from huggingface_hub import constants

        monkeypatch.setenv("HF_ENDPOINT", self.endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        template = self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def downloaded(self, repo_id: str | None = None) -> list[str]:
        """Repo paths fetched with GET .../resolve/... (in request order, repeats kept)."""
        out = []
        for method, path, _ in self.requests:
            rid, sep, rest = urlsplit(path).path.lstrip("/").partition("/resolve/")
            if method == "GET" and sep and (repo_id is None or unquote(rid) == repo_id):
                out.append(unquote(rest.partition("/")[2]))
        return out

    def _take(self, left: dict[str, int], values: dict[str, int], path: str) -> int | None:
        """values[path] while `left` allows it (counting this use), else None."""
        with self._lock:
            if left.get(path, 0) > 0:
                left[path] -= 1
                return values[path]
        return None

    def _take_corruption(self, path: str) -> int | None:
        return self._take(self.corrupt_left, self.corrupt, path)

    def _take_fault(self, path: str) -> int | None:
        return self._take(self.faults_left, self.fail_after_bytes, path)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every response sets Content-Length
    hub: LocalHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    # ------------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj, head: bool, headers: dict | None = None) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str | None, message: str, head: bool, extra: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head)

    def _find_repo(self, raw: str) -> tuple[_Repo | None, str, str]:
        """Return (repo, kind, rest) with kind in {"api", "resolve"}; repo None if unknown."""
        for rid, repo in self.hub.repos.items():
            for prefix, kind in ((f"/api/models/{rid}", "api"), (f"/{rid}/resolve/", "resolve")):
                if raw == prefix or raw.startswith(prefix.rstrip("/") + "/"):
                    return repo, kind, raw[len(prefix.rstrip("/")):]
        kind = "api" if raw.startswith("/api/models/") else "resolve" if "/resolve/" in raw else ""
        return None, kind, ""

    # ------------------------------------------------------------------ routing
    def _dispatch(self, head: bool) -> None:
        hdrs = {k.lower(): v for k, v in self.headers.items()}
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path, hdrs))
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        token = self.hub.require_token
        if token is not None and hdrs.get("authorization") != f"Bearer {token}":
            if "authorization" not in hdrs:
                return self._error(401, "RepoNotFound", "Repository not found", head)
            return self._error(401, None, "Invalid credentials in Authorization header", head)

        repo, kind, rest = self._find_repo(url.path)
        if repo is None:
            if kind:
                return self._error(404, "RepoNotFound", "Repository not found", head)
            return self._error(404, None, "Not Found", head)
        if kind == "api":
            if rest in ("", "/"):
                return self._model_info(repo, "main", query, head)
            section, _, tail = rest.lstrip("/").partition("/")
            rev_raw, _, sub = tail.partition("/")
            commit = repo.resolve(unquote(rev_raw))
            if section not in ("revision", "tree") or not rev_raw:
                return self._error(404, None, "Not Found", head)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev_raw)}", head)
            if section == "revision":
                return self._model_info(repo, commit, query, head)
            return self._tree(repo, unquote(sub).strip("/"), query.get("recursive", "").lower() == "true", head)
        rev_raw, _, path = rest.lstrip("/").partition("/")
        commit = repo.resolve(unquote(rev_raw))
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev_raw)}", head)
        self._resolve(repo, commit, unquote(path), head)

    def _model_info(self, repo: _Repo, rev: str, query: dict, head: bool) -> None:
        commit = repo.resolve(rev)
        blobs = query.get("blobs", "").lower() == "true"
        siblings = []
        for path, f in repo.files.items():
            sib = {"rfilename": path}
            if blobs:
                sib.update(size=f["size"], blobId=f["git"])
                if f["lfs"]:
                    sib["lfs"] = {"size": f["size"], "sha256": f["sha256"], "pointerSize": f["pointer_size"]}
            siblings.append(sib)
        self._json({"_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit,
                    "private": self.hub.require_token is not None, "gated": False, "disabled": False,
                    "lastModified": "2024-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                    "siblings": siblings}, head)

    def _tree(self, repo: _Repo, sub: str, recursive: bool, head: bool) -> None:
        prefix = f"{sub}/" if sub else ""
        if sub and not any(p.startswith(prefix) for p in repo.files):
            return self._error(404, "EntryNotFound", f"{sub} does not exist on \"{repo.commit}\"", head)
        entries, dirs = [], set()
        for path in repo.files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                entries.append(repo.tree_entry(path))
        entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    for d in sorted(dirs)]
        self._json(entries, head)

    def _resolve(self, repo: _Repo, commit: str, path: str, head: bool) -> None:
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", head, {"X-Repo-Commit": commit})
        size = f["size"]
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "ETag": f'"{f["sha256"] if f["lfs"] else f["git"]}"'}
        if f["lfs"]:
            headers.update({"X-Linked-Etag": f'"{f["sha256"]}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and "," not in rng:
            a, _, b = rng[6:].partition("-")
            start, end = (max(size - int(b), 0), size - 1) if not a else (int(a), min(int(b), size - 1) if b else size - 1)
            if start >= size or start > end:
                return self._error(416, None, "Range Not Satisfiable", head, {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        cut = None if head else self.hub._take_fault(path)
        if cut is not None and self.hub.fault == "short":
            length = min(cut, length)
            cut = None
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(length)}.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        with open(f["disk"], "rb") as fh:
            fh.seek(start)
            data = fh.read(length)
        flip = self.hub._take_corruption(path)
        if flip is not None and start <= flip < start + len(data):
            data = data[:flip - start] + bytes([data[flip - start] ^ 0xFF]) + data[flip - start + 1:]
        if cut is not None:  # "drop": promised `length` bytes, send `cut`, then hang up (FIN)
            self.wfile.write(data[:cut])
            self.close_connection = True
            return
        self.wfile.write(data)


__all__ = ["LocalHub"]
