"""Running the app under uvicorn: bind first (a bad address is one line), load, serve, drain on SIGTERM.

The socket is bound before anything slow, so a port in use fails at once; then the server listens and
prints `serving on http://host:port` while the index and models load on a thread (/health answers,
/ready says 503 until they are in). SIGTERM or Ctrl-C turns /ready to 503 and stops accepting; requests
in flight get serve.drain_s to finish (uvicorn's graceful shutdown), then the process exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import sys
import threading
from collections.abc import Iterator

import uvicorn

from trtrag_cli.util.errors import TrtragError


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port, or a one-line TrtragError saying how to fix the address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OverflowError) as exc:
        raise TrtragError(f"cannot listen on host '{host}': {exc}",
                          "use an address of this machine, e.g. --host 127.0.0.1 (or 0.0.0.0 for every interface)") \
            from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TrtragError(f"port {port} on {host} is already in use",
                              "stop the other server or pick another port: --port 0 takes any free one") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise TrtragError(f"not allowed to listen on {host}:{port}", "use a port above 1023") from None
        raise TrtragError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          "use an address of this machine, e.g. --host 127.0.0.1") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """http://host:port of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server that says where it listens and marks the service draining on SIGTERM."""

    def __init__(self, config, service, url: str, announce: bool):
        super().__init__(config)
        self.service, self.url, self.announce = service, url, announce
        self.listening = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            if self.announce:
                sys.stderr.write(f"serving on {self.url}\n")
                sys.stderr.flush()
            self.listening.set()

    def handle_exit(self, sig, frame) -> None:
        # uvicorn's own records the signal and raises it again after the drain, which would end the
        # process by SIGTERM; a drained server has done its job and exits 0.
        self.service.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True


def _config(app, service) -> uvicorn.Config:
    cfg = service.recipe.serve
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                          timeout_graceful_shutdown=cfg.drain_s, timeout_keep_alive=5)


def serve(app, service, sock: socket.socket, load: bool = True) -> None:
    """Serve on sock until SIGTERM or Ctrl-C; loads the service on a thread meanwhile (load=True).

    A load failure stops the server and is raised here (a TrtragError is the command's one-line error).
    """
    server = _Server(_config(app, service), service, url_of(sock), announce=True)

    def loaded() -> None:
        if service.load_error is not None:
            server.should_exit = True

    if load:
        service.load_in_background(then=loaded)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        service.draining = True
    if service.load_error is not None:
        raise service.load_error


@contextlib.contextmanager
def running(app, service, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve a loaded service on a thread while the block runs; yields its base URL (tests, benchmarks)."""
    sock = bind(host, port)
    server = _Server(_config(app, service), service, url_of(sock), announce=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="trtrag-serve", daemon=True)
    thread.start()
    try:
        if not server.listening.wait(60):
            raise RuntimeError("the server did not start within 60 s")
        yield server.url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
