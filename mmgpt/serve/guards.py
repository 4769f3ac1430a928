"""ASGI middleware that every route gets, present and future: who may call the server (Host and Origin
checks) and how deeply a JSON body may nest.

- **Host.** A server bound to a loopback address answers only to loopback names (`localhost`, `*.localhost`,
  `127.0.0.1`, `[::1]`): a web page cannot reach it through a DNS name that it re-points at 127.0.0.1
  (DNS rebinding). Other names get 400.
- **Origin.** A request a browser sends from another origin (its `Origin` header, or `Sec-Fetch-Site:
  cross-site` / `same-site`) gets 403, unless the origin is allowed (`--allow-origin`); a web page cannot
  then spend the model's compute with a form POST. Clients that are not browsers send neither header.
- **Depth.** A JSON body nested deeper than `max_depth` gets 422 before any parser sees it (Python's json
  module recurses once per level: ~1000 levels, two kilobytes, raised RecursionError, a 500).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_JSON_DEPTH = 32  # our bodies nest 3 deep; an OpenAI-style chat request with tools about 10

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # strings may hold brackets
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


async def _answer(send: Send, status: int, detail) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope["headers"]}


# --- Host and Origin ---------------------------------------------------------------------------------


def split_host(host: str) -> tuple[str, int | None]:
    """'Example.COM:8000' -> ('example.com', 8000); '[::1]:80' -> ('::1', 80); a bad port -> None."""
    try:
        parts = urlsplit(f"//{host}")
        return (parts.hostname or "").rstrip("."), parts.port
    except ValueError:
        return host.lower(), None


def is_loopback_name(name: str) -> bool:
    """A name that reaches this machine only: localhost, *.localhost (RFC 6761), 127.0.0.0/8, ::1."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether a page's Origin (scheme://name[:port]) is this server as the request's Host names it."""
    parts = urlsplit(origin)
    try:
        origin_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        return False
    name, port = split_host(host)
    own_port = port or (443 if scheme in ("https", "wss") else 80)
    return parts.scheme in ("http", "https") and bool(name) and name == parts.hostname and own_port == origin_port


class HostOriginGuard:
    """400 for a Host outside `allowed_hosts` (None: any; "loopback": loopback names), 403 for a request
    from another origin than the server's own unless it is in `allowed_origins` ("*": any)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | str | None = None,
                 allowed_origins: Iterable[str] = ()):
        self.app = app
        self.loopback_only = allowed_hosts == "loopback"
        self.hosts = None if allowed_hosts in (None, "loopback") else {h.lower() for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    def _host_refused(self, host: str) -> str | None:
        name, _ = split_host(host)
        if self.loopback_only and not is_loopback_name(name):
            return (f"Host {host!r} refused: this server listens on a loopback address and answers only to "
                    "localhost, 127.0.0.1 or [::1] (serve with --host to be reached under other names)")
        if self.hosts is not None and name not in self.hosts:
            return f"Host {host!r} refused: this server answers to {', '.join(sorted(self.hosts))}"
        return None

    def _origin_refused(self, headers: dict[bytes, bytes], scope: Scope) -> str | None:
        origin = headers.get(b"origin", b"").decode("latin-1").strip()
        fetch_site = headers.get(b"sec-fetch-site", b"").decode("latin-1").strip().lower()
        if not origin:
            if fetch_site in ("cross-site", "same-site"):
                return (f"cross-origin request refused (Sec-Fetch-Site: {fetch_site}); start the server with "
                        "--allow-origin ORIGIN to let that page call it")
            return None
        if "*" in self.origins or origin.rstrip("/").lower() in self.origins:
            return None
        if _same_origin(origin, headers.get(b"host", b"").decode("latin-1"), scope.get("scheme", "http")):
            return None
        return (f"cross-origin request from {origin!r} refused: start the server with --allow-origin {origin} "
                "to let that page call it")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get(b"host")
        refused = self._host_refused(host.decode("latin-1")) if host is not None else None
        if refused:
            await _answer(send, 400, refused)
            return
        refused = self._origin_refused(headers, scope)
        if refused:
            await _answer(send, 403, refused)
            return
        await self.app(scope, receive, send)


# --- JSON depth ------------------------------------------------------------------------------------


def json_depth(body: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings do not count);
    in C-speed passes (a regex, a translate and a cumulative sum): ~0.15 s for a 10 MB body."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _is_json(headers: dict[bytes, bytes]) -> bool:
    kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return kind in (b"", b"application/json") or kind.endswith(b"+json")


class JsonDepthLimit:
    """422 for a JSON request body nested deeper than `max_depth`; the body is read here (the body limit
    outside bounds it) and handed on unchanged."""

    def __init__(self, app: ASGIApp, max_depth: int = MAX_JSON_DEPTH):
        self.app = app
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or not _is_json(_headers(scope)):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        depth = json_depth(body)
        if depth > self.max_depth:
            await _answer(send, 422, [{"type": "json_invalid", "loc": ["body"],
                                       "msg": f"JSON nested {depth} levels deep; at most {self.max_depth} are read"}])
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the disconnect, when the client leaves

        await self.app(scope, replay, send)
