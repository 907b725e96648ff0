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


def test_the_notebooks_log_holds_no_token(server, users, client_on_server):
    """docker logs shows a notebook's log to everyone in the docker group: the browser's first request (the sheet's
    URL, /?token=..., which Notebook 6 logs as 302 GET /?token=...), a page that is not there with the token (404) and
    a wrong token (403) are logged with the token hidden."""
    port, token = users["student1"]["port"], users["student1"]["token"]
    wrong = secrets.token_hex(24)
    opened = jupyter_in_server(server, client_on_server, port, "--token", token, "--get", "/", "--get", "/no-such-page")
    assert opened["get"] == [302, 404]
    refused = jupyter_in_server(server, client_on_server, port, "--token", wrong, "--get", "/tree")
    assert refused["status"] == 403
    log = server.run("docker logs notebook-student1")
    text = log.stdout + log.stderr
    assert "GET /?token=(hidden)" in text and "GET /no-such-page?token=(hidden)" in text, text[-3000:]
    assert token not in text and wrong not in text


@pytest.mark.parametrize("name", NAMES)
def test_jupyters_runtime_files_are_not_in_the_workdir(server, users, client_on_server, name):
    """Jupyter writes its server info (with the token) and the kernels' connection files (with their keys) in its
    runtime folder: one inside the container that is not bind-mounted, not ~/.local/share/jupyter/runtime in the
    student's workdir (HOME)."""
    entry = users[name]
    login = ["--token", entry["token"]] if "token" in entry else ["--password", entry["password"]]
    started = jupyter_in_server(server, client_on_server, entry["port"], *login, "--start-kernel")
    assert started["kernel"] == 201
    container = f"notebook-{name}"
    inside = server.check_output(
        f"docker exec -u 0 {container} find / -xdev \\( -name 'nbserver-*.json' -o -name 'kernel-*.json' \\)"
    ).split()  # -xdev: the container's own file system, not its bind mounts
    assert {path.rsplit("/", 1)[0] for path in inside} == {"/tmp/jupyter-runtime"}, inside
    assert any(path.rsplit("/", 1)[1].startswith("kernel-") for path in inside), inside
    in_workdir = server.check_output(f"find {entry['workdir']} -name 'nbserver-*' -o -name 'kernel-*.json'")
    assert in_workdir == ""


@pytest.mark.parametrize("name", NAMES)
def test_the_config_with_the_secret_is_readable_by_the_student_only(server, name):
    uid, gid = account(server, name)
    folder = server.file("/etc/gpulab/notebook")
    assert (folder.uid, folder.gid, folder.mode) == (0, 0, 0o700)
    config = server.file(f"/etc/gpulab/notebook/{name}/gpulab_jupyter_config.json")
    assert (config.uid, config.gid, config.mode) == (uid, gid, 0o400)
    log_filter = server.file(f"/etc/gpulab/notebook/{name}/gpulab_jupyter_config.py")  # no secret: hides the token
    assert (log_filter.uid, log_filter.gid, log_filter.mode) == (uid, gid, 0o400)
    listed = server.check_output(f"ls /etc/gpulab/notebook/{name}").split()
    assert listed == ["gpulab_jupyter_config.json", "gpulab_jupyter_config.py"]


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


SSH_PORT = int(os.environ.get("GPULAB_NOTEBOOK_SSH_PORT", "22005"))  # the instance's sshd on this machine


def test_a_run_over_ssh_as_a_sudo_user_gives_the_servers_ssh_port_in_the_sheet(
    server, users, variables, sheet, monkeypatch
):
    """The play as an admin runs it: over SSH to the server's own port (ansible_host, ansible_port), as an account
    with sudo, and without notebook_ssh_host or notebook_ssh_port. The students' ssh commands then name that host and
    port; and the run changes nothing on the server that converge (through docker exec) set up."""
    hostname, access = server.backend.name, EPHEMERAL / "access-ssh"
    host_vars = {
        "ansible_connection": "ssh",
        "ansible_host": "127.0.0.1",
        "ansible_port": SSH_PORT,
        "ansible_user": "labadmin",
        "ansible_become": True,
        "ansible_ssh_private_key_file": str(KEY),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "ansible_python_interpreter": "/usr/bin/python3",
        "notebook_users": list(users.values()),
        "notebook_access_dir": str(access),
        "deepo_image_repository": variables["deepo_image_repository"],
        "deepo_image_tag": variables["deepo_image_tag"],
    }
    inventory = EPHEMERAL / "ssh-inventory.json"
    inventory.write_text(json.dumps({"gpu_servers": {"hosts": {hostname: host_vars}}}))
    monkeypatch.setenv("MOLECULE_INVENTORY_FILE", str(inventory))  # this inventory only: no notebook_ssh_* in it
    before = snapshot(server, sheet)
    run = run_playbook(hostname, "gpulab.lab.notebook")
    assert run.rc == 0, run.text[-3000:]
    text = (access / f"{hostname}.txt").read_text()
    assert f"ssh: ssh -p {SSH_PORT} -L 7777:127.0.0.1:7777 student1@127.0.0.1\n" in text
    assert f"ssh: ssh -p {SSH_PORT} -L 8888:127.0.0.1:7778 student2@127.0.0.1\n" in text
    assert f"ssh -p {SSH_PORT} -L 7777:127.0.0.1:7777 student1@127.0.0.1 then http://localhost:7777/" in run
    assert snapshot(server, sheet) == before


# ---- bad input: every problem reported at once, before anything changes ---------------------------------------

FOREIGN = "notebook-intruder"  # a container gpulab does not manage: its name is the one entry "intruder" would get
FOREIGN_PORT = 7790
NOT_A_FOLDER = "/srv/notebooks/not-a-folder"
RAMDISK = "/srv/ramdisk"  # a tmpfs the bad run mounts
TOKEN = secrets.token_hex(16)  # a valid token for the bad entries (each has another problem)
NEW_PASSWORD = secrets.token_urlsafe(12)  # student2's password after the change test


def bad_entry(name, port, **more):
    return {"name": name, "port": port, "workdir": f"/srv/notebooks/{name}", "uid": 2000 + len(name), **more}


BAD_CASES = [
    (
        "invalid-name",
        bad_entry("Student 3!", 7781, token=TOKEN),
        "entry 3 (Student 3!): the name must be 1 to 32 characters of a-z, 0-9, _ and -, starting with a letter or _"
        " (like a Linux user name), not 'Student 3!'",
    ),
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
    (
        "workdir-under-tmp",
        {**bad_entry("tmpwork", 7791, token=TOKEN), "workdir": "/tmp/nb/tmpwork"},
        "(tmpwork): workdir /tmp/nb/tmpwork is under /tmp, which the server empties",
    ),
    (
        "workdir-on-a-tmpfs",
        {**bad_entry("ramwork", 7792, token=TOKEN), "workdir": f"{RAMDISK}/ramwork"},
        f"(ramwork): workdir {RAMDISK}/ramwork is on a tmpfs ({RAMDISK}), which the server empties",
    ),
    ("empty-token", bad_entry("emptytoken", 7793, token=""), "entry 15 (emptytoken): token is '' (empty)"),
    (
        "state-not-a-state",
        bad_entry("carol", 7794, token=TOKEN, state="running"),
        "entry 16 (carol): state must be one of started, stopped, absent, not 'running'",
    ),
    (
        "port-not-a-number",
        bad_entry("dave", "seventy", token=TOKEN),
        "entry 17 (dave): port must be a number from 1 to 65535, not 'seventy'",
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
    server.check_output(f"mkdir -p {RAMDISK} && mount -t tmpfs -o size=1m gpulab-test {RAMDISK}")
    try:
        before = snapshot(server, sheet)
        first = {**users["student1"], "memory": "3g"}
        entries = [first, users["student2"]] + [case[1] for case in BAD_CASES]
        run = notebook_play({"notebook_users": entries})
        yield run, before, snapshot(server, sheet)
    finally:
        server.run(f"docker rm -f {FOREIGN}; rm -f {NOT_A_FOLDER}; umount {RAMDISK}; rmdir {RAMDISK}")


@pytest.mark.parametrize("expected", [case[2] for case in BAD_CASES], ids=[case[0] for case in BAD_CASES])
def test_bad_input_is_reported(bad_run, expected):
    run, _, _ = bad_run
    assert expected in run, run.text[-4000:]


def test_bad_input_fails_before_anything_changes(bad_run, server, users):
    run, before, after = bad_run
    assert run.rc != 0
    assert run.failed == 1 and run.changed == 0
    assert f"has {len(BAD_CASES)} problem(s)" in run
    assert "Nothing was changed." in run
    assert after == before  # student1 not recreated, no folder made for any entry, configs and sheet as they were
    assert not server.file("/tmp/nb").exists
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
    assert run.changed == 1  # one module run for both students
    assert (
        "student1: would be recreated (settings changed: memory 2g -> 3g); its running kernels would stop; its"
        " environment would be carried over" in run
    ), run.text[-3000:]
    assert "memory: 3g" in run  # --diff: the settings after
    assert "student2: would write /etc/gpulab/notebook/student2/gpulab_jupyter_config.json changed" in run
    assert "student2: would be restarted so that Jupyter reads its new config" in run
    assert snapshot(server, sheet) == before


FRESH = "gpulab-notebook-fresh"  # a Debian 12 server that has never seen gpulab: no Docker, no student accounts


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory):
    """A plain Debian 12 container of the base image (no Docker, no sudo, no accounts but root), reached through
    docker exec; an inventory of that server only."""
    image = os.environ.get("GPULAB_BASE_IMAGE", "gpulab-test/debian:12")
    subprocess.run(["docker", "rm", "-f", FRESH], capture_output=True, check=False)
    subprocess.run(
        ["docker", "run", "-d", "--name", FRESH, "--label", "io.gpulab.harness=1", image, "sleep", "infinity"],
        check=True,
        capture_output=True,
    )
    inventory = tmp_path_factory.mktemp("fresh") / "inventory.json"
    host_vars = {"ansible_connection": "community.docker.docker", "ansible_become": False}
    inventory.write_text(json.dumps({"gpu_servers": {"hosts": {FRESH: host_vars}}}))
    try:
        yield inventory, testinfra.get_host(f"docker://{FRESH}")
    finally:
        subprocess.run(["docker", "rm", "-f", FRESH], capture_output=True, check=False)


def fresh_users(**student2):
    return [
        {"name": "student1", "port": 7777, "workdir": "/srv/notebooks/student1", "uid": 1000, "token": TOKEN},
        {"name": "student2", "port": 7778, "workdir": "/srv/notebooks/student2", "uid": 1001, "password": "pw" * 8}
        | student2,
    ]


def test_check_mode_on_a_server_that_has_never_seen_gpulab_says_what_it_would_do(fresh_server, monkeypatch):
    inventory, fresh = fresh_server
    monkeypatch.setenv("MOLECULE_INVENTORY_FILE", str(inventory))
    extra = {"notebook_users": fresh_users(), "notebook_image": "gpulab-test/dl-notebook:latest"}
    extra["notebook_access_dir"] = str(EPHEMERAL / "access-fresh")
    run = run_playbook(FRESH, "gpulab.lab.notebook", extra, "--check")
    assert run.rc == 0 and run.failed == 0, run.text[-3000:]
    assert f"Check mode: no Docker engine answers on {FRESH} yet" in run
    assert (
        "student1: would be started (container notebook-student1, port 7777 on 127.0.0.1, workdir"
        " /srv/notebooks/student1 (created), GPUs none, login by token, image gpulab-test/dl-notebook:latest)" in run
    )
    assert "student2: would be started (container notebook-student2, port 7778 on 127.0.0.1" in run
    assert not fresh.file("/srv/notebooks").exists and not fresh.file("/etc/gpulab").exists
    # Bad input is found in check mode too, before Docker is even there.
    bad_users = fresh_users(workdir="/tmp/nb/s2")
    bad = run_playbook(FRESH, "gpulab.lab.notebook", {**extra, "notebook_users": bad_users}, "--check")
    assert bad.rc != 0 and bad.changed == 0
    assert "notebook_users entry 2 (student2): workdir /tmp/nb/s2 is under /tmp, which the server empties" in bad
    assert "Nothing was changed." in bad
    assert not fresh.file("/tmp/nb").exists


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
