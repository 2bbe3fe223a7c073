"""`mnistlab serve`: bind the port, load and check every run, then hand both to uvicorn.

    mnistlab serve runs/digits-mlp [more runs...] [--host 127.0.0.1] [--port 8000] [--max-upload-mb 8]
                   [--workers 1] [--max-batch 32] [--keep-alive 5] [--read-timeout 10]

Everything that can fail for a reason the user can fix (a port in use, a folder that is not a finished
torch-engine training run, a checkpoint that fails its hash) fails here, as one line, before uvicorn
starts; "serving at" is printed only once the socket listens.

With --workers N > 1 uvicorn runs N processes that accept on the one bound socket; each loads the models
itself (app_from_environment, an import-string factory, since a process is started fresh and cannot be
handed the parent's objects), and the settings reach it through the MNISTLAB_SERVE environment variable.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn  # here, not in run_server: without the serve extra, importing this module is what fails

from mnistlab.deploy.batcher import MAX_BATCH
from mnistlab.deploy.serve.app import MAX_UPLOAD, READ_TIMEOUT, create_app
from mnistlab.errors import UserError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from mnistlab.deploy.predict import Predictor

SETTINGS_VARIABLE = "MNISTLAB_SERVE"  # how a worker process learns what to serve (JSON of ServeSettings)
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open (uvicorn's default)


@dataclass
class ServeSettings:
    """What `mnistlab serve` was asked for, beyond the address: every field a flag."""

    run_dirs: list[str]
    max_upload: int = MAX_UPLOAD  # bytes of a picture
    max_batch: int = MAX_BATCH  # pictures per model call
    workers: int = 1  # server processes
    keep_alive: int = KEEP_ALIVE  # seconds
    read_timeout: float = READ_TIMEOUT  # seconds for a request's body to arrive in full
    open_options: dict[str, Any] = field(default_factory=dict)  # passed to Predictor.open (runtime, precision)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost: assume it is reachable


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening), or a UserError saying why it cannot be; reuse_port:
    others may bind the same port too (SO_REUSEPORT, one socket per worker process)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"cannot serve on {host}: not an address or a name this machine resolves ({e.strerror})") \
            from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: "is in use by another program (stop it, or choose another --port)",
               errno.EACCES: "needs privileges this user lacks (ports below 1024 do; choose another --port)",
               errno.EADDRNOTAVAIL: "is not on an address of this machine (see --host)"}
        raise UserError(f"cannot serve on {host} port {port}: it {why.get(e.errno, e.strerror)}") from None
    return sock


def load_models(run_dirs: list[str], **open_options: Any) -> dict[str, Predictor]:
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
        models[name] = Predictor.open(run_dir, **open_options)  # a run folder, or an exported model folder
    return models


def one_thread_each() -> None:
    """torch and numpy's BLAS (OpenBLAS) with no helper threads in this server process: each call runs on the thread
    that makes it (the event loop's, or for a picture over 512x512 the worker thread preparing it).

    The loop does a request's work in turn on its one thread (deploy/serve/inference.py), so a helper thread only
    helps the model's part, a tenth of a request, and costs more than that: after each model call torch's OpenMP
    threads spin, waiting for the next. With two torch threads `mnistlab serve` (one worker, 2-core Xeon of
    docs/deploy.md) used 4.8-5.0 ms of CPU a request at 8 connections and answered 322-336 requests/s; with one,
    1.9-2.4 ms and 415-533 (with the spinning turned off, OMP_WAIT_POLICY=PASSIVE: 2.2-3.0 ms, 328-448). More
    cores are used by more processes (--workers). The preprocessing's least-squares fits of the paper's surface are
    6-column problems that more BLAS threads cannot speed up either; with two they woke threads that fought the
    preparing threads of the server of the time for the cores: 7.9 -> 4.0 ms of CPU per 280x280 picture. Before
    the models are loaded: onnxruntime takes torch's thread count when a session is made (deploy/runtime.py)."""
    import torch
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")


def app_for(settings: ServeSettings, models: dict[str, Predictor] | None = None) -> FastAPI:
    """The app for these settings (the models loaded here unless given), its objects frozen out of the garbage
    collector's way."""
    models = models if models is not None else load_models(settings.run_dirs, **settings.open_options)
    app = create_app(models, max_upload=settings.max_upload, max_batch=settings.max_batch,
                     read_timeout=settings.read_timeout)
    freeze_garbage_collector()
    return app


def freeze_garbage_collector() -> None:
    """Move every object alive now (torch, FastAPI, the models: ~200,000 of them) out of the garbage collector's
    reach (gc.freeze). They live as long as the server, and a full collection walked them all: 97 ms on the
    2-core Xeon of docs/deploy.md, a pause for every request in flight at that moment."""
    import gc

    gc.collect()
    gc.freeze()


def app_from_environment() -> FastAPI:
    """A worker process's app (uvicorn calls this by its import string): the settings from MNISTLAB_SERVE, one
    thread for the model and the preprocessing, as in every server process."""
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_VARIABLE]))
    one_thread_each()
    return app_for(settings)


def uvicorn_config(settings: ServeSettings, app: FastAPI | str) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=settings.keep_alive,
                          workers=settings.workers, factory=isinstance(app, str))


def worker_sockets(first: socket.socket, workers: int) -> list[socket.socket]:
    """`first` (bound with reuse_port) and workers - 1 more sockets on its address, all listening."""
    host, port = first.getsockname()[:2]
    sockets = [first] + [bind(host, port, reuse_port=True) for _ in range(workers - 1)]
    for sock in sockets:
        sock.listen(2048)
    return sockets


def serve_processes(config: uvicorn.Config, sockets: list[socket.socket]) -> None:
    """uvicorn's supervisor running one worker process per socket, each socket its own worker's (all on one port,
    SO_REUSEPORT: the kernel shares new connections out among them). On one shared socket the first worker to
    wake accepts a whole burst of new connections (asyncio accepts up to the backlog at once): wrk's 32
    connections could all land on one of two workers, which measured half the throughput."""
    from uvicorn.supervisors.multiprocess import Multiprocess, Process

    class OneSocketEach(Multiprocess):
        def init_processes(self) -> None:
            for sock in sockets:
                self.processes.append(Process(self.config, [sock]))
                self.processes[-1].start()

        def keep_subprocess_alive(self) -> None:  # uvicorn's, restarting a dead worker on its own socket
            for i, process in enumerate(self.processes):
                if self.should_exit.is_set() or process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                    continue
                process.kill()
                process.join()
                self.processes[i] = Process(self.config, [sockets[i]])
                self.processes[i].start()

    OneSocketEach(config, sockets=sockets).run()


def run_server(run_dirs: list[str], host: str, port: int, max_upload: int | None = None,
               settings: ServeSettings | None = None) -> None:
    """Serve the runs with uvicorn until interrupted; warn on stderr when others can reach the server."""
    settings = settings or ServeSettings(run_dirs=list(run_dirs), max_upload=max_upload or MAX_UPLOAD)
    # first: a port in use fails in milliseconds, not after loading every model
    sock = bind(host, port, reuse_port=settings.workers > 1)
    sockets = [sock]
    try:
        one_thread_each()
        models = load_models(settings.run_dirs, **settings.open_options)  # every run checked here, once
        app = app_for(settings, models) if settings.workers == 1 else None
        # from here connections queue until uvicorn's loop accepts them (2048: uvicorn's backlog)
        sockets = worker_sockets(sock, settings.workers)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    if not is_loopback(host):
        print(f"mnistlab serve: warning: listening on {host}, reachable from other machines; "
              "the API has no authentication", file=sys.stderr)
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    print(f"mnistlab serve: serving {len(settings.run_dirs)} model(s) at http://{shown}:{sock.getsockname()[1]}/ "
          "(Ctrl-C stops)", file=sys.stderr)
    if app is not None:
        uvicorn.Server(uvicorn_config(settings, app)).run(sockets=[sock])
        return
    del models  # each worker loads its own
    os.environ[SETTINGS_VARIABLE] = json.dumps(asdict(settings))
    serve_processes(uvicorn_config(settings, f"{__name__}:app_from_environment"), sockets)
