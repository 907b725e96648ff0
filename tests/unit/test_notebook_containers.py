"""Module notebook_containers against the real Docker engine: every student's container in one run, a second run that
changes nothing, carry-over on a recreate (the container's whole file tree, compared as the backup tree test
compares it), a safety backup before every change that stops a container for good, the image policies keep, rebase
and replace, state absent, a failing safety backup that leaves that student's container as it was, the flatten
guard, check mode.

The containers run `sleep infinity` in gpulab-test/debian:12 (the tests give the plan's command, as role notebook's
notebook_commands would), so nothing waits for Jupyter (wait_timeout 0); the molecule scenario notebook runs the
real Jupyter.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from backup_harness import free_port, inspect, needs_docker, remove_container, run_module, sh
from module_harness import ModuleFail
from test_backup_tree import tree

from ansible_collections.gpulab.lab.plugins.module_utils.backup.restore import RestoreJob
from ansible_collections.gpulab.lab.plugins.module_utils.notebook.images import carry_repo
from ansible_collections.gpulab.lab.plugins.modules import notebook_containers

pytestmark = [needs_docker, pytest.mark.usefixtures("capture_exit")]

BASE = "gpulab-test/debian:12"
LOG_FILTER = "# the log filter (role notebook's files/gpulab_jupyter_config.py)\n"
# What a student does inside the container: a package of their own, an edited system file, a deleted one.
STUDENT = (
    "mkdir -p /usr/local/lib/python3.11/dist-packages/studentpkg"
    " && echo 'VERSION = 1' > /usr/local/lib/python3.11/dist-packages/studentpkg/__init__.py"
    " && echo 'edited by the student' >> /etc/debian_version && rm /etc/issue.net"
)


@pytest.fixture
def lab(tmp_path):
    """A lab of this test: its image (a tag of the base image), folders and the names of its containers."""
    tag = f"gpulab-unittest/notebook-lab:{uuid.uuid4().hex[:8]}"
    sh("docker", "tag", BASE, tag)
    names = []
    yield Lab(tag, tmp_path, names)
    for name in names:
        remove_container(name)
        for ref in sh("docker", "images", "--format", "{{.Repository}}:{{.Tag}}", carry_repo(name)).split():
            subprocess.run(["docker", "rmi", "-f", ref], capture_output=True, check=False)
        for ref in sh("docker", "images", "--format", "{{.Repository}}:{{.Tag}}", f"gpulab-backup/{name}").split():
            subprocess.run(["docker", "rmi", "-f", ref], capture_output=True, check=False)
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)


class Lab:
    def __init__(self, image, folder, names):
        self.image, self.folder, self.names = image, Path(folder), names
        self.prefix = f"gpulab-unittest-nb-{uuid.uuid4().hex[:6]}-"
        self.store = self.folder / "store"

    def user(self, name, **more):
        container = self.prefix + name
        if container not in self.names:
            self.names.append(container)
        config_dir = str(self.folder / "config" / name)
        workdir = str(self.folder / "srv" / name)
        user = {
            "name": name,
            "state": "started",
            "container": container,
            "image": self.image,
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "gpus": "none",
            "device_requests": [],
            "uid": 1000,
            "gid": 1000,
            "user": "1000:1000",
            "workdir": workdir,
            "config_dir": config_dir,
            "config_file": "gpulab_jupyter_config.json",
            "log_filter_file": "gpulab_jupyter_config.py",
            "mounts": [
                {"type": "bind", "source": workdir, "target": "/workspace", "read_only": False},
                {"type": "bind", "source": config_dir, "target": "/etc/gpulab-notebook", "read_only": True},
            ],
            "env": {"HOME": "/workspace"},
            "labels": {"io.gpulab.notebook": "1", "io.gpulab.notebook.user": name},
            "ipc_mode": "private",
            "memory": None,
            "cpus": None,
            "shm_size": None,
            "command": ["sleep", "infinity"],
        }
        user.update(more)
        return user

    def run(self, users, check_mode=False, **options):
        args = {
            "users": users,
            "configs": {u["name"]: json.dumps({"NotebookApp": {"token": "t" * 24}}) for u in users},
            "log_filter": LOG_FILTER,
            "config_dir": str(self.folder / "config"),
            "safety_backup_store": str(self.store),
            "wait_timeout": 0,
            **options,
        }
        return run_module(notebook_containers, args, check_mode=check_mode)


def by_name(result):
    return {n["name"]: n for n in result["notebooks"]}


def as_student(container, command):
    sh("docker", "exec", "-u", "0", container, "sh", "-c", command)


def test_one_run_creates_every_student_and_a_second_changes_nothing(lab):
    users = [lab.user("alice"), lab.user("bob", memory="512m", cpus=0.5)]
    first = lab.run(users)
    assert first["changed"] is True
    assert [n["action"] for n in first["notebooks"]] == ["created", "created"]
    info = inspect(users[1]["container"])
    assert info["State"]["Running"] is True
    assert info["HostConfig"]["Memory"] == 512 * 1024**2 and info["HostConfig"]["NanoCpus"] == 500_000_000
    assert info["HostConfig"]["PortBindings"] == {
        "8888/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(users[1]["port"])}]
    }
    assert info["HostConfig"]["Init"] is True
    config = Path(users[0]["config_dir"]) / "gpulab_jupyter_config.json"
    assert (config.stat().st_uid, config.stat().st_mode & 0o777) == (1000, 0o400)
    assert Path(users[0]["config_dir"]).stat().st_mode & 0o777 == 0o500
    assert Path(users[0]["workdir"]).stat().st_mode & 0o777 == 0o750
    assert (lab.folder / "config").stat().st_mode & 0o777 == 0o700
    second = lab.run(users)
    assert second["changed"] is False, second["messages"]
    assert inspect(users[0]["container"])["Id"] == inspect(users[0]["container"])["Id"]


def test_new_settings_recreate_the_container_with_its_whole_tree_carried_over(lab):
    users = [lab.user("alice", env={"HOME": "/workspace", "COURSE": "dl-1", "OLD": "x"})]
    lab.run(users)
    container = users[0]["container"]
    before_id = inspect(container)["Id"]
    as_student(container, STUDENT)
    (Path(users[0]["workdir"]) / "notes.txt").write_text("the student's notes")
    before = tree(container)
    lab.store.mkdir()
    changed = [{**users[0], "port": free_port(), "memory": "256m", "env": {"HOME": "/workspace", "COURSE": "dl-2"}}]
    result = lab.run(changed)
    alice = by_name(result)["alice"]
    assert alice["action"] == "recreated" and alice["carried_over"] and alice["kernels_restarted"]
    assert alice["safety_backup"]["id"]
    text = " ".join(alice["messages"])
    assert "environment (COURSE, OLD)" in text and "memory none -> 256m" in text
    assert "its environment was carried over" in text and "its running kernels were stopped" in text
    info = inspect(container)
    assert info["Id"] != before_id
    assert info["Config"]["Image"].startswith(carry_repo(container) + ":")
    # A variable gpulab no longer sets is named bare in the create body, which unsets it in the container.
    env = dict(e.split("=", 1) for e in info["Config"]["Env"] if "=" in e)
    assert env["COURSE"] == "dl-2" and "OLD" not in env
    seen = dict(line.split("=", 1) for line in sh("docker", "exec", container, "env").splitlines())
    assert seen["COURSE"] == "dl-2" and "OLD" not in seen
    assert info["HostConfig"]["Memory"] == 256 * 1024**2
    assert tree(container) == before
    assert (Path(users[0]["workdir"]) / "notes.txt").read_text() == "the student's notes"
    assert [c for c in sh("docker", "ps", "-a", "--format", "{{.Names}}").split() if c.startswith(container)] == [
        container
    ]
    assert lab.run(changed)["changed"] is False
    # A second recreate: the first carry image is no longer used and goes.
    again = lab.run([{**changed[0], "memory": "300m"}])
    assert by_name(again)["alice"]["action"] == "recreated"
    carries = sh("docker", "images", "--format", "{{.Repository}}:{{.Tag}}", carry_repo(container)).split()
    assert carries == [inspect(container)["Config"]["Image"]]
    assert tree(container) == before


def test_check_mode_says_what_would_change_and_changes_nothing(lab):
    users = [lab.user("alice")]
    lab.run(users)
    before = inspect(users[0]["container"])
    result = lab.run([{**users[0], "port": free_port()}], check_mode=True)
    alice = by_name(result)["alice"]
    assert result["changed"] is True
    assert any("would be recreated (settings changed: port" in m for m in alice["messages"])
    assert any("its environment would be carried over" in m for m in alice["messages"])
    assert inspect(users[0]["container"])["Id"] == before["Id"]


def test_a_failing_safety_backup_leaves_that_container_and_the_others_go_on(lab):
    users = [lab.user("alice"), lab.user("bob")]
    lab.run(users)
    lab.store.mkdir()
    (lab.store / "lock").mkdir()  # the store cannot be locked: the backup fails
    ids = {u["name"]: inspect(u["container"])["Id"] for u in users}
    with pytest.raises(ModuleFail) as failed:
        lab.run([{**users[0], "memory": "256m"}, {**users[1], "state": "stopped"}])
    result = failed.value.result
    assert "alice: the safety backup of" in result["msg"] and "was left as it is" in result["msg"]
    assert by_name(result)["alice"]["action"] == "left as it was"
    assert inspect(users[0]["container"])["Id"] == ids["alice"]
    assert inspect(users[0]["container"])["State"]["Running"] is True
    assert by_name(result)["bob"]["action"] == "stopped"
    assert inspect(users[1]["container"])["State"]["Running"] is False


def new_lab_image(lab):
    """The same tag, loaded again with a new image ID: a file of the new image's own."""
    context = lab.folder / "new-image"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {lab.image}\nRUN echo new > /etc/gpulab-new-image\n")
    sh("docker", "build", "-q", "--label", "io.gpulab.harness=1", "-t", lab.image, context)


def test_image_policies_keep_rebase_and_replace(lab):
    users = [lab.user("keeper"), lab.user("rebaser"), lab.user("replacer")]
    lab.run(users)
    lab.store.mkdir()
    for user in users:
        as_student(user["container"], STUDENT)
    trees = {u["name"]: tree(u["container"]) for u in users}
    ids = {u["name"]: inspect(u["container"])["Id"] for u in users}
    new_lab_image(lab)
    policies = [{**users[0]}, {**users[1], "image_policy": "rebase"}, {**users[2], "image_policy": "replace"}]
    result = by_name(lab.run(policies))
    # keep: as it was, the update pending and how to take it
    assert result["keeper"]["action"] == "unchanged"
    assert "image update pending" in result["keeper"]["pending_update"]
    assert "image_policy: rebase" in result["keeper"]["pending_update"]
    assert inspect(users[0]["container"])["Id"] == ids["keeper"]
    # rebase: the student's files on the new image, after a safety backup
    assert result["rebaser"]["action"] == "rebased" and result["rebaser"]["safety_backup"]["id"]
    assert any("may need reinstalling" in m for m in result["rebaser"]["messages"])
    rebased = tree(users[1]["container"])
    assert rebased.pop("/etc/gpulab-new-image")["size"] == 4
    assert rebased == trees["rebaser"]
    # replace: a fresh container on the new image, the old environment in the safety backup
    assert result["replacer"]["action"] == "replaced"
    fresh = tree(users[2]["container"])
    assert "/etc/gpulab-new-image" in fresh and "/etc/issue.net" in fresh
    backup = result["replacer"]["safety_backup"]["id"]
    assert lab.run(policies)["changed"] is False
    # restore.yml's job brings the replaced environment back
    RestoreJob(store=str(lab.store), container=users[2]["container"], backup=backup, force=True).run()
    assert tree(users[2]["container"]) == trees["replacer"]


def test_state_absent_backs_up_then_removes_keeping_the_workdir(lab):
    users = [lab.user("alice")]
    lab.run(users)
    lab.store.mkdir()
    result = lab.run([{"name": "alice", "state": "absent", "container": users[0]["container"],
                       "config_dir": users[0]["config_dir"]}])  # fmt: skip
    alice = by_name(result)["alice"]
    assert alice["action"] == "removed" and alice["safety_backup"]["id"]
    assert inspect(users[0]["container"]) is None
    assert Path(users[0]["workdir"]).is_dir() and not Path(users[0]["config_dir"]).exists()
    assert (lab.store / "backups" / users[0]["container"]).is_dir()


def test_the_flatten_guard_bounds_the_carried_over_image(lab):
    users = [lab.user("alice")]
    lab.run(users)
    container = users[0]["container"]
    as_student(container, STUDENT)
    before = tree(container)
    result = lab.run([{**users[0], "memory": "256m"}], flatten_threshold=2)
    assert any("flattened into one layer" in m for m in by_name(result)["alice"]["messages"])
    image = inspect(inspect(container)["Image"], "image")
    assert len(image["RootFS"]["Layers"]) == 1
    assert tree(container) == before


def test_a_container_of_an_older_gpulab_is_recreated_once_with_carry_over(lab):
    user = lab.user("alice")
    os.makedirs(user["workdir"], exist_ok=True)
    os.makedirs(user["config_dir"], exist_ok=True)
    sh("docker", "run", "-d", "--init", "--name", user["container"], "--label", "io.gpulab.notebook.user=alice",
       "--label", "io.gpulab.notebook=1", lab.image, "sleep", "infinity")  # fmt: skip
    as_student(user["container"], STUDENT)
    before = tree(user["container"])
    first = by_name(lab.run([user]))["alice"]
    assert first["action"] == "recreated" and first["settings_changed"] == ["made by an older gpulab"]
    # The same tree, and now the mounts the older container lacked.
    after = {
        path: e for path, e in tree(user["container"]).items() if not path.startswith(("/workspace", "/etc/gpulab-"))
    }
    assert after == before
    assert lab.run([user])["changed"] is False
