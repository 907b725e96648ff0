"""Checks of role nvidia_runtime on a Debian 12 lab server WITHOUT a GPU, after converge (site.yml: role docker, then
nvidia_runtime with nvidia_runtime_required: false and nvidia_runtime_default: true, then role docker's one merge of
daemon.json with the runtime's keys and one restart).

NVIDIA's apt repository is unreachable from gpulab's test network and the test machines have no GPU, so what the
role installs here are TEST STAND-INs of NVIDIA's packages (tests/harness/nvidia-standin): same names, versions and
paths, but /usr/bin/nvidia-container-runtime hands every call over to runc. These tests prove the role's own work
(repository, package, daemon.json, Docker's runtimes, removal of nvidia-docker 1.0, the no-GPU decisions, the
check that runs in a container), not GPU access.

The tests run top to bottom. The later ones run gpulab.lab.nvidia again (ansible-playbook against the molecule
inventory) and change the server: first without a GPU (nvidia_runtime_required true, auto), then with
nvidia_runtime_default: false on a server with a fresh stale nvidia-docker 1.0 and a stand-in nvidia-smi that replays
the real H200's output, last in check mode, which must find nothing left to change.
"""

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
from playbook_run import JSON_RESULTS, PROJECT_DIR, playbook_runner

STANDIN_DIR = "/srv/gpulab-nvidia/debs"  # where prepare built the stand-in .debs
ADMIN_KEYS = {"max-concurrent-downloads": 7, "labels": ["gpulab-test=admin-key"]}
NO_GPU = "No nvidia-smi was found on this host, so no NVIDIA driver is installed"


def daemon_json(host):
    return json.loads(host.file("/etc/docker/daemon.json").content_string)


def docker_runtimes(host):
    runtimes = json.loads(host.check_output("docker info --format '{{json .Runtimes}}'"))
    default = host.check_output("docker info --format '{{.DefaultRuntime}}'").strip()
    return runtimes, default


def snapshot(host):
    """What a run that changes nothing must leave exactly as it was."""
    return {
        "daemon.json": hashlib.sha256(host.file("/etc/docker/daemon.json").content).hexdigest(),
        "packages": host.check_output("dpkg-query --show --showformat='${Package} ${Version} ${db:Status-Abbrev}\\n'"),
        "apt sources": host.check_output("ls -l --time-style=+%s.%N /etc/apt/sources.list.d /etc/apt/keyrings"),
        "containers": host.check_output("docker ps -a --format '{{.Names}} {{.Status}}'"),
    }


@pytest.fixture(scope="module")
def hostname(host):
    return host.backend.host


@pytest.fixture(scope="module")
def nvidia_play(hostname, tmp_path_factory):
    """Run gpulab.lab.nvidia against the instance (in group gpu_servers) with extra vars; returns a Run."""
    return playbook_runner(hostname, "gpulab.lab.nvidia", tmp_path_factory.mktemp("inventory"), env=JSON_RESULTS)


# ---- the converged server -------------------------------------------------------------------------------------


def test_site_yml_wrote_daemon_json_once_and_restarted_docker_once(host):
    """On this server site.yml changes daemon.json for two roles (docker's defaults, the nvidia runtime): role docker,
    the file's one owner, writes it once and restarts Docker once. Runs first: later tests restart Docker again."""
    since = host.file("/var/tmp/gpulab-prepared-at").content_string.strip()
    journal = host.check_output(f"journalctl --unit docker.service --since @{since} --output cat")
    starts = re.findall(r"(?m)^Starting (?:docker\.service - )?Docker Application Container Engine", journal)
    assert len(starts) == 1, journal[-3000:]
    written = host.check_output(f"find /etc/docker -maxdepth 1 -name 'daemon.json.*~' -newerct @{since}").split()
    assert len(written) == 1, written  # one backup: the file was written once (backup: true keeps each old version)
    data = daemon_json(host)
    assert data["default-runtime"] == "nvidia" and data["live-restore"] is True


def test_docker_lists_the_nvidia_runtime_as_default(host):
    runtimes, default = docker_runtimes(host)
    assert runtimes["nvidia"]["path"] == "nvidia-container-runtime"
    assert default == "nvidia"  # nvidia_runtime_default: true in converge


def test_a_container_runs_through_the_nvidia_runtime(host):
    run = host.run("docker run --rm --network none --runtime=nvidia gpulab-test/true:latest")
    assert run.rc == 0, run.stderr
    # ... and it really went through /usr/bin/nvidia-container-runtime (the stand-in, which hands over to runc):
    # without that file the same command fails.
    host.check_output("mv /usr/bin/nvidia-container-runtime /usr/bin/nvidia-container-runtime.away")
    try:
        missing = host.run("docker run --rm --network none --runtime=nvidia gpulab-test/true:latest")
    finally:
        host.check_output("mv /usr/bin/nvidia-container-runtime.away /usr/bin/nvidia-container-runtime")
    assert missing.rc != 0
    assert "nvidia-container-runtime" in missing.stderr


def test_daemon_json_keeps_the_admins_and_the_docker_roles_keys(host):
    data = daemon_json(host)
    for key, value in ADMIN_KEYS.items():  # put there by the admin before gpulab ran
        assert data[key] == value
    assert data["live-restore"] is True  # the docker role's
    assert data["log-opts"] == {"labels": "gpulab", "max-size": "100m", "max-file": "3"}
    assert data["runtimes"] == {"nvidia": {"path": "nvidia-container-runtime", "args": []}}
    assert data["default-runtime"] == "nvidia"


def test_the_toolkit_comes_from_the_flat_repository(host):
    package = host.package("nvidia-container-toolkit")
    assert package.is_installed
    assert package.version == "1.17.8-1"
    assert "gpulab TEST STAND-IN" in host.check_output(
        "dpkg-query --show --showformat='${Description}' nvidia-container-toolkit"
    )
    assert host.check_output("nvidia-ctk --version").startswith("NVIDIA Container Toolkit CLI version 1.17.8")
    source = host.file("/etc/apt/sources.list.d/nvidia-container-toolkit.list").content_string
    lines = [line for line in source.splitlines() if line and not line.startswith("#")]
    assert lines == [
        "deb [signed-by=/etc/apt/keyrings/nvidia-container-toolkit.asc] http://127.0.0.1:8082/stable/deb/$(ARCH) /"
    ]
    key = host.file("/etc/apt/keyrings/nvidia-container-toolkit.asc")
    assert key.mode == 0o644
    assert key.content_string.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert "127.0.0.1:8082/stable/deb/amd64" in host.check_output("apt-cache policy nvidia-container-toolkit")
    update = host.run("apt-get update")
    assert update.rc == 0, update.stderr
    assert "W:" not in update.stderr and "E:" not in update.stderr, update.stderr


def test_the_stale_nvidia_docker_1_is_gone(host):
    assert not host.package("nvidia-docker").is_installed
    assert not host.file("/usr/bin/nvidia-docker-plugin").exists
    assert not host.service("nvidia-docker").is_running
    assert "old-cuda-notebook" not in host.check_output("docker ps -a --format '{{.Names}}'")
    assert "nvidia_driver_470.256.02" not in host.check_output("docker volume ls -q")


# ---- gpulab.lab.nvidia again, on the server without a GPU --------------------------------------------------


def test_without_a_gpu_required_true_fails_before_changing_anything(host, nvidia_play, hostname):
    before = snapshot(host)
    run = nvidia_play({"nvidia_runtime_required": "true"})
    assert run.rc != 0
    assert run.failed == 1 and run.changed == 0
    assert f"nvidia_runtime_required is true, but {hostname} has no NVIDIA GPU ({NO_GPU}). Nothing was changed." in run
    assert snapshot(host) == before  # daemon.json byte for byte, packages, apt sources, containers


def test_without_a_gpu_auto_skips_the_role_with_a_message(host, nvidia_play, hostname):
    before = snapshot(host)
    run = nvidia_play({"nvidia_runtime_required": "auto"})
    assert run.rc == 0, run.raw[-3000:]
    assert run.failed == 0 and run.changed == 0
    assert f"Skipped the NVIDIA container runtime on {hostname}: the host has no NVIDIA GPU ({NO_GPU})." in run
    assert "nothing was installed or changed" in run
    assert snapshot(host) == before


# ---- nvidia_runtime_default: false, with a stale nvidia-docker 1.0 and a stand-in GPU; then check mode -------


@pytest.fixture
def stale_nvidia_docker(host):
    """nvidia-docker 1.0 once more, with a driver volume and a container that uses it."""
    host.check_output(f"dpkg -i {STANDIN_DIR}/legacy/nvidia-docker_1.0.1-1_amd64.deb")
    host.check_output("docker volume create --driver nvidia-docker nvidia_driver_535.216.01")
    host.check_output(
        "docker create --name old-pytorch-lab --network none"
        " -v nvidia_driver_535.216.01:/usr/local/nvidia:ro gpulab-test/true:latest"
    )


@pytest.fixture
def standin_gpu(host, tmp_path):
    """A stand-in GPU: nvidia-smi replaying the real H200's output on the host, and an image whose nvidia-smi prints
    the H200's `nvidia-smi -L` (the real runtime would mount the host's nvidia-smi into the container; the stand-in
    runtime does not)."""
    fixture = PROJECT_DIR / "tests" / "fixtures" / "nvidia-smi" / "h200"
    replay = PROJECT_DIR / "tests" / "harness" / "nvidia-standin" / "nvidia-smi-replay.sh"
    smi = tmp_path / "nvidia-smi"
    smi.mkdir()
    shutil.copy(replay, smi / replay.name)
    for name in ("nvidia-smi-q.xml", "nvidia-smi-L.txt", "query-gpu.csv", "nvidia-smi.txt"):
        shutil.copy(fixture / name, smi / name)
    host.ansible("copy", f"src={smi}/ dest=/opt/gpulab-nvidia-smi/ mode=preserve", check=False)
    host.check_output("ln -sf /opt/gpulab-nvidia-smi/nvidia-smi-replay.sh /usr/local/bin/nvidia-smi")
    gpu_line = (fixture / "nvidia-smi-L.txt").read_text().strip()
    context = tmp_path / "image"
    context.mkdir()
    (context / "nvidia-smi").write_text(
        f"#!/bin/sh\n# gpulab TEST STAND-IN: the H200's nvidia-smi -L\necho '{gpu_line}'\n"
    )
    (context / "Dockerfile").write_text("FROM scratch\nCOPY rootfs/ /\n")
    image_dir = "/var/tmp/gpulab-standin-nvidia-smi"
    host.check_output(f"rm -rf {image_dir} && mkdir -p {image_dir}/rootfs/usr/bin")
    host.ansible("copy", f"src={context}/ dest={image_dir}/ mode=0644", check=False)
    host.check_output(
        f"cd {image_dir} && mkdir -p rootfs/bin rootfs/lib/x86_64-linux-gnu rootfs/lib64"
        " && cp /bin/dash rootfs/bin/sh && install -m 0755 nvidia-smi rootfs/usr/bin/nvidia-smi"
        " && cp /lib/x86_64-linux-gnu/libc.so.6 rootfs/lib/x86_64-linux-gnu/"
        " && cp /lib64/ld-linux-x86-64.so.2 rootfs/lib64/"
        " && docker build -q -t gpulab-test/standin-nvidia-smi:latest ."
    )
    assert host.check_output("docker run --rm gpulab-test/standin-nvidia-smi:latest nvidia-smi -L") == gpu_line
    yield gpu_line
    host.check_output("rm -f /usr/local/bin/nvidia-smi")


def test_default_false_removes_default_runtime_and_stale_nvidia_docker(
    host, nvidia_play, hostname, stale_nvidia_docker, standin_gpu
):
    run = nvidia_play(
        {
            "nvidia_runtime_default": False,
            "nvidia_runtime_required": True,  # the stand-in GPU is there
            "nvidia_runtime_verify_image": "gpulab-test/standin-nvidia-smi:latest",
        }
    )
    assert run.rc == 0, run.raw[-4000:]
    # default-runtime removed (it named nvidia), the runtime itself stays; Docker restarted.
    runtimes, default = docker_runtimes(host)
    assert "nvidia" in runtimes
    assert default == "runc"
    data = daemon_json(host)
    assert "default-runtime" not in data
    assert data["runtimes"] == {"nvidia": {"path": "nvidia-container-runtime", "args": []}}
    for key, value in ADMIN_KEYS.items():
        assert data[key] == value
    assert data["live-restore"] is True
    # Role docker merged the change (the file's one owner) and said whose key it was; the runtime's check followed.
    changed = f"Changed /etc/docker/daemon.json on {hostname}: default-runtime (nvidia_runtime); Docker restarts once."
    assert changed in run
    assert f"Docker on {hostname} has the nvidia runtime (nvidia-container-toolkit); default runtime runc." in run
    # nvidia-docker 1.0 removed, and said so.
    assert not host.package("nvidia-docker").is_installed
    assert "old-pytorch-lab" not in host.check_output("docker ps -a --format '{{.Names}}'")
    assert "nvidia_driver_535.216.01" not in host.check_output("docker volume ls -q")
    assert (
        f"Removed the legacy nvidia-docker 1.0 from {hostname}: package nvidia-docker 1.0.1-1;"
        " 1 container(s) that used its volumes [old-pytorch-lab];"
        " 1 volume(s) of its volume driver nvidia-docker [nvidia_driver_535.216.01]." in run
    )
    # The GPU check ran nvidia-smi -L in a container through the runtime, and it listed the one GPU.
    assert f"A container on {hostname} sees the GPUs through the nvidia runtime: {standin_gpu}." in run


def test_check_mode_then_finds_nothing_to_change(host, nvidia_play):
    """A check-mode run predicts no change (so a real run would change nothing), and changes nothing itself."""
    before = snapshot(host)
    run = nvidia_play({"nvidia_runtime_default": False}, "--check", "--diff")
    assert run.rc == 0, run.raw[-3000:]
    assert run.changed == 0, run.raw[-3000:]
    assert "Removed the legacy" not in run
    assert snapshot(host) == before
