"""The notebook role's test cases shared by its filter tests (test_notebook_filters.py: the plan,
test_notebook_jupyter.py: Jupyter's flavours, commands and config, test_notebook_access.py: the access sheet): two
students on a server with gpu_facts' real H200 output, accounts, paths, containers as Docker's API lists them and
listening sockets as `ss -Htln` prints them. Not a test module itself."""

import hashlib
import importlib
import ipaddress
import json
import secrets
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
plan_filters = importlib.import_module("ansible_collections.gpulab.lab.plugins.filter.notebook_plan")

H200 = json.loads((ROOT / "tests" / "fixtures" / "nvidia-smi" / "h200" / "gpu_facts-on-device.json").read_text())["gpu"]
H200_UUID = H200["gpus"][0]["uuid"]
NO_GPU = {"present": False, "count": 0, "gpus": []}
TOKEN = secrets.token_hex(24)
PASSWORD = secrets.token_urlsafe(12) + " with spaces"
EVERYWHERE = str(ipaddress.IPv4Address(0))  # the bind address of every interface
IMAGE = "gpulab-test/dl-notebook:latest"
NOTEBOOK6 = {"notebook": "6.4.12", "jupyter_server": None, "jupyterlab": None}


def users():
    return [
        {"name": "student1", "port": 7777, "workdir": "/srv/notebooks/student1", "gpus": [0], "token": TOKEN},
        {"name": "student2", "port": 7778, "workdir": "/srv/notebooks/student2/", "password": PASSWORD},
    ]


def settings(**more):
    base = {
        "host": "gpu01",
        "bind_address": "127.0.0.1",
        "default_image": IMAGE,
        "frontend": "notebook",
        "ipc_mode": "host",
        "container_prefix": "notebook-",
        "config_dir": "/etc/gpulab/notebook",
        "gpu": H200,
        "accounts": {
            "student1": ["x", "1000", "1000", "", "/home/student1", "/bin/bash"],
            "student2": ["x", "1001", "1001", "", "/home/student2", "/bin/bash"],
        },
        "paths": [
            {"item": "/srv/notebooks/student1", "stat": {"exists": False}},
            {"item": "/srv/notebooks", "stat": {"exists": True, "isdir": True}},
        ],
        "containers": [],
        "listeners": ["0.0.0.0:22", "[::]:22", "127.0.0.53%lo:53"],
        "nproc": 8,
    }
    base.update(more)
    return base


def plan(entries=None, **more):
    return plan_filters.notebook_plan(users() if entries is None else entries, settings(**more))


def errors_of(entries=None, **more):
    return " | ".join(plan(entries, **more)["errors"])


def with_entry(changes=None, **more):
    """converge's two users and one more entry (entry 3), with `changes` (a dict, or keywords); None removes a key."""
    entry = {"name": "student3", "port": 7779, "workdir": "/srv/notebooks/student3", "uid": 1002, "token": TOKEN}
    entry.update(changes or {}, **more)
    return [*users(), {key: value for key, value in entry.items() if value is not None}]


def container(name, ports=(), owner=None, state="running"):
    """A container as Docker's /containers/json lists it (docker_host_info with verbose_output)."""
    return {
        "Id": hashlib.sha256(name.encode()).hexdigest(),
        "Names": [f"/{name}"],
        "Labels": {"io.gpulab.notebook.user": owner} if owner else {"maintainer": "someone"},
        "State": state,
        "Ports": [{"IP": ip, "PrivatePort": 8888, "PublicPort": port, "Type": "tcp"} for ip, port in ports],
    }
