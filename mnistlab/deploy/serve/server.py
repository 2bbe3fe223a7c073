"""`mnistlab serve`: bind the port, load and check every run, then hand both to uvicorn.

    mnistlab serve runs/digits-mlp [more runs...] [--host 127.0.0.1] [--port 8000] [--max-upload-mb 8]

Everything that can fail for a reason the user can fix (a port in use, a folder that is not a finished
torch-engine training run, a checkpoint that fails its hash) fails here, as one line, before uvicorn
starts; "serving at" is printed only once the socket listens.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn  # here, not in run_server: without the serve extra, importing this module is what fails

from mnistlab.deploy.serve.app import MAX_UPLOAD, create_app
from mnistlab.errors import UserError

if TYPE_CHECKING:
    from mnistlab.deploy.predict import Predictor


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost: assume it is reachable


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening), or a UserError saying why it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"cannot serve on {host}: not an address or a name this machine resolves ({e.strerror})") \
            from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: "is in use by another program (stop it, or choose another --port)",
               errno.EACCES: "needs privileges this user lacks (ports below 1024 do; choose another --port)",
               errno.EADDRNOTAVAIL: "is not on an address of this machine (see --host)"}
        raise UserError(f"cannot serve on {host} port {port}: it {why.get(e.errno, e.strerror)}") from None
    return sock


def load_models(run_dirs: list[str]) -> dict[str, Predictor]:
    """A Predictor per run folder, named by the folder (-2, -3 for a repeated name); each one's problem is a
    UserError (not a run, a pre-training run, the scratch engine, a damaged checkpoint)."""
    from mnistlab.deploy.predict import Predictor

    models: dict[str, Predictor] = {}
    for run_dir in run_dirs:
        name = base = Path(run_dir).resolve().name
        n = 1
        while name in models:  # two runs called the same in different folders
            n += 1
            name = f"{base}-{n}"
        models[name] = Predictor.open(run_dir)  # a run folder, or an exported model folder
    return models


def run_server(run_dirs: list[str], host: str, port: int, max_upload: int | None = None) -> None:
    """Serve the runs with uvicorn until interrupted; warn on stderr when others can reach the server."""
    sock = bind(host, port)  # first: a port in use fails in milliseconds, not after loading every model
    try:
        app = create_app(load_models(run_dirs), max_upload=max_upload or MAX_UPLOAD)
        sock.listen(128)  # from here connections queue until uvicorn's loop accepts them
    except BaseException:
        sock.close()
        raise
    if not is_loopback(host):
        print(f"mnistlab serve: warning: listening on {host}, reachable from other machines; "
              "the API has no authentication", file=sys.stderr)
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    print(f"mnistlab serve: serving {len(run_dirs)} model(s) at http://{shown}:{sock.getsockname()[1]}/ "
          "(Ctrl-C stops)", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])
