"""site.yml --check --diff on servers gpulab has never seen, without python3-apt (ansible.builtin.apt cannot run in
check mode without it; a real run installs it): one with no Docker, one with Debian's docker.io running. The run must
say what it would do, show daemon.json's diff, and change nothing.

Each server is a fresh container of the scenario's base image on the control node's engine, started like the
scenario's instance (systemd, its own dockerd inside), labelled io.gpulab.harness=1 and removed afterwards.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
from playbook_run import run_playbook

BASE_IMAGE = os.environ.get("GPULAB_BASE_IMAGE", "gpulab-test/debian:12")
CAPABILITIES = ["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "SYS_MODULE", "MKNOD", "NET_RAW", "SYS_CHROOT",
                "AUDIT_WRITE", "SETFCAP", "DAC_READ_SEARCH", "IPC_LOCK", "SYS_NICE"]  # fmt: skip


def docker(*args, timeout=600):
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=True).stdout


def on_server(name, script, timeout=600):
    return docker("exec", name, "bash", "-c", script, timeout=timeout)


def snapshot(name):
    """What a check-mode run must leave as it was."""
    return on_server(
        name,
        "dpkg-query --show --showformat='${Package} ${Version} ${db:Status-Abbrev}\\n'; ls -la --time-style=+%s.%N"
        " /etc/docker /etc/apt/sources.list.d /etc/apt/keyrings 2>&1; cat /etc/docker/daemon.json 2>&1;"
        " getent group docker; systemctl show --property MainPID docker.service 2>&1",
    )


@pytest.fixture(params=["no-docker", "docker.io"])
def fresh_server(request, tmp_path):
    """A server gpulab has never seen (no python3-apt), and the inventory that puts it in gpu_servers."""
    name = f"gpulab-check-mode-{request.param.replace('.', '')}-{uuid.uuid4().hex[:8]}"
    options = [f"--cap-add={cap}" for cap in CAPABILITIES]
    options += ["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined", "--cgroupns=host"]
    options += ["-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "-v", "/var/lib/docker", "--tmpfs", "/run"]
    options += ["--tmpfs", "/run/lock", "--label", "io.gpulab.harness=1"]
    docker("run", "-d", "--name", name, *options, BASE_IMAGE, "/lib/systemd/systemd")
    try:
        on_server(
            name, "until systemctl is-system-running --wait >/dev/null 2>&1 || [ $((n+=1)) -gt 60 ]; do sleep 1; done"
        )
        if request.param == "docker.io":
            install = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null"
            on_server(name, f"{install} && until docker info >/dev/null 2>&1; do sleep 1; done", timeout=900)
        on_server(name, "! dpkg-query --show --showformat='${db:Status-Abbrev}' python3-apt 2>/dev/null | grep -q ii")
        inventory = tmp_path / "fresh.json"
        variables = {
            "ansible_connection": "community.docker.docker",
            "ansible_become": False,
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        inventory.write_text(json.dumps({"gpu_servers": {"hosts": {name: variables}}}))
        yield name, request.param, inventory
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, check=False)


def test_site_yml_check_diff_on_a_server_gpulab_has_not_touched(fresh_server):
    name, kind, inventory = fresh_server
    before = snapshot(name)
    extra = {
        # no registry and no Docker repository here: Debian's docker.io, or keep the installed engine
        "docker_install_source": "distro" if kind == "no-docker" else "auto",
        "docker_users": [],  # the scenario's student1 does not exist on this server
    }
    run = run_playbook(name, "site.yml", extra, "--check", "--diff", inventories=[inventory], timeout=900)
    assert "python3-apt must be installed" not in run.raw, run.raw[-4000:]
    assert run.rc == 0 and run.failed == 0, run.raw[-4000:]
    if kind == "no-docker":
        assert f"Check mode: apt cannot preview on {name} (python3-apt is not installed yet" in run, run.raw[-4000:]
        assert "A real run would install docker.io (distro), python3-requests" in run, run.raw[-4000:]
    else:
        assert f"Check mode: apt cannot preview on {name} (python3-apt is not installed;" in run, run.raw[-4000:]
        # (up to the apostrophe: Ansible's YAML output doubles it)
        assert "A real run would install python3-requests for community.docker" in run, run.raw[-4000:]
    # --diff shows daemon.json as role docker would write it, and the run names the keys and whose they are.
    assert '+  "live-restore": true' in run.raw, run.raw[-4000:]
    assert (
        f"Check mode: would change /etc/docker/daemon.json on {name}: live-restore (docker_daemon_config_defaults)"
        in run
    )
    assert snapshot(name) == before


def test_backup_and_status_check_on_a_server_gpulab_has_not_touched(fresh_server, tmp_path):
    """The other playbooks' check mode on the same fresh servers: role backup says what a real run would install and
    set up (no store, no engine or no notebook yet: nothing to back up), role status reports the server as it is
    (no GPU, the engine or its absence) and writes its report on the control node only."""
    name, kind, inventory = fresh_server
    before = snapshot(name)
    backup = run_playbook(name, "gpulab.lab.backup", {}, "--check", "--diff", inventories=[inventory], timeout=600)
    assert "python3-apt must be installed" not in backup.raw, backup.raw[-4000:]
    assert backup.rc == 0 and backup.failed == 0, backup.raw[-4000:]
    assert f"Check mode: apt cannot preview on {name} (python3-apt is not installed" in backup, backup.raw[-4000:]
    assert "A real run would install zstd" in backup, backup.raw[-4000:]
    if kind == "no-docker":
        assert f"Check mode: no Docker engine answers on {name}: no container to back up yet" in backup, backup.raw
    else:
        assert f"No notebook container on {name} to back up" in backup, backup.raw[-4000:]
    output = tmp_path / "status"
    status = run_playbook(
        name, "gpulab.lab.status", {"status_output_dir": str(output)}, "--check", inventories=[inventory], timeout=600
    )
    assert status.rc == 0 and status.failed == 0, status.raw[-4000:]
    report = json.loads((output / "status.json").read_text())
    server = next(entry for entry in report["servers"] if entry["host"] == name)
    assert server["engine"]["running"] is (kind == "docker.io"), server
    assert server["notebooks"] == [], server
    assert snapshot(name) == before
