"""``fusionseg serve``: a demo page and a REST API over one loaded model (needs the ``serve`` extra:
``pip install 'fusionseg[serve]'`` = FastAPI, uvicorn, python-multipart).

>>> from fusionseg.serve import ServeConfig, create_app
>>> app = create_app(ServeConfig(model="default", workers=1, queue=8))   # any ASGI server can run it
"""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from .app import ApiError, ServeConfig, create_app

__all__ = ["ServeConfig", "create_app", "ApiError", "bind", "serve", "serve_in_thread", "missing_dependencies"]


def missing_dependencies() -> list[str]:
    """Names of the ``serve`` extra's packages that are not installed."""
    import importlib.util
    mods = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}
    return [pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 = any free port). OSError names the address and says
    whether the port (in use) or the host (not an address of this machine) is to blame."""
    import errno
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise OSError(f"cannot listen on {host}:{port}: {host!r} is not a valid address or host name "
                      f"({getattr(e, 'strerror', None) or e}); check --host") from None
    fam, _, _, _, addr = infos[0]
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
        s.listen(128)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            why = "the port is in use; pick another --port"
        elif e.errno == errno.EADDRNOTAVAIL:
            why = "that address is not one of this machine's; check --host"
        elif e.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need privileges); pick another --port"
        else:
            why = f"{e.strerror or e}; check --host and --port"
        raise OSError(f"cannot listen on {host}:{port}: {why}") from None
    return s


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True,
          on_ready=None) -> None:
    """Load the model, bind ``host:port`` and serve until interrupted. ``on_ready(url)`` is called once
    listening (the CLI prints the address)."""
    import uvicorn
    from ..runtime import tune_malloc; tune_malloc()  # noqa: E702 - an entry point: large buffers kept in the heap
    sock = bind(host, port)
    app = create_app(cfg)
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{real_port}"
    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(url, app)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (tests, notebooks); yields its base URL and stops it
    on exit. ``port=0`` picks a free port."""
    import uvicorn
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fusionseg-serve")
    th.start()
    t0 = time.time()
    while not server.started:
        if not th.is_alive() or time.time() - t0 > startup_timeout:
            sock.close()
            raise RuntimeError("the server thread did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        th.join(timeout=10)
        sock.close()
