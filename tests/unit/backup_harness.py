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


# ---- the systemd timer's command lines (role backup), run as its unit runs them ------------------------------------

UTILS = ROOT / "ansible_collections" / "gpulab" / "lab" / "plugins" / "module_utils"
ROLE_BACKUP = ROOT / "ansible_collections" / "gpulab" / "lab" / "roles" / "backup"


def timer_lib(workdir):
    """A copy of the files role backup installs on the server (docker_api.py, files.py and backup/*.py, nothing
    else) below workdir/lib; returns the environment the unit gives them (PYTHONPATH) and the python3 to use: the
    server's own (Debian's, without Ansible) when this machine has one."""
    lib = Path(workdir) / "lib"
    for source in [UTILS / "docker_api.py", UTILS / "files.py", *sorted((UTILS / "backup").glob("*.py"))]:
        target = lib / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(lib)}
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    return env, python


def unit_command(var, settings_file, python, **role_vars):
    """argv of one of the unit's commands, rendered from role backup's vars/main.yml (var: __backup_command, the
    ExecStart, or __backup_thaw_command, the ExecStopPost) with this test's settings file and role_vars (for example
    backup_containers); /usr/bin/python3 is replaced by python where this machine has none."""
    import shlex  # noqa: PLC0415

    import jinja2  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    template = (ROLE_BACKUP / "templates" / "gpulab-backup.service.j2").read_text()
    unit_key = {"__backup_command": "ExecStart", "__backup_thaw_command": "ExecStopPost"}[var]
    assert f"\n{unit_key}={{{{ {var} }}}}\n" in template  # the unit runs exactly that variable
    role = yaml.safe_load((ROLE_BACKUP / "vars" / "main.yml").read_text())
    values = {"backup_containers": [], **role_vars, "__backup_settings_file": str(settings_file)}
    argv = shlex.split(jinja2.Template(role[var]).render(**values))
    return [python if a == "/usr/bin/python3" else a for a in argv]


def timer_settings(path, store, containers=None, **options):
    """The settings file role backup writes for the timer: container_backup's options by their names (the role's
    __backup_settings), the containers only when backup_containers names them."""
    settings = {"store": str(store), "keep_last": 3, "include_workdir": True, "pause": True, "fast_path": True}
    settings.update(options)
    if containers:
        settings["container"] = list(containers)
    Path(path).write_text(json.dumps(settings, indent=2) + "\n")
    return Path(path)


@pytest.fixture(scope="module", name="tiny")
def tiny_fixture(tmp_path_factory):
    """Fixture tiny: the tiny test image (build_tiny_image), once per test module: its name; removed afterwards."""
    name, _image_id = build_tiny_image(tmp_path_factory.mktemp("image"))
    yield name
    subprocess.run(["docker", "rmi", "-f", name], capture_output=True, check=False)
