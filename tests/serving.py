"""What the HTTP server tests share: a real uvicorn server on a loopback port, in a thread."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a server started as a subprocess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` on a free loopback port, in a thread."""

    def __init__(self, app):
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only for sockets
        # whose protocol says TCP (uvicorn's own binding does); without it every answer on a
        # kept-alive connection waited ~40 ms for the client's delayed ACK (Nagle)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def wait_until_serving(url: str, process, *, status: int = 200, timeout: float = 120) -> None:
    """Poll `url`/health until it answers `status` (401 behind an API key); fail with the
    server's stderr if `process` (a `subprocess.Popen`) exits first, or after `timeout` s."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == status:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "the server did not come up"
        time.sleep(0.2)
