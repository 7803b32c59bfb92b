"""Running an app on a free loopback port in a background thread (tests, notebooks)."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from asyncpp.server.shutdown import GracefulServer


@contextmanager
def serve_in_thread(app: ASGIApp, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    **options: Any) -> Iterator[str]:
    """Yields the base URL once the app's startup (the engine's, too) has finished; on exit
    shuts the server down, which closes the engine. `options`: more uvicorn.Config arguments."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = GracefulServer(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server failed to start (see its log)")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
