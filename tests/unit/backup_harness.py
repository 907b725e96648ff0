"""Shared by the tests of container_backup / container_restore / the backup package module_utils/backup/.

A tiny test image built here FROM scratch out of this machine's own dash, sleep, cat, head and libc (two layers, a few
MB: backups of it take a second or two), containers labelled io.gpulab.harness=1, the modules run in-process
(exit_json/fail_json raise, tests/unit/conftest.py) or in a subprocess the way Ansible runs them on a server, and what
the engine did in a time window (its event log), to show that a refused restore left it alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from ansible.module_utils.testing import patch_module_args
from module_harness import ModuleExit, ModuleFail

ROOT = Path(__file__).resolve().parents[2]
LABEL = "io.gpulab.harness=1"
# Runs a module file as Ansible would on the server, with the collection (ansible_collections/ in argv[1]) importable.
RUN_MODULE = (
    "import runpy, sys; sys.path.insert(0, sys.argv[1]); "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
TOOLS = {
    "bin/sh": "/usr/bin/dash",
    "bin/sleep": "/usr/bin/sleep",
    "bin/cat": "/usr/bin/cat",
    "bin/head": "/usr/bin/head",
    "bin/chown": "/usr/bin/chown",
    "bin/rm": "/usr/bin/rm",
    "lib/x86_64-linux-gnu/libc.so.6": "/lib/x86_64-linux-gnu/libc.so.6",
    "lib64/ld-linux-x86-64.so.2": "/lib64/ld-linux-x86-64.so.2",
}


def docker_ok():
    if not shutil.which("docker") or not shutil.which("zstd"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


needs_docker = pytest.mark.skipif(not docker_ok(), reason="no Docker engine answers (or no zstd program)")


def sh(*argv, check=True):
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True).stdout.strip()


def inspect(ref, kind="container"):
    out = subprocess.run(["docker", kind, "inspect", ref], capture_output=True, text=True, check=False)
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


def build_tiny_image(workdir):
    """gpulab-unittest/backup-tiny:<random>: layer 1 the tools, layer 2 a data file. Returns (name, image id)."""
    ctx = Path(workdir) / "tiny-image"
    for rel, src in TOOLS.items():
        dest = ctx / "rootfs" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(src), dest)
    for folder in ("root", "tmp", "work", "etc/gpulab"):
        (ctx / "rootfs" / folder).mkdir(parents=True, exist_ok=True)
    (ctx / "rootfs" / "tmp").chmod(0o1777)
    (ctx / "layer2").mkdir()
    (ctx / "layer2" / "data.txt").write_text(f"layer two {uuid.uuid4()}\n" * 20000)
    (ctx / "Dockerfile").write_text(
        'FROM scratch\nCOPY rootfs/ /\nCOPY layer2/ /opt/\nCMD ["/bin/sleep", "infinity"]\n'
    )
    name = f"gpulab-unittest/backup-tiny:{uuid.uuid4().hex[:8]}"
    sh("docker", "build", "-q", "--label", LABEL, "-t", name, ctx)
    return name, inspect(name, "image")["Id"]


def run_container(name, image, *options):
    """docker run -d with the harness label; returns the container's ID."""
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    return sh("docker", "run", "-d", "--name", name, "--label", LABEL, *options, image)


def remove_container(name):
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


def images_of(container):
    """Images a test made for this container: restored gpulab-backup/<name>:* and commits a killed backup left."""
    refs = sh("docker", "images", "--format", "{{.Repository}}:{{.Tag}}", f"gpulab-backup/{container}").split()
    for image_id in sh("docker", "images", "-q", "--filter", "dangling=true", "--filter", f"label={LABEL}").split():
        data = inspect(image_id, "image") or {}
        if f" of {container}" in (data.get("Comment") or ""):
            refs.append(image_id)
    return refs


def remove_images_of(container):
    for ref in images_of(container):
        subprocess.run(["docker", "rmi", "-f", ref], capture_output=True, check=False)


def free_port():
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(module, args, check_mode=False):
    """Run a module's main() in-process; returns its result, raises ModuleFail on fail_json."""
    with patch_module_args({**args, "_ansible_check_mode": check_mode}), pytest.raises(ModuleExit) as info:
        module.main()
    if isinstance(info.value, ModuleFail):
        raise info.value
    return info.value.result


def module_argv(name, args_file):
    """argv that runs the collection's module <name> in a subprocess as Ansible does on a server."""
    return [
        sys.executable,
        "-c",
        RUN_MODULE,
        str(ROOT),
        str(ROOT / "ansible_collections/gpulab/lab" / "plugins" / "modules" / f"{name}.py"),
        args_file,
    ]


def write_args(path, args):
    Path(path).write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    return str(path)


def engine_events(since, until, *words):
    """The engine's events between two times (unix seconds) whose JSON mentions any of words.

    docker events rounds --since down to whole seconds, so the events are filtered again by their own timeNano.
    """
    out = sh("docker", "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}", "--format", "{{json .}}")
    found = []
    for line in out.splitlines():
        if not any(w in line for w in words):
            continue
        try:
            when = json.loads(line).get("timeNano", 0) / 1e9
        except ValueError:
            when = since
        if when >= since:
            found.append(line)
    return found


def engine_state(container):
    """What a restore must not change: the container (id, state) and the images of the test's container."""
    data = inspect(container)
    state = (data["Id"], data["State"]["Status"], data["Image"]) if data else None
    return state, sorted(images_of(container))


def wait_for(predicate, timeout=60, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
