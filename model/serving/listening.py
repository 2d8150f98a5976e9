"""Where the application listens: the socket serve.py binds before the model loads, and uvicorn in a
background thread for notebooks and tests.

    sock = bound_socket("127.0.0.1", 8000)                  # a busy port is one UserError, at once
    with running_in_thread(app) as url:                     # http://127.0.0.1:<free port>, stopped after the block
        ...
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time

from utils.errors import UserError


def bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` for uvicorn to listen on (port 0 picks a free one). Bound before the
    model loads, so that a port in use, or a host that is not this machine's, is one error at once (uvicorn
    would exit with status 3 after the model had loaded)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server is listening there)", field="port",
                            fix="stop that server, or choose another --port") from None
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err})", field="host",
                        fix="pass an address of this machine (127.0.0.1, 0.0.0.0, ::) and a port you may use "
                            "(1024 and above without root)") from None
    return sock


@contextlib.contextmanager
def running_in_thread(app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60):
    """Serve `app` with uvicorn from a background thread and yield its base URL; port 0 picks a free port.
    The server stops when the block ends (its thread is given 30 s to finish the requests in flight)."""
    import uvicorn

    sock = bound_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server thread did not start serving within {start_timeout_s:.0f} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
