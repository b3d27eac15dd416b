"""Run a serving app with uvicorn, in the foreground (the CLI) or in a background thread.

`ServerThread` binds a socket first (port 0 picks a free port), so the URL is known before the
first request; tests and benchmarks use it to talk to a real server over real HTTP.

Example:
    >>> from starlette.applications import Starlette
    >>> with ServerThread(Starlette()) as server:
    ...     server.url.startswith("http://127.0.0.1:")
    True
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

__all__ = ["ServerThread", "serve_forever"]


def _config(app, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False)


class ServerThread:
    """A uvicorn server on `host:port` in a daemon thread; `stop()` shuts it down cleanly."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._server = uvicorn.Server(_config(app, log_level))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start.")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(app, host: str, port: int, log_level: str = "info") -> None:
    """Serve in the foreground until interrupted (Ctrl-C)."""
    config = _config(app, log_level)
    config.host, config.port = host, port
    uvicorn.Server(config).run()
