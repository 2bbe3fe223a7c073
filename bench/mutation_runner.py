"""A quicker test runner for mutmut: one process imports torch, numpy, Pillow and pytest once, and forks a
fresh pytest for each mutant (bench/mutation.sh starts it). mutmut runs a command per mutant; most of a
command's seconds went on importing torch, not on the tests.

    python bench/mutation_runner.py serve SOCKET            # in the folder being mutated
    python bench/mutation_runner.py run SOCKET PYTEST_ARGS  # what mutmut runs: 0 if the tests passed, else 1
    python bench/mutation_runner.py plain PYTEST_ARGS       # the same without the server

The server never imports mnistlab: each forked child imports it from disk, so it sees the current mutant.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

TIMEOUT_S = 120  # a mutant that loops for ever is ended here (mutmut also gives up on its runner)


def serve(path: str) -> None:
    from importlib.metadata import entry_points

    import matplotlib
    import numpy  # noqa: F401  (imported once here, inherited by every child)
    import PIL.Image  # noqa: F401
    import pytest
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    matplotlib.use("Agg")
    for plugin in entry_points(group="pytest11"):  # hypothesis's and schemathesis's plugins: a second or two
        plugin.load()

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:  # one child per mutant; the server goes straight back to accepting
            server.close()
            signal.alarm(TIMEOUT_S)
            args = json.loads(conn.makefile().readline())
            sys.path.insert(0, os.getcwd())  # the mutated tree's mnistlab, not an installed one
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            try:
                code = int(pytest.main(args))
            except BaseException:  # a mutant that breaks pytest itself is caught all the same
                code = 1
            try:
                conn.sendall(f"{code}\n".encode())
            except OSError:  # mutmut gave up on this mutant (a timeout) and ended the client
                pass
            os._exit(0)
        conn.close()


def run(path: str, args: list[str]) -> int:
    """1 unless the tests passed: mutmut 2.5 counts only exit status 1 as a kill, so a mutant that breaks the
    import (pytest's status 2, a collection error) would otherwise be called a survivor."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:  # no server: run the tests the slow way rather than report a kill that did not happen
        return plain(args)
    client.sendall((json.dumps(args) + "\n").encode())
    reply = client.makefile().readline().strip()
    return 0 if reply == "0" else 1


def plain(args: list[str]) -> int:
    """The same tests in a fresh interpreter (how bench/mutation.sh double-checks a survivor)."""
    return 0 if subprocess.call([sys.executable, "-m", "pytest", *args]) == 0 else 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "plain":
        sys.exit(plain(sys.argv[2:]))
    else:
        sys.exit(run(sys.argv[2], sys.argv[3:]))
