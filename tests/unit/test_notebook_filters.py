"""Tests of the notebook role's decisions (plugins/filter/notebook.py): the plan of notebook_users
against a server (accounts, GPUs from gpu_facts' real H200 output, paths, containers as Docker's API lists them,
listening sockets as `ss -Htln` prints them), the Jupyter flavour of an image, the command line, the config file with
the secrets, the access sheet and the summary.

Every refusal the role promises has its case here; the molecule scenario `notebook` runs them against a real server.
"""

import base64
import copy
import hashlib
import importlib
import ipaddress
import json
import secrets
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

ROOT = Path(__file__).resolve().parents[2]
nb = importlib.import_module("ansible_collections.gpulab.lab.plugins.filter.notebook")

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
    return nb.notebook_plan(users() if entries is None else entries, settings(**more))


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


# ---- a good plan ----------------------------------------------------------------------------------------------


def restored(name, owner, image_label, backup="20261129T101500Z-1a2b3c"):
    """A notebook container that container_restore rebuilt from a backup: the backup's image, the restore label."""
    entry = container(name, ports=[("127.0.0.1", 7777)], owner=owner)
    entry["Image"] = f"gpulab-backup/{name}:{backup}"
    entry["Labels"].update({"io.gpulab.notebook.image": image_label, "io.gpulab.backup.restored-from": backup})
    return entry


def test_a_restored_notebook_keeps_the_backups_image_while_the_lab_image_is_unchanged():
    first, second = plan(containers=[restored("notebook-student1", "student1", IMAGE)])["users"]
    assert first["image"] == "gpulab-backup/notebook-student1:20261129T101500Z-1a2b3c"
    assert first["restored_from"] == "20261129T101500Z-1a2b3c"
    assert first["labels"]["io.gpulab.backup.restored-from"] == "20261129T101500Z-1a2b3c"
    assert first["labels"]["io.gpulab.notebook.image"] == IMAGE  # what the lab configured, still
    assert second["image"] == IMAGE and "restored_from" not in second


def test_a_new_lab_image_replaces_a_restored_notebooks_image():
    old = restored("notebook-student1", "student1", "gpulab-test/dl-notebook:old")
    first, _ = plan(containers=[old])["users"]
    assert first["image"] == IMAGE and "restored_from" not in first
    assert "io.gpulab.backup.restored-from" not in first["labels"]


def test_a_restored_container_of_another_owner_is_not_adopted():
    first, _ = plan(containers=[restored("notebook-student1", "student9", IMAGE)])["users"]
    assert first["image"] == IMAGE


def test_two_students_are_planned_as_the_lab_asked():
    result = plan()
    assert result["errors"] == []
    first, second = result["users"]
    assert first["name"] == "student1" and first["container"] == "notebook-student1"
    assert first["publish"] == "127.0.0.1:7777:8888"
    assert (first["uid"], first["gid"], first["user"]) == (1000, 1000, "1000:1000")
    assert first["device_requests"] == [
        {"driver": "nvidia", "count": 0, "device_ids": ["0"], "capabilities": [["gpu"]]}
    ]
    assert first["gpus"] == "0"
    assert first["auth"] == "token"
    assert first["env"] == {"HOME": "/workspace"}
    assert first["mounts"] == [
        {"type": "bind", "source": "/srv/notebooks/student1", "target": "/workspace", "read_only": False},
        {
            "type": "bind",
            "source": "/etc/gpulab/notebook/student1",
            "target": "/etc/gpulab-notebook",
            "read_only": True,
        },
    ]
    assert first["labels"] == {
        "io.gpulab.notebook": "1",
        "io.gpulab.notebook.user": "student1",
        "io.gpulab.notebook.limits": "memory=none cpus=none shm_size=none",
        "io.gpulab.notebook.image": IMAGE,
    }
    assert first["ipc_mode"] == "host"
    assert first["parent_exists"] is True
    assert second["workdir"] == "/srv/notebooks/student2"  # normalised
    assert second["auth"] == "password"
    assert second["device_requests"] == [] and second["gpus"] == "none"
    assert second["local_port"] == 7778


def test_the_plan_holds_no_secret():
    entries = users()
    entries[1]["password_hash"] = entries[1].pop("password")
    entries[1]["password_hash"] = nb.password_hash(PASSWORD, "seed")
    text = json.dumps(nb.notebook_plan(entries, settings()))
    assert TOKEN not in text and entries[1]["password_hash"] not in text


def test_absent_first_then_stopped_then_started():
    entries = [*users(), {"name": "old", "state": "absent"}]
    entries[0]["state"] = "stopped"
    result = plan(entries)
    assert result["errors"] == []
    assert [(user["name"], user["state"]) for user in result["users"]] == [
        ("old", "absent"),
        ("student1", "stopped"),
        ("student2", "started"),
    ]


def test_gpus_all_and_by_uuid():
    result = plan(with_entry(gpus="all")[2:])
    assert result["users"][0]["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    result = plan(with_entry(gpus=[H200_UUID])[2:])
    assert result["users"][0]["device_requests"][0]["device_ids"] == [H200_UUID]
    assert result["errors"] == []


def test_limits_env_and_options():
    entries = with_entry(
        memory="16g", cpus=4, shm_size="8g", ipc_mode="private", env={"COURSE": "dl", "N": 3}, local_port=9000
    )
    result = plan(entries)
    assert result["errors"] == []
    third = result["users"][2]
    assert (third["memory"], third["cpus"], third["shm_size"], third["ipc_mode"]) == ("16g", 4.0, "8g", "private")
    assert third["labels"]["io.gpulab.notebook.limits"] == "memory=16g cpus=4.0 shm_size=8g"
    assert third["env"] == {"HOME": "/workspace", "COURSE": "dl", "N": "3"}
    assert third["local_port"] == 9000
    assert (third["uid"], third["gid"]) == (1002, 1002)  # no account: gid defaults to the uid


def test_the_owner_comes_from_the_account_or_the_entry():
    entry = {"name": "student2", "port": 7780, "workdir": "/srv/n/s2", "token": TOKEN}
    assert plan([entry])["users"][0]["user"] == "1001:1001"
    assert plan([{**entry, "uid": 1001}])["users"][0]["user"] == "1001:1001"  # the account's group
    assert plan([{**entry, "uid": 3000}])["users"][0]["user"] == "3000:3000"  # another uid: a group id like it
    assert plan([{**entry, "gid": 100}])["users"][0]["user"] == "1001:100"
    assert plan([{**entry, "uid": "3000"}])["users"][0]["uid"] == 3000  # inventory values may be strings


def test_a_missing_parent_folder_is_noted():
    assert plan(paths={"/srv/notebooks": {"exists": False}})["users"][0]["parent_exists"] is False
    assert plan(paths={})["users"][0]["parent_exists"] is True  # never looked at: never touched


def test_a_name_without_tag_is_latest():
    result = plan(with_entry(image="ufoym/deepo")[2:])
    assert result["users"][0]["image"] == "ufoym/deepo:latest"
    result = plan(with_entry(image="registry:5000/lab/deepo")[2:])
    assert result["users"][0]["image"] == "registry:5000/lab/deepo:latest"


# ---- every refusal ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "more", "expected"),
    [
        (with_entry({"token": None}), {}, "entry 3 (student3): no token and no password"),
        (with_entry({"token": "short"}), {}, "the token must be at least 16 characters"),
        (with_entry({"token": "a token with spaces in it"}), {}, "the token must be at least 16 characters"),
        (
            with_entry({"token": None, "password": "x", "password_hash": "sha1:ab:cd"}),
            {},
            "give password or password_hash",
        ),
        (
            with_entry({"token": None, "password_hash": "plain text"}),
            {},
            "password_hash is not a Jupyter password hash",
        ),
        (with_entry({"token": None, "password_hash": "md7:ab:cd"}), {}, "password_hash is not a Jupyter password hash"),
        (with_entry(auth="none"), {}, "auth is none, but the entry also has a token or password"),
        (with_entry({"token": None, "auth": "maybe"}), {}, "auth must be required or none"),
        (
            users(),
            {"bind_address": EVERYWHERE},
            f"entry 1 (student1): notebook_bind_address {EVERYWHERE} is not a loopback",
        ),
        (
            with_entry({"token": None, "auth": "none"}),
            {"bind_address": "10.0.0.5"},
            "auth: none is only allowed with a loopback notebook_bind_address",
        ),
        (users(), {"bind_address": "localhost"}, "notebook_bind_address 'localhost' is not an IP address"),
        (with_entry(name="Student 3"), {}, "entry 3 (Student 3): the name must be 1 to 32 characters"),
        (with_entry(name="a" * 33), {}, "the name must be 1 to 32 characters"),
        (with_entry(name="../etc"), {}, "the name must be 1 to 32 characters"),
        (with_entry(name=None), {}, "entry 3: the name must be"),
        (with_entry(name="student1", workdir="/srv/notebooks/x"), {}, "the name student1 is already used by"),
        (with_entry(port=7777), {}, "entry 3 (student3): port 7777 is already used by notebook_users entry 1"),
        (with_entry(port=0), {}, "port must be a number from 1 to 65535"),
        (with_entry(port="http"), {}, "port must be a number from 1 to 65535"),
        (with_entry(port=None), {}, "port (the server's port of the notebook) is missing"),
        (with_entry(local_port=70000), {}, "local_port must be a number from 1 to 65535"),
        (with_entry(gpus=[1]), {}, f"GPU 1 is not on the server (its NVIDIA GPUs: 0 ({H200_UUID}))"),
        (with_entry(gpus=["GPU-deadbeef"]), {}, "GPU GPU-deadbeef is not on the server"),
        (with_entry(gpus=[0, "0"]), {}, "gpus names a GPU twice"),
        (with_entry(gpus=["fast"]), {}, "'fast' in gpus is neither a GPU index nor a GPU UUID"),
        (with_entry(gpus=2), {}, "gpus must be all, none or a list"),
        (with_entry(gpus="all"), {"gpu": NO_GPU}, "gpus is all, but the server has no NVIDIA GPU"),
        (with_entry(gpus=[0]), {"gpu": NO_GPU}, "GPU 0 is not on the server (its NVIDIA GPUs: none)"),
        (with_entry(workdir=None), {}, "workdir (the folder on the server for the notebook's files) is missing"),
        (with_entry(workdir="notebooks/s3"), {}, "workdir must be an absolute path"),
        (with_entry(workdir="/etc/notebooks"), {}, "workdir /etc/notebooks is a system or top-level folder"),
        (with_entry(workdir="/home"), {}, "workdir /home is a system or top-level folder"),
        (with_entry(workdir="/var/lib"), {}, "workdir /var/lib is a system or top-level folder"),
        (with_entry(workdir="/srv/notebooks/../../usr/x"), {}, "workdir /usr/x is a system or top-level folder"),
        (with_entry(workdir="/srv/notebooks/student1/sub"), {}, "is, or is inside, notebook_users entry 1"),
        (with_entry(workdir="/srv/notebooks"), {}, "is, or is inside, notebook_users entry 1"),
        (
            with_entry(workdir="/srv/file"),
            {"paths": [{"item": "/srv/file", "stat": {"exists": True, "isdir": False}}]},
            "workdir /srv/file exists on the server and is not a folder",
        ),
        (with_entry(container_workdir="work"), {}, "container_workdir must be an absolute path"),
        (with_entry(container_workdir="/"), {}, "container_workdir / would hide a folder"),
        (with_entry(container_workdir="/etc/gpulab-notebook"), {}, "would hide a folder the notebook needs"),
        (with_entry(uid=None), {}, "student3 is not a user on gpu01; create the account first, or give uid"),
        (with_entry(uid=0), {}, "uid and gid 0 (root) are refused"),
        (with_entry(gid=0), {}, "uid and gid 0 (root) are refused"),
        (with_entry(memory="lots"), {}, "memory must be a size such as 512m or 16g"),
        (with_entry(cpus=16), {}, "cpus must be more than 0 and at most the server's 8 CPUs"),
        (with_entry(cpus="two"), {}, "cpus must be a number"),
        (with_entry(shm_size="8g"), {}, "shm_size has no effect with ipc_mode host"),
        (with_entry(ipc_mode="none"), {}, "ipc_mode must be one of host, private, shareable"),
        (with_entry(env={"JUPYTER_TOKEN": "x"}), {}, "env must not carry JUPYTER_TOKEN"),
        (with_entry(env={"BAD-NAME": "x"}), {}, "env has invalid variable names: BAD-NAME"),
        (with_entry(env=["A=1"]), {}, "env must be a dictionary"),
        (with_entry(frontend="vscode"), {}, "frontend must be notebook or lab"),
        (with_entry(state="running"), {}, "state must be one of started, stopped, absent"),
        (with_entry({"passwrd": "x"}), {}, "unknown key(s) passwrd"),
        (users(), {"default_image": "ufoym/deepo:auto"}, "no image: the default is role deepo's image"),
        (["student1"], {}, "notebook_users entry 1 is not a dictionary"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(entries, more, expected):
    assert expected in errors_of(entries, **more)


def test_every_problem_is_reported_at_once():
    entries = [*with_entry({"token": None}), *with_entry(name="student4", port=7777, workdir="/srv/n/s4")[2:]]
    found = plan(entries)["errors"]
    assert len(found) == 2
    assert "no token and no password" in found[0] and "port 7777 is already used" in found[1]


def test_non_loopback_bind_with_password_is_allowed():
    entries = [users()[1]]
    assert errors_of(entries, bind_address=EVERYWHERE) == ""
    assert plan(entries, bind_address=EVERYWHERE)["users"][0]["publish"] == f"{EVERYWHERE}:7778:8888"
    assert plan(entries, bind_address="::1")["users"][0]["publish"] == "[::1]:7778:8888"


def test_auth_none_is_allowed_on_loopback_only():
    assert errors_of(with_entry({"token": None, "auth": "none"})) == ""
    assert plan(with_entry({"token": None, "auth": "none"}))["users"][2]["auth"] == "none"


def test_absent_entries_need_no_port_and_free_theirs():
    entries = [*users(), {"name": "old", "state": "absent", "port": 7777}]
    assert errors_of(entries) == ""


def test_the_error_messages_hold_no_secret():
    entries = with_entry(
        {"token": TOKEN + " bad", "password": PASSWORD, "password_hash": "sha1:zz:nothex", "auth": "none"}
    )
    text = errors_of(entries, bind_address="10.0.0.5")
    assert "bad" not in text and PASSWORD not in text and "nothex" not in text


# ---- what runs on the server --------------------------------------------------------------------------------


def test_a_port_published_by_a_container_gpulab_does_not_manage():
    text = errors_of(containers=[container("webapp", [(EVERYWHERE, 7778)])])
    assert "entry 2 (student2): port 7778 is already published by the container webapp, which gpulab does not" in text


def test_a_foreign_container_on_another_address_does_not_collide():
    assert errors_of(containers=[container("webapp", [("10.0.0.5", 7778)])]) == ""


def test_a_port_of_a_notebook_whose_user_left_the_list():
    text = errors_of(containers=[container("notebook-alice", [("127.0.0.1", 7777)], owner="alice")])
    assert "port 7777 is already published by notebook-alice, gpulab's notebook of alice, who is no longer" in text
    assert "add {name: alice, state: absent}" in text


def test_ports_of_listed_users_may_move():
    # student1's container has 7778 now; student2 takes 7778 and student1 moves to 7777 in this run.
    running = [container("notebook-student1", [("127.0.0.1", 7778)], owner="student1")]
    assert errors_of(containers=running) == ""


def test_a_container_with_the_notebooks_name_that_gpulab_does_not_manage():
    text = errors_of(containers=[container("notebook-student2", state="exited")])
    assert "a container named notebook-student2 exists on the server and gpulab does not manage it" in text


def test_gpulabs_own_container_is_no_conflict():
    running = [container("notebook-student1", [("127.0.0.1", 7777)], owner="student1")]
    assert errors_of(containers=running, listeners=["127.0.0.1:7777"]) == ""


def test_a_program_outside_docker_on_the_port():
    text = errors_of(with_entry(port=22))
    assert text.count("port 22 is in use on the server by a program outside Docker (listening on 0.0.0.0:22)") == 1
    assert errors_of(users(), listeners=["192.0.2.1:7777"]) == ""  # another address


def test_listeners_from_ss():
    output = (
        "LISTEN 0      4096   127.0.0.1:7777      0.0.0.0:*\n"
        "LISTEN 0      128          [::]:22           [::]:*\n"
        "LISTEN 0      4096 127.0.0.53%lo:53      0.0.0.0:*\n"
        "LISTEN 0      128  [fe80::1%eth0]:8080     [::]:*\n"
    )
    assert nb.notebook_listeners(output) == ["127.0.0.1:7777", "[::]:22", "127.0.0.53:53", "[fe80::1]:8080"]


def test_workdirs_and_their_parents_are_looked_at():
    assert nb.notebook_workdirs([*users(), {"name": "x", "workdir": "relative"}, {"name": "y"}, "junk"]) == [
        "/srv/notebooks/student1",
        "/srv/notebooks",
        "/srv/notebooks/student2",
    ]


def test_image_ids_by_tag_and_digest():
    images = [{"Id": "sha256:aa", "RepoTags": [IMAGE], "RepoDigests": ["lab/x@sha256:bb"]}]
    assert nb.notebook_image_ids(images, [IMAGE, "lab/x@sha256:bb", "missing:1"]) == {
        IMAGE: "sha256:aa",
        "lab/x@sha256:bb": "sha256:aa",
    }


# ---- Jupyter ------------------------------------------------------------------------------------------------


def probe(image, versions=None, rc=0, stderr=""):
    return {"item": image, "rc": rc, "stdout": json.dumps(versions) if versions else "", "stderr": stderr}


@pytest.mark.parametrize(
    ("versions", "frontend", "flavour"),
    [
        (NOTEBOOK6, "notebook", "notebook6"),
        ({"notebook": "7.2.1", "jupyter_server": "2.14.0", "jupyterlab": "4.2.0"}, "notebook", "jupyter_server2"),
        ({"notebook": "7.2.1", "jupyter_server": "2.14.0", "jupyterlab": "4.2.0"}, "lab", "jupyter_server2"),
        ({"notebook": "6.5.4", "jupyter_server": "1.24.0", "jupyterlab": "3.6.3"}, "lab", "jupyter_server1"),
        ({"notebook": "6.5.4", "jupyter_server": "1.24.0", "jupyterlab": "3.6.3"}, "notebook", "notebook6"),
        ({"notebook": "6.0.3", "jupyter_server": None, "jupyterlab": "2.2.9"}, "lab", "notebook6"),
    ],
)
def test_the_flavour_follows_the_images_jupyter(versions, frontend, flavour):
    flavours = nb.notebook_flavours([probe(IMAGE, versions)])
    assert flavours[IMAGE] == {"versions": versions, "new": True}
    users_ = [{**plan()["users"][0], "frontend": frontend}]
    result = nb.notebook_commands(users_, flavours)
    assert result["errors"] == []
    assert result["users"][0]["flavour"] == flavour


def test_the_command_line():
    result = nb.notebook_commands(plan()["users"], nb.notebook_flavours([probe(IMAGE, NOTEBOOK6)]))
    assert result["users"][0]["command"] == [
        "python3",
        "-m",
        "notebook",
        "--no-browser",
        "--ip=0.0.0.0",
        "--port=8888",
        "--allow-root",
        "--notebook-dir=/workspace",
        "--config=/etc/gpulab-notebook/gpulab_jupyter_config.json",
    ]
    lab = [{**plan()["users"][0], "frontend": "lab", "container_workdir": "/home/jovyan/work"}]
    versions = {"notebook": None, "jupyter_server": "2.14.0", "jupyterlab": "4.2.0"}
    images = {IMAGE: {"python": "/opt/conda/bin/python"}}
    command = nb.notebook_commands(lab, nb.notebook_flavours([probe(IMAGE, versions)]), images)["users"][0]["command"]
    assert command[:3] == ["/opt/conda/bin/python", "-m", "jupyterlab"]
    assert "--notebook-dir=/home/jovyan/work" in command


@pytest.mark.parametrize(
    ("versions", "frontend", "expected"),
    [
        (NOTEBOOK6, "lab", "has no JupyterLab (python module jupyterlab); use frontend: notebook"),
        ({"notebook": None, "jupyter_server": "2.1", "jupyterlab": "4.0"}, "notebook", "use frontend: lab"),
    ],
)
def test_an_image_without_the_frontend_is_refused(versions, frontend, expected):
    users_ = [{**plan()["users"][0], "frontend": frontend}]
    result = nb.notebook_commands(users_, nb.notebook_flavours([probe(IMAGE, versions)]))
    assert expected in result["errors"][0]


def test_an_image_that_cannot_be_asked_is_refused():
    found = nb.notebook_flavours([probe(IMAGE, rc=127, stderr='exec: "python3": executable file not found')])
    assert "could not ask the image" in found[IMAGE]["error"]
    assert "python3" in found[IMAGE]["error"] and "declare it in notebook_images" in found[IMAGE]["error"]
    assert "error" in nb.notebook_flavours([{**probe(IMAGE), "stdout": "Segmentation fault"}])[IMAGE]


def test_declared_and_cached_images_are_not_probed():
    cached = [{"item": "a:1", "content": base64.b64encode(json.dumps(NOTEBOOK6).encode()).decode()}]
    cached.append({"item": "b:1", "content": base64.b64encode(b"garbage").decode()})  # ignored: probed instead
    found = nb.notebook_flavours([probe("b:1", NOTEBOOK6)], {"c:1": {"flavour": "jupyter_server2"}}, cached)
    assert found == {
        "c:1": {"flavour": "jupyter_server2"},
        "a:1": {"versions": NOTEBOOK6},
        "b:1": {"versions": NOTEBOOK6, "new": True},
    }
    assert "error" in nb.notebook_flavours([], {"d:1": {"flavour": "jupyter9"}})["d:1"]


def test_an_absent_user_needs_no_image():
    result = nb.notebook_commands([{"name": "old", "state": "absent", "image": ""}], {})
    assert result["errors"] == []


# ---- the config file with the secrets -------------------------------------------------------------------------


def jupyter_passwd_check(hashed, passphrase):
    """notebook.auth.security.passwd_check / jupyter_server.auth.security.passwd_check for salted hashes."""
    algorithm, salt, digest = hashed.split(":", 2)
    check = hashlib.new(algorithm)
    check.update(passphrase.encode("utf-8") + salt.encode("ascii"))
    return check.hexdigest() == digest


def test_the_password_hash_is_jupyters_format_and_stable():
    first = nb.password_hash(PASSWORD, "gpu01\0student2")
    assert first == nb.password_hash(PASSWORD, "gpu01\0student2")  # so a second run changes nothing
    assert first != nb.password_hash(PASSWORD, "gpu02\0student2")  # another salt on another server
    assert first.startswith("sha256:")
    assert jupyter_passwd_check(first, PASSWORD)
    assert not jupyter_passwd_check(first, PASSWORD + "!")
    with pytest.raises(AnsibleFilterError):
        nb.password_hash("", "seed")


def planned_with(flavour, entries=None):
    result = nb.notebook_commands(plan(entries)["users"], {IMAGE: {"flavour": flavour}})
    return {user["name"]: user for user in result["users"]}


def test_the_config_of_classic_notebook_6():
    planned = planned_with("notebook6")
    token_config = json.loads(nb.notebook_jupyter_config(users(), planned["student1"], "gpu01"))
    assert token_config == {
        "NotebookApp": {"token": TOKEN, "password": "", "password_required": False, "allow_password_change": False}
    }
    password_config = json.loads(nb.notebook_jupyter_config(users(), planned["student2"], "gpu01"))["NotebookApp"]
    assert password_config["token"] == ""
    assert password_config["password_required"] is True
    assert jupyter_passwd_check(password_config["password"], PASSWORD)


def test_the_config_of_jupyter_server_1_and_2():
    planned = planned_with("jupyter_server1")
    config = json.loads(nb.notebook_jupyter_config(users(), planned["student1"], "gpu01"))
    assert config["ServerApp"]["token"] == TOKEN
    planned = planned_with("jupyter_server2")
    config = json.loads(nb.notebook_jupyter_config(users(), planned["student2"], "gpu01"))
    assert config["IdentityProvider"] == {"token": ""}
    assert jupyter_passwd_check(config["PasswordIdentityProvider"]["hashed_password"], PASSWORD)
    assert config["PasswordIdentityProvider"]["allow_password_change"] is False


def test_a_given_hash_is_used_as_it_is_and_auth_none_empties_both():
    entries = users()
    argon2 = "argon2:$argon2id$v=19$m=10240,t=10,p=8$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
    entries[1] = {**entries[1], "password_hash": argon2}
    del entries[1]["password"]
    planned = planned_with("notebook6", entries)
    assert json.loads(nb.notebook_jupyter_config(entries, planned["student2"], "gpu01"))["NotebookApp"]["password"] == (
        argon2
    )
    entries = with_entry({"token": None, "auth": "none"})
    planned = planned_with("jupyter_server2", entries)
    config = json.loads(nb.notebook_jupyter_config(entries, planned["student3"], "gpu01"))
    assert config["IdentityProvider"] == {"token": ""}
    assert config["PasswordIdentityProvider"]["hashed_password"] == ""
    assert config["PasswordIdentityProvider"]["password_required"] is False


def test_the_config_is_stable_text():
    planned = planned_with("notebook6")
    one = nb.notebook_jupyter_config(users(), planned["student2"], "gpu01")
    assert one == nb.notebook_jupyter_config(copy.deepcopy(users()), planned["student2"], "gpu01")
    assert one.endswith("}\n")


# ---- what the people get -------------------------------------------------------------------------------------


def test_the_access_sheet():
    planned = plan()["users"]
    planned[1]["local_port"] = 8888
    sheet = nb.notebook_access_sheet(planned, users(), "gpu01.lab.example.org", 22, "gpu01")
    assert "ssh: ssh -L 7777:127.0.0.1:7777 student1@gpu01.lab.example.org\n" in sheet
    assert f"url: http://localhost:7777/?token={TOKEN}\n" in sheet
    assert "ssh: ssh -L 8888:127.0.0.1:7778 student2@gpu01.lab.example.org\n" in sheet
    assert "url: http://localhost:8888/\n" in sheet
    assert PASSWORD not in sheet
    assert "ssh -p 2222 -L" in nb.notebook_access_sheet(planned, users(), "gpu01", 2222)


def test_the_access_sheet_leaves_out_removed_users_and_uses_the_bind_address():
    entries = [{**users()[1], "ssh_user": "s2"}, {"name": "old", "state": "absent"}]
    planned = plan(entries, bind_address="10.0.0.5")["users"]
    sheet = nb.notebook_access_sheet(planned, entries, "gpu01")
    assert "[old]" not in sheet
    assert "ssh: ssh -L 7778:10.0.0.5:7778 s2@gpu01" in sheet


def test_the_summary_holds_no_secret():
    planned = plan([*users(), {"name": "old", "state": "absent"}])["users"]
    lines = nb.notebook_summary(planned, "gpu01", 22, "~/.gpulab/access/gpu01.txt")
    text = "\n".join(lines)
    assert TOKEN not in text and PASSWORD not in text
    assert lines[0] == "old: removed (container notebook-old; the workdir is kept)"
    assert "student1: started, port 7777, GPUs 0, login by token; ssh -L 7777:127.0.0.1:7777 student1@gpu01" in text
    assert "(URL with token: ~/.gpulab/access/gpu01.txt)" in text


def test_bad_arguments():
    with pytest.raises(AnsibleFilterError):
        nb.notebook_plan({"name": "x"}, {})
    with pytest.raises(AnsibleFilterError):
        nb.notebook_jupyter_config(users(), {"name": "nobody", "flavour": "notebook6"}, "gpu01")
    with pytest.raises(AnsibleFilterError):
        nb.notebook_jupyter_config(users(), {"name": "student1", "flavour": "jupyter9"}, "gpu01")
