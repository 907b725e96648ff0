"""Checks of role notebook on a Debian 12 lab server after converge: two students' real Jupyter notebooks
(Notebook 6.4 of the deep-learning-like image), student1 with a token and GPU 0, student2 with a password and no GPU.

The server has no GPU: gpu_facts reads a stand-in nvidia-smi that replays a real H200, and the stand-in NVIDIA
toolkit's hook lets dockerd accept GPU requests (tests/harness/nvidia-standin). The GPU checks prove the request that
reaches the runtime (the OCI spec's hook and NVIDIA_VISIBLE_DEVICES), not GPU access.

The first tests look at the converged server: the containers, Jupyter over HTTP inside the server and through a real
`ssh -L` tunnel from this machine (the instance's sshd is published on 127.0.0.1), the files, the secrets, the access
sheet. The later ones run gpulab.lab.notebook again against the instance: bad input (every problem reported, with
nothing changed), check mode, a changed memory limit and password, and state: absent; they run in this file's order.
"""

import hashlib
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
from jupyter_client import Jupyter
from playbook_run import run_playbook

EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
KEY = EPHEMERAL / "ssh" / "id_ed25519"
CLIENT = Path(__file__).resolve().parents[2] / "shared" / "tests" / "jupyter_client.py"
CLIENT_ON_SERVER = "/opt/gpulab-test/jupyter_client.py"
CONFIG_MOUNT = "/etc/gpulab-notebook"
NAMES = ["student1", "student2"]
H200_UUID = "GPU-00000000-1111-2222-3333-444444444444"
NOTES = f"notes-{secrets.token_hex(4)}.txt"  # a new file in each run (the contents API answers 201 to a new one)


@pytest.fixture(scope="module")
def hostname(host):
    return host.backend.host


@pytest.fixture(scope="module")
def variables(host):
    return host.ansible.get_variables()


@pytest.fixture(scope="module")
def server(hostname):
    """The instance through docker exec: much faster than testinfra's ansible backend for the many commands here."""
    return testinfra.get_host(f"docker://{hostname}")


@pytest.fixture(scope="module")
def users(variables):
    """converge's notebook_users (with the secrets), by name."""
    return {entry["name"]: entry for entry in variables["notebook_users"]}


@pytest.fixture(scope="module")
def sheet(hostname):
    return EPHEMERAL / "access" / f"{hostname}.txt"


@pytest.fixture(scope="module")
def notebook_play(hostname):
    """Run gpulab.lab.notebook against the instance with extra vars; returns a Run."""
    env = {
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
    }

    def run(extra_vars, *options):
        return run_playbook(hostname, "gpulab.lab.notebook", extra_vars, *options, env=env)

    return run


@pytest.fixture(scope="module")
def client_on_server(server):
    server.check_output(f"mkdir -p {os.path.dirname(CLIENT_ON_SERVER)}")
    subprocess.run(["docker", "cp", str(CLIENT), f"{server.backend.name}:{CLIENT_ON_SERVER}"], check=True)
    return CLIENT_ON_SERVER


def jupyter_in_server(server, client, port, *args):
    """The Jupyter client run inside the server, against 127.0.0.1:port; its JSON result."""
    command = " ".join(shlex.quote(str(arg)) for arg in ["python3", client, port, *args])
    return json.loads(server.check_output(command))


def inspect(server, container):
    return json.loads(server.check_output(f"docker inspect {container}"))[0]


def account(server, name):
    fields = server.check_output(f"getent passwd {name}").split(":")
    return int(fields[2]), int(fields[3])


def secrets_in(entry):
    return [entry[key] for key in ("token", "password", "password_hash") if entry.get(key)]


def snapshot(server, sheet):
    """What a run that changes nothing must leave as it was: containers (IDs, start times), folders, configs, sheet."""
    return {
        "containers": server.check_output(
            "docker ps -aq --no-trunc | sort | xargs -r docker inspect"
            " --format '{{.Name}} {{.Id}} {{.State.StartedAt}} {{.State.Running}}'"
        ),
        "folders": server.check_output(
            "find /srv/notebooks /etc/gpulab -maxdepth 2 -not -name '.*' -printf '%p %u %g %m %y\\n' | sort"
        ),
        "configs": server.check_output("sha256sum /etc/gpulab/notebook/*/*"),
        "sheet": hashlib.sha256(sheet.read_bytes()).hexdigest(),
    }


# ---- the converged server -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_container_runs_as_the_lab_asked(server, users, name):
    entry = users[name]
    uid, gid = account(server, name)
    workdir = entry["workdir"]
    container_workdir = entry.get("container_workdir", "/workspace")
    info = inspect(server, f"notebook-{name}")
    assert info["State"]["Running"] is True
    assert info["Config"]["User"] == f"{uid}:{gid}"
    assert info["Config"]["Labels"]["io.gpulab.notebook.user"] == name
    host_config = info["HostConfig"]
    assert host_config["PortBindings"] == {"8888/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(entry["port"])}]}
    assert host_config["IpcMode"] == "host"
    assert host_config["RestartPolicy"]["Name"] == "unless-stopped"
    assert host_config["Init"] is True
    mounts = {mount["Destination"]: mount for mount in info["Mounts"]}
    assert set(mounts) == {container_workdir, CONFIG_MOUNT}
    assert (mounts[container_workdir]["Source"], mounts[container_workdir]["RW"]) == (workdir, True)
    assert (mounts[CONFIG_MOUNT]["Source"], mounts[CONFIG_MOUNT]["RW"]) == (f"/etc/gpulab/notebook/{name}", False)
    assert info["Config"]["Cmd"] == [
        "python3",
        "-m",
        "notebook",
        "--no-browser",
        "--ip=0.0.0.0",
        "--port=8888",
        "--allow-root",
        f"--notebook-dir={container_workdir}",
        f"--config={CONFIG_MOUNT}/gpulab_jupyter_config.json",
    ]
    env = dict(item.split("=", 1) for item in info["Config"]["Env"])
    assert env["HOME"] == container_workdir
    assert {key: env[key] for key in entry.get("env", {})} == entry.get("env", {})
    if name == "student1":  # gpus: [0], memory 2g, cpus 1.5
        assert host_config["DeviceRequests"] == [
            {"Driver": "nvidia", "Count": 0, "DeviceIDs": ["0"], "Capabilities": [["gpu"]], "Options": None}
        ]
        assert host_config["Memory"] == 2 * 1024**3
        assert host_config["NanoCpus"] == 1_500_000_000
    else:  # gpus: none, no limits
        assert not host_config["DeviceRequests"]
        assert host_config["Memory"] == 0
        assert host_config["NanoCpus"] == 0


def test_the_ports_are_published_on_127_0_0_1_only(server, users):
    listening = server.check_output("ss -H -t -l -n").split("\n")
    for entry in users.values():
        addresses = {line.split()[3] for line in listening if line.split()[3].endswith(f":{entry['port']}")}
        assert addresses == {f"127.0.0.1:{entry['port']}"}, listening


def test_the_gpu_request_reaches_the_runtime(server):
    """dockerd hands student1's request for GPU 0 to the NVIDIA hook (the stand-in here): the container's OCI spec
    has the hook and NVIDIA_VISIBLE_DEVICES=0. student2's has neither."""

    def oci_spec(name):
        container_id = inspect(server, f"notebook-{name}")["Id"]
        path = f"/run/containerd/io.containerd.runtime.v2.task/moby/{container_id}/config.json"
        return json.loads(server.file(path).content_string)

    first = oci_spec("student1")
    assert "/usr/bin/nvidia-container-runtime-hook" in [hook["path"] for hook in first["hooks"]["prestart"]]
    assert "NVIDIA_VISIBLE_DEVICES=0" in first["process"]["env"]
    second = oci_spec("student2")
    assert "/usr/bin/nvidia-container-runtime-hook" not in [hook["path"] for hook in second["hooks"]["prestart"]]
    assert not [item for item in second["process"]["env"] if item.startswith("NVIDIA_")]


def test_jupyter_answers_with_the_token_only(server, users, client_on_server):
    port, token = users["student1"]["port"], users["student1"]["token"]
    assert jupyter_in_server(server, client_on_server, port) == {"status": 403}
    assert jupyter_in_server(server, client_on_server, port, "--token", token) == {"status": 200}
    assert jupyter_in_server(server, client_on_server, port, "--token", "0" * 48) == {"status": 403}


def test_jupyter_answers_with_the_password_only(server, users, client_on_server):
    port, password = users["student2"]["port"], users["student2"]["password"]
    assert jupyter_in_server(server, client_on_server, port) == {"status": 403}
    assert jupyter_in_server(server, client_on_server, port, "--password", "not the password") == {
        "login": 401,
        "status": 403,
    }
    assert jupyter_in_server(server, client_on_server, port, "--password", password) == {"login": 302, "status": 200}


@pytest.mark.parametrize("name", NAMES)
def test_a_file_saved_in_jupyter_belongs_to_the_student_on_the_host(server, users, client_on_server, name):
    entry = users[name]
    login = ["--token", entry["token"]] if "token" in entry else ["--password", entry["password"]]
    text = f"saved by {name}'s notebook"
    result = jupyter_in_server(server, client_on_server, entry["port"], *login, "--put", f"{name}-{NOTES}", text)
    assert result["put"] == 201
    saved = server.file(f"{entry['workdir']}/{name}-{NOTES}")
    uid, gid = account(server, name)
    assert (saved.uid, saved.gid) == (uid, gid)
    assert saved.content_string == text
    workdir = server.file(entry["workdir"])
    assert (workdir.uid, workdir.gid, workdir.mode) == (uid, gid, 0o750)


def test_the_secrets_are_in_no_command_line_environment_or_inspect_output(server, users):
    seen = server.check_output("docker inspect notebook-student1 notebook-student2; ps -eo args")
    for entry in users.values():
        for secret in secrets_in(entry):
            assert secret not in seen
    hashed = json.loads(server.file("/etc/gpulab/notebook/student2/gpulab_jupyter_config.json").content_string)
    assert hashed["NotebookApp"]["password"].startswith("sha256:")
    assert hashed["NotebookApp"]["password"] not in seen
    assert users["student2"]["password"] not in hashed["NotebookApp"]["password"]


@pytest.mark.parametrize("name", NAMES)
def test_the_config_with_the_secret_is_readable_by_the_student_only(server, name):
    uid, gid = account(server, name)
    folder = server.file("/etc/gpulab/notebook")
    assert (folder.uid, folder.gid, folder.mode) == (0, 0, 0o700)
    config = server.file(f"/etc/gpulab/notebook/{name}/gpulab_jupyter_config.json")
    assert (config.uid, config.gid, config.mode) == (uid, gid, 0o400)
    assert server.check_output(f"ls /etc/gpulab/notebook/{name}") == "gpulab_jupyter_config.json"


def test_the_access_sheet_says_how_to_reach_each_notebook(sheet, users, variables):
    assert sheet.stat().st_mode & 0o777 == 0o600
    assert sheet.parent.stat().st_mode & 0o777 == 0o700
    text = sheet.read_text()
    ssh = f"ssh -p {variables['notebook_ssh_port']}"  # the instance's sshd, published on this machine's 127.0.0.1
    assert f"ssh: {ssh} -L 7777:127.0.0.1:7777 student1@127.0.0.1" in text
    assert f"url: http://localhost:7777/?token={users['student1']['token']}" in text
    assert f"ssh: {ssh} -L 8888:127.0.0.1:7778 student2@127.0.0.1" in text
    assert "url: http://localhost:8888/\n" in text
    assert users["student2"]["password"] not in text


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("name", NAMES)
def test_a_student_reaches_the_notebook_through_ssh_l(sheet, users, name):
    """The access sheet's own ssh -L command, run on this machine (the laptop) with the test key, and a free local
    port instead of the sheet's; then Jupyter through the tunnel, as the browser reaches it."""
    section = sheet.read_text().split(f"[{name}]\n", 1)[1]
    command = shlex.split(re.search(r"^ssh: (.*)$", section, re.MULTILINE).group(1))
    assert command[0] == "ssh"
    forward = command.index("-L") + 1
    sheet_local, target = command[forward].split(":", 1)
    assert target == f"127.0.0.1:{users[name]['port']}"
    entry = users[name]
    assert int(sheet_local) == entry.get("local_port", entry["port"])
    local = free_port()
    command[forward] = f"{local}:{target}"
    laptop_options = ["-N", "-i", str(KEY), "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"]
    laptop_options += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    tunnel = subprocess.Popen(
        [command[0], *laptop_options, *command[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        status = None
        for _ in range(60):
            assert tunnel.poll() is None, tunnel.communicate()
            try:
                status = Jupyter("127.0.0.1", local).status()
                break
            except OSError:
                time.sleep(0.5)
        assert status == 403  # Jupyter answered through the tunnel, and wants the secret
        if "token" in entry:
            assert Jupyter("127.0.0.1", local, token=entry["token"]).status() == 200
        else:
            browser = Jupyter("127.0.0.1", local)
            assert browser.login(entry["password"]) == 302
            assert browser.status() == 200
    finally:
        tunnel.terminate()
        try:
            tunnel.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tunnel.kill()


# ---- bad input: every problem reported at once, before anything changes ---------------------------------------

FOREIGN = "notebook-intruder"  # a container gpulab does not manage: its name is the one entry "intruder" would get
FOREIGN_PORT = 7790
NOT_A_FOLDER = "/srv/notebooks/not-a-folder"
TOKEN = secrets.token_hex(16)  # a valid token for the bad entries (each has another problem)
NEW_PASSWORD = secrets.token_urlsafe(12)  # student2's password after the change test


def bad_entry(name, port, **more):
    return {"name": name, "port": port, "workdir": f"/srv/notebooks/{name}", "uid": 2000 + port % 100, **more}


BAD_CASES = [
    ("invalid-name", bad_entry("Student 3!", 7781, token=TOKEN), "(Student 3!): the name must be 1 to 32 characters"),
    (
        "same-name",
        {**bad_entry("student1", 7782, token=TOKEN), "workdir": "/srv/notebooks/student1-again"},
        "the name student1 is already used by notebook_users entry 1 (student1)",
    ),
    ("no-token-no-password", bad_entry("nosecret", 7783), "(nosecret): no token and no password"),
    (
        "same-port",
        bad_entry("sameport", 7777, token=TOKEN),
        "(sameport): port 7777 is already used by notebook_users entry 1 (student1)",
    ),
    (
        "port-of-a-foreign-container",
        bad_entry("portthief", FOREIGN_PORT, token=TOKEN),
        f"(portthief): port {FOREIGN_PORT} is already published by the container {FOREIGN}, which gpulab does not"
        " manage",
    ),
    (
        "name-of-a-foreign-container",
        bad_entry("intruder", 7786, token=TOKEN),
        f"(intruder): a container named {FOREIGN} exists on the server and gpulab does not manage it",
    ),
    (
        "port-of-a-program-outside-docker",
        bad_entry("sshport", 22, token=TOKEN),
        "(sshport): port 22 is in use on the server by a program outside Docker",
    ),
    (
        "gpu-index-the-server-lacks",
        bad_entry("gpu1", 7787, token=TOKEN, gpus=[1]),
        f"(gpu1): GPU 1 is not on the server (its NVIDIA GPUs: 0 ({H200_UUID}))",
    ),
    (
        "gpu-uuid-the-server-lacks",
        bad_entry("gpuuuid", 7788, token=TOKEN, gpus=["GPU-deadbeef-0000-0000-0000-000000000000"]),
        "(gpuuuid): GPU GPU-deadbeef-0000-0000-0000-000000000000 is not on the server",
    ),
    (
        "workdir-is-a-file",
        {**bad_entry("fileworkdir", 7789, token=TOKEN), "workdir": NOT_A_FOLDER},
        f"(fileworkdir): workdir {NOT_A_FOLDER} exists on the server and is not a folder",
    ),
]


@pytest.fixture(scope="module")
def bad_run(server, users, notebook_play, sheet):
    """One run with every bad entry after converge's two students (student1 with a new memory limit, which must not
    be applied either), next to a container gpulab does not manage and a workdir that is a file."""
    server.check_output(
        f"docker run -d --name {FOREIGN} -p 127.0.0.1:{FOREIGN_PORT}:8888 --label io.gpulab.test=foreign"
        " gpulab-test/dl-notebook:latest sleep infinity"
    )
    server.check_output(f"touch {NOT_A_FOLDER}")
    try:
        before = snapshot(server, sheet)
        first = {**users["student1"], "memory": "3g"}
        entries = [first, users["student2"]] + [case[1] for case in BAD_CASES]
        run = notebook_play({"notebook_users": entries})
        yield run, before, snapshot(server, sheet)
    finally:
        server.run(f"docker rm -f {FOREIGN}; rm -f {NOT_A_FOLDER}")


@pytest.mark.parametrize("expected", [case[2] for case in BAD_CASES], ids=[case[0] for case in BAD_CASES])
def test_bad_input_is_reported(bad_run, expected):
    run, _, _ = bad_run
    assert expected in run, run.text[-4000:]


def test_bad_input_fails_before_anything_changes(bad_run, users):
    run, before, after = bad_run
    assert run.rc != 0
    assert run.failed == 1 and run.changed == 0
    assert f"has {len(BAD_CASES)} problem(s)" in run
    assert "Nothing was changed." in run
    assert after == before  # student1 not recreated, no folder made for any entry, configs and sheet as they were
    for entry in users.values():
        for secret in secrets_in(entry):
            assert secret not in run.raw


LAN_ADDRESS = "192.0.2.10"  # a server address on the lab's network (TEST-NET-1)


def test_a_bind_address_beyond_loopback_needs_a_password(server, users, notebook_play, sheet):
    before = snapshot(server, sheet)
    run = notebook_play({"notebook_bind_address": LAN_ADDRESS})
    assert run.rc != 0 and run.changed == 0
    assert (
        f"notebook_users entry 1 (student1): notebook_bind_address {LAN_ADDRESS} is not a loopback address, so the"
        " notebook is reachable from the network without the SSH tunnel; that needs a password" in run
    )
    assert "entry 2 (student2)" not in run  # student2 has a password
    assert snapshot(server, sheet) == before


# ---- changes --------------------------------------------------------------------------------------------------


def changed_users(users):
    """student1 with a new memory limit, student2 with a new password."""
    return [{**users["student1"], "memory": "3g"}, {**users["student2"], "password": NEW_PASSWORD}]


def test_check_mode_predicts_changes_and_makes_none(server, users, notebook_play, sheet):
    before = snapshot(server, sheet)
    run = notebook_play({"notebook_users": changed_users(users)}, "--check", "--diff")
    assert run.rc == 0, run.text[-3000:]
    assert run.changed >= 3  # student1's container; student2's config and restart
    assert snapshot(server, sheet) == before


def test_a_new_memory_limit_recreates_that_container_and_a_new_password_restarts_the_other(
    server, users, notebook_play, client_on_server
):
    first, second = inspect(server, "notebook-student1"), inspect(server, "notebook-student2")
    run = notebook_play({"notebook_users": changed_users(users)}, "-v")
    assert run.rc == 0, run.text[-3000:]
    # student1: a new container, with the new limit.
    now_first = inspect(server, "notebook-student1")
    assert now_first["Id"] != first["Id"]
    assert now_first["HostConfig"]["Memory"] == 3 * 1024**3
    assert now_first["State"]["Running"] is True
    # student2: the same container (only the secret changed), restarted so that Jupyter reads its new config.
    now_second = inspect(server, "notebook-student2")
    assert now_second["Id"] == second["Id"]
    assert now_second["State"]["StartedAt"] != second["State"]["StartedAt"]
    port = users["student2"]["port"]
    assert jupyter_in_server(server, client_on_server, port, "--password", NEW_PASSWORD) == {
        "login": 302,
        "status": 200,
    }
    old = jupyter_in_server(server, client_on_server, port, "--password", users["student2"]["password"])
    assert old == {"login": 401, "status": 403}
    # Verbose output, and still no secret in it.
    for secret in [*secrets_in(users["student1"]), *secrets_in(users["student2"]), NEW_PASSWORD]:
        assert secret not in run.raw


def test_new_gpus_recreate_that_container_and_absent_removes_the_other_keeping_its_workdir(
    server, users, notebook_play, sheet
):
    first = inspect(server, "notebook-student1")
    entries = changed_users(users)
    entries[0]["gpus"] = "all"
    entries[1] = {"name": "student2", "state": "absent"}
    run = notebook_play({"notebook_users": entries})
    assert run.rc == 0, run.text[-3000:]
    now_first = inspect(server, "notebook-student1")
    assert now_first["Id"] != first["Id"]
    assert now_first["HostConfig"]["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": None, "Capabilities": [["gpu"]], "Options": None}
    ]
    assert jupyter_in_server(
        server, CLIENT_ON_SERVER, users["student1"]["port"], "--token", users["student1"]["token"]
    ) == {"status": 200}
    assert "student2: removed (container notebook-student2; the workdir is kept)" in run
    assert "notebook-student2" not in server.check_output("docker ps -a --format '{{.Names}}'")
    assert server.file(f"/srv/notebooks/student2/student2-{NOTES}").exists  # the student's files stay
    assert not server.file("/etc/gpulab/notebook/student2").exists  # the secret goes
    assert "[student2]" not in sheet.read_text()
    assert "[student1]" in sheet.read_text()
