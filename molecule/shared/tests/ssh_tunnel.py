"""A student's `ssh -L` tunnel, opened from an access sheet's command on the control node (the student's laptop), for
the scenarios' testinfra tests (not a test module itself).

    with sheet_tunnel(command, key, known_hosts) as local_port:
        Jupyter("127.0.0.1", local_port, token=...).status()

The sheet's command is run as it is written, with only the laptop's own options added (the key, BatchMode, the known
hosts file) and a free local port in place of the sheet's, so that tests never collide on the laptop's ports.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import subprocess
import time

from jupyter_client import Jupyter


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def sheet_tunnel(command, key, known_hosts=None, wait=30.0):
    """Open the tunnel of `command` (an access sheet's `ssh ... -L LOCAL:HOST:PORT user@server` line) and yield the
    local port once Jupyter answers through it (any HTTP status); the tunnel is closed afterwards. Without
    known_hosts the server's host key is not checked."""
    words = shlex.split(command)
    assert words[0] == "ssh", command
    forward = words.index("-L") + 1
    target = words[forward].split(":", 1)[1]
    local = free_port()
    words[forward] = f"{local}:{target}"
    laptop = ["-N", "-i", str(key), "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"]
    if known_hosts:
        laptop += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    else:
        laptop += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    command = [words[0], *laptop, *words[1:]]
    tunnel = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + wait
        while True:
            assert tunnel.poll() is None, tunnel.communicate()
            try:
                Jupyter("127.0.0.1", local).status()
                break
            except OSError:
                assert time.monotonic() < deadline, f"no answer through {words}"
                time.sleep(0.5)
        yield local
    finally:
        tunnel.terminate()
        try:
            tunnel.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tunnel.kill()
