"""Tests of the notebook role's plan (plugins/filter/notebook_plan.py and notebook_server.py): notebook_users against
a server (accounts, GPUs from gpu_facts' real H200 output, paths, containers as Docker's API lists them, listening
sockets as `ss -Htln` prints them).

Every refusal the role promises has its case here; the molecule scenario `notebook` runs them against a real server.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError
from notebook_cases import (
    EVERYWHERE,
    H200_UUID,
    IMAGE,
    NO_GPU,
    PASSWORD,
    ROOT,
    TOKEN,
    container,
    errors_of,
    plan,
    settings,
    users,
    with_entry,
)

nb = importlib.import_module("ansible_collections.gpulab.lab.plugins.filter.notebook_plan")
ROLE = ROOT / "ansible_collections" / "gpulab" / "lab" / "roles" / "notebook"
server = importlib.import_module("ansible_collections.gpulab.lab.plugins.filter.notebook_server")
jupyter = importlib.import_module("ansible_collections.gpulab.lab.plugins.filter.notebook_jupyter")


def restored(name, owner, image_label, backup="20261129T101500Z-1a2b3c"):
    """A notebook container that container_restore rebuilt from a backup: the backup's image, the restore label."""
    entry = container(name, ports=[("127.0.0.1", 7777)], owner=owner)
    entry["Image"] = f"gpulab-backup/{name}:{backup}"
    entry["Labels"].update({"io.gpulab.notebook.image": image_label, "io.gpulab.backup.restored-from": backup})
    return entry


def test_a_restored_notebook_is_noted_and_planned_on_the_lab_image():
    """Module notebook_containers keeps the container's image (the backup's, with what the student installed) and
    decides about a new lab image by the image policy: the plan only notes the restore."""
    first, second = plan(containers=[restored("notebook-student1", "student1", IMAGE)])["users"]
    assert first["image"] == IMAGE
    assert first["restored_from"] == "20261129T101500Z-1a2b3c"
    assert first["labels"]["io.gpulab.backup.restored-from"] == "20261129T101500Z-1a2b3c"
    assert first["labels"]["io.gpulab.notebook.image"] == IMAGE
    assert second["image"] == IMAGE and "restored_from" not in second


def test_one_stat_command_tells_which_workdirs_and_parents_exist():
    found = server.notebook_paths(
        "directory\t/srv/notebooks\nregular file\t/srv/notebooks/not-a-folder\n",
        ["/srv/notebooks", "/srv/notebooks/not-a-folder", "/srv/notebooks/new"],
    )
    assert found == {
        "/srv/notebooks": {"exists": True, "isdir": True},
        "/srv/notebooks/not-a-folder": {"exists": True, "isdir": False},
        "/srv/notebooks/new": {"exists": False, "isdir": False},
    }
    result = plan(with_entry(workdir="/srv/notebooks/not-a-folder"), paths=found)
    assert "workdir /srv/notebooks/not-a-folder exists on the server and is not a folder" in " ".join(result["errors"])


def test_the_jupyter_configs_of_every_planned_user_who_is_not_absent():
    planned = [{"name": "student1", "state": "started", "flavour": "notebook6"}, {"name": "old", "state": "absent"}]
    configs = jupyter.notebook_jupyter_configs([{"name": "student1", "token": "t" * 24}], planned, "gpu01")
    assert list(configs) == ["student1"]
    assert json.loads(configs["student1"])["NotebookApp"]["token"] == "t" * 24


def test_each_user_gets_the_image_policy_of_the_entry_or_the_role():
    result = plan(image_policy="rebase")
    assert [u["image_policy"] for u in result["users"]] == ["rebase", "rebase"]
    bad = errors_of(with_entry(image_policy="upgrade"))
    assert "entry 3 (student3): image_policy must be one of keep, rebase, replace, not 'upgrade'" in bad


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
    entries[1]["password_hash"] = jupyter.password_hash(PASSWORD, "seed")
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
        (with_entry(env=["A=1"]), {}, "env must be a dictionary of variable names and values, not ['A=1']"),
        (with_entry(env={"JUPYTER_RUNTIME_DIR": "/workspace/rt"}), {}, "env must not set JUPYTER_RUNTIME_DIR"),
        (with_entry(ssh_user="a b"), {}, "(student3): ssh_user must be the student's SSH login name, not 'a b'"),
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
    assert server.notebook_listeners(output) == ["127.0.0.1:7777", "[::]:22", "127.0.0.53:53", "[fe80::1]:8080"]


def test_workdirs_and_their_parents_are_looked_at():
    assert server.notebook_workdirs([*users(), {"name": "x", "workdir": "relative"}, {"name": "y"}, "junk"]) == [
        "/srv/notebooks/student1",
        "/srv/notebooks",
        "/srv/notebooks/student2",
    ]


def test_image_ids_by_tag_and_digest():
    images = [{"Id": "sha256:aa", "RepoTags": [IMAGE], "RepoDigests": ["lab/x@sha256:bb"]}]
    assert jupyter.notebook_image_ids(images, [IMAGE, "lab/x@sha256:bb", "missing:1"]) == {
        IMAGE: "sha256:aa",
        "lab/x@sha256:bb": "sha256:aa",
    }


def test_bad_arguments():
    with pytest.raises(AnsibleFilterError):
        nb.notebook_plan({"name": "x"}, {})


# ---- a workdir the server empties ---------------------------------------------------------------------------

MOUNTS = {"/": "ext4", "/run": "tmpfs", "/dev/shm": "tmpfs", "/srv/scratch": "tmpfs", "/srv": "xfs"}
MOUNTS["/mnt/ram"] = "ramfs"


@pytest.mark.parametrize(
    ("workdir", "expected"),
    [
        ("/tmp/nb/bob", "workdir /tmp/nb/bob is under /tmp, which the server empties (at boot, or of files left"),
        ("/var/tmp/nb/bob", "workdir /var/tmp/nb/bob is under /var/tmp, which the server empties"),
        ("/run/nb/bob", "workdir /run/nb/bob is under /run, which the server empties"),
        ("/dev/shm/bob", "workdir /dev/shm/bob is under /dev/shm, which the server empties"),
        ("/srv/scratch/nb/bob", "workdir /srv/scratch/nb/bob is on a tmpfs (/srv/scratch), which the server empties"),
        ("/mnt/ram/bob", "workdir /mnt/ram/bob is on a ramfs (/mnt/ram), which the server empties at every boot"),
    ],
)
def test_a_workdir_the_server_empties_is_refused_with_the_reason(workdir, expected):
    found = errors_of(with_entry(workdir=workdir), mounts=MOUNTS)
    assert f"notebook_users entry 3 (student3): {expected}" in found
    assert "the student's files would be lost; give a folder on a disk, e.g. /srv/notebooks/student3" in found
    assert found.count("student3") == 2  # one problem (the name is in the message twice), not a system-folder one too


def test_a_workdir_on_a_disk_is_fine_beside_memory_file_systems():
    assert plan(with_entry(workdir="/srv/notebooks/student3"), mounts=MOUNTS)["errors"] == []
    assert plan(with_entry(workdir="/srv/scratchpad/student3"), mounts=MOUNTS)["errors"] == []  # not /srv/scratch


def test_the_mounts_from_findmnt():
    output = "/ ext4\n/run tmpfs\n/srv/lab\\x20data xfs\n/proc proc\n"
    mounts = server.notebook_mounts(output)
    assert mounts == {"/": "ext4", "/run": "tmpfs", "/srv/lab data": "xfs", "/proc": "proc"}
    assert server.filesystem_of("/srv/lab data/alice", mounts) == ("/srv/lab data", "xfs")
    assert server.filesystem_of("/home/alice", mounts) == ("/", "ext4")
    assert server.filesystem_of("/home/alice", {}) == (None, None)


# ---- every message names the entry and the whole value ------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"state": "running"}, "entry 3 (student3): state must be one of started, stopped, absent, not 'running'"),
        ({"port": "seventy"}, "entry 3 (student3): port must be a number from 1 to 65535, not 'seventy'"),
        ({"name": "Carol"}, "entry 3 (Carol): the name must be 1 to 32 characters of a-z, 0-9, _ and -, starting"),
        ({"name": "Carol"}, "(like a Linux user name), not 'Carol'; it names the container"),
        ({"token": ""}, "entry 3 (student3): token is '' (empty): give the token or leave the key out"),
        ({"token": None, "password": ""}, "entry 3 (student3): password is '' (empty)"),
        ({"token": None, "password_hash": ""}, "entry 3 (student3): password_hash is '' (empty)"),
        ({"auth": "maybe", "token": None}, "entry 3 (student3): auth must be required or none, not 'maybe'"),
        ({"cpus": "many"}, "entry 3 (student3): cpus must be a number such as 2 or 1.5, not 'many'"),
    ],
)
def test_every_message_names_the_entry_and_the_whole_value(changes, expected):
    entries = with_entry()
    entries[2].update(changes)
    assert expected in errors_of(entries)


def test_an_empty_token_is_reported_as_empty_not_as_missing():
    entries = with_entry()
    entries[2]["token"] = ""
    assert plan(entries)["errors"] == [
        "notebook_users entry 3 (student3): token is '' (empty): give the token or leave the key out (an empty value "
        "is often a Vault variable that is not set)"
    ]


def test_the_message_for_a_notebook_whose_user_left_has_no_stray_brace():
    containers = [container("notebook-carol", ports=[("127.0.0.1", 7777)], owner="carol")]
    found = errors_of(containers=containers)
    assert "add {name: carol, state: absent} to remove it, or choose another port" in found
    assert "}}" not in found


def test_ansibles_own_argument_check_leaves_notebook_users_to_the_plan(tmp_path):
    """The role's argument spec, as Ansible checks it before the role runs: values the plan refuses with a message
    naming the entry must pass it (Ansible's own message names neither the entry nor its position)."""
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    entries = with_entry(state="running", port="seventy", auth="maybe", cpus="many", frontend="vscode")
    del entries[2]["name"]
    entries.append("student4")  # not a dictionary: the plan says which entry
    playbook = tmp_path / "check.yml"
    task = {
        "ansible.builtin.validate_argument_spec": {
            "argument_spec": spec,
            "provided_arguments": {"notebook_users": entries},
        }
    }
    playbook.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": [task]}]))
    command = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "ok=1" in proc.stdout
