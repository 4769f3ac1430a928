"""Run an app with uvicorn on a socket we bind ourselves: in the foreground (`mmgpt serve`), or in a
background thread on a free loopback port (the browser test and the load benchmark)."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; OSError (port in use, unknown host) is the caller's to report."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and
    # without it a kept-alive connection waits ~40 ms (Nagle + delayed ACK) on every response
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _server(app, log_level: str):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5))


def serve(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C stops it gracefully)."""
    _server(app, log_level).run(sockets=[sock])


@contextlib.contextmanager
def background(app, host: str = "127.0.0.1", log_level: str = "warning", start_timeout_s: float = 30) -> Iterator[str]:
    """Serve `app` on a free port of a loopback address in a thread; yields the base URL."""
    if not is_loopback(host):
        raise ValueError(f"{host}: background servers listen on loopback addresses only")
    sock = bind(host, 0)
    port = sock.getsockname()[1]
    server = _server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mmgpt-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {host}:{port} did not start")
            time.sleep(0.02)
        yield f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
