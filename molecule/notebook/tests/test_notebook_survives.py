"""Issue 13 on the notebook scenario's server, after test_notebook.py: a student's environment survives the admin's
changes. Two students install a package (pip install of a wheel), edit a system file and delete one inside their
containers, and write in their work directories through Jupyter. The admin then gives student1 other GPUs, another
port and memory limit, and student2 other environment variables: both containers are recreated, after a safety
backup into the backup store, and each container's complete file tree (listed as tests/unit/test_backup_tree.py
lists it) equals the tree before; Jupyter answers on the new port with the old token; a second run changes nothing.
Then a new lab image (the same tag built again, a new image ID) with each image policy: keep (nothing changes, the
play and the access sheet say an update is pending), rebase (student1's files on the new image, after a safety
backup) and replace (student2 fresh on the new image, after a safety backup that container_restore brings back).

The tests run in this file's order and build on each other (module-scoped fixtures). Check mode's words are asserted
in test_notebook.py (test_check_mode_predicts_changes_and_makes_none) and in the unit tests.
"""

import base64
import hashlib
import io
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import testinfra

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests" / "unit"))
from playbook_run import JSON_RESULTS, collections_path, run_playbook
from test_backup_tree import LISTING  # the backup tree test's listing of a container's complete file tree

HERE = Path(__file__).resolve()
EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
CLIENT = HERE.parents[2] / "shared" / "tests" / "jupyter_client.py"
CLIENT_ON_SERVER = "/opt/gpulab-test/jupyter_client.py"
STORE = "/var/backups/gpulab"  # role backup's store: its folder is all the safety backup needs
IMAGE = "gpulab-test/dl-notebook:latest"
NAMES = ["student1", "student2"]
# Jupyter's runtime files: the running server's own (its info file, the kernels' connection files), which it removes
# when it stops and writes again when it starts; not the student's.
RUNTIME = "/tmp/jupyter-runtime"
NEW_PORT = 7787
NEW_ENV = {"GPULAB_COURSE": "dl-2026", "GPULAB_GROUP": "b"}
NEW_IMAGE_FILE = "/etc/gpulab-lab-image-v2"
WORK_FILE = f"survives-{secrets.token_hex(4)}.txt"  # new in each run (the contents API answers 201 to a new file)
STUDENT_CHANGES = "echo 'edited by the student' >> /etc/debian_version && rm -f /etc/issue.net"


@pytest.fixture(scope="module")
def server(host):
    return testinfra.get_host(f"docker://{host.backend.host}")


@pytest.fixture(scope="module")
def hostname(host):
    return host.backend.host


@pytest.fixture(scope="module")
def users(host):
    return {entry["name"]: entry for entry in host.ansible.get_variables()["notebook_users"]}


@pytest.fixture(scope="module")
def play(hostname):
    def run(entries, *options):
        return run_playbook(hostname, "gpulab.lab.notebook", {"notebook_users": entries}, *options, env=JSON_RESULTS)

    return run


def tree(server, name):
    listed = json.loads(server.check_output(f"docker exec -u 0 notebook-{name} python3 -c {shlex.quote(LISTING)}"))
    return {path: entry for path, entry in listed.items() if not path.startswith(RUNTIME)}


def inspect(server, name):
    return json.loads(server.check_output(f"docker inspect notebook-{name}"))[0]


def jupyter(server, port, *args):
    command = " ".join(shlex.quote(str(arg)) for arg in ["python3", CLIENT_ON_SERVER, port, *args])
    return json.loads(server.check_output(command))


def login(entry):
    return ["--token", entry["token"]] if "token" in entry else ["--password", entry["password"]]


def wheel():
    """studentpkg 1.0 as a wheel (a package the student pip-installs; no index needed)."""
    files = {
        "studentpkg/__init__.py": b"VERSION = '1.0'\n",
        "studentpkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: studentpkg\nVersion: 1.0\n",
        "studentpkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: gpulab-test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files["studentpkg-1.0.dist-info/RECORD"] = (
        "\n".join([*record, "studentpkg-1.0.dist-info/RECORD,,"]) + "\n"
    ).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def before(server, users, play, tmp_path_factory):
    """Converge's students back (test_notebook.py changed student1 and removed student2), their changes inside the
    containers and in their work directories, the trees of both containers, and role backup's store folder."""
    run = play(list(users.values()))
    assert run.rc == 0, run.text[-3000:]
    subprocess.run(["docker", "cp", str(CLIENT), f"{server.backend.name}:{CLIENT_ON_SERVER}"], check=True)
    package = tmp_path_factory.mktemp("wheel") / "studentpkg-1.0-py3-none-any.whl"
    package.write_bytes(wheel())
    for name, entry in users.items():
        subprocess.run(["docker", "cp", str(package), f"{server.backend.name}:{entry['workdir']}/"], check=True)
        server.check_output(
            f"docker exec -u 0 notebook-{name} python3 -m pip install --no-index --no-deps --no-cache-dir"
            " --break-system-packages"
            f" {entry.get('container_workdir', '/workspace')}/{package.name}"
        )
        server.check_output(f"docker exec -u 0 notebook-{name} sh -c {shlex.quote(STUDENT_CHANGES)}")
        saved = jupyter(server, entry["port"], *login(entry), "--put", WORK_FILE, f"{name}'s work")
        assert saved["put"] == 201
    trees = {name: tree(server, name) for name in NAMES}
    assert "/usr/local/lib/python3.11/dist-packages/studentpkg/__init__.py" in trees["student1"]
    assert "/etc/issue.net" not in trees["student1"]
    server.check_output(f"mkdir -p -m 0700 {STORE}")
    return trees


def changed_entries(users, **student2):
    first = {**users["student1"], "gpus": "all", "port": NEW_PORT, "memory": "3g"}
    second = {**users["student2"], "env": NEW_ENV, **student2}
    return [first, second]


def test_new_gpus_port_memory_and_env_recreate_both_with_their_environments_carried_over(server, users, play, before):
    ids = {name: inspect(server, name)["Id"] for name in NAMES}
    run = play(changed_entries(users))
    assert run.rc == 0, run.text[-3000:]
    assert (
        "student1: recreated (settings changed: port 127.0.0.1:7777 -> 127.0.0.1:7787, gpus 0 -> all, memory 2g -> 3g)"
        in run
    ), run.text[-3000:]
    assert "student2: recreated (settings changed: environment (GPULAB_COURSE, GPULAB_GROUP))" in run
    for name in NAMES:
        assert re.search(rf"{name}: safety backup \S+ into {STORE}", run.text)
    assert (
        "its running kernels were stopped (a recreate restarts the notebook); its environment was carried over" in run
    )
    for name in NAMES:
        info = inspect(server, name)
        assert info["Id"] != ids[name]
        assert info["Config"]["Image"].startswith(f"gpulab-carry/notebook-{name}:")
        assert tree(server, name) == before[name]
        imported = server.check_output(
            f"docker exec notebook-{name} python3 -c 'import studentpkg; print(studentpkg.VERSION)'"
        )
        assert imported == "1.0"
    first = inspect(server, "student1")["HostConfig"]
    assert first["Memory"] == 3 * 1024**3 and first["DeviceRequests"][0]["Count"] == -1
    env = dict(e.split("=", 1) for e in inspect(server, "student2")["Config"]["Env"] if "=" in e)
    assert {key: env[key] for key in NEW_ENV} == NEW_ENV
    token = users["student1"]["token"]
    assert jupyter(server, NEW_PORT, "--token", token) == {"status": 200}
    assert jupyter(server, NEW_PORT) == {"status": 403}
    assert jupyter(server, users["student2"]["port"], "--password", users["student2"]["password"])["status"] == 200
    again = play(changed_entries(users))
    assert again.rc == 0 and again.changed == 0, again.text[-3000:]


@pytest.fixture(scope="module")
def new_lab_image(server, before):
    """The lab image's tag built again: a new image ID with one file of its own."""
    dockerfile = f"FROM {IMAGE}\nRUN echo v2 > {NEW_IMAGE_FILE}\n"
    server.check_output(f"printf %s {shlex.quote(dockerfile)} | docker build -q -t {IMAGE} -")
    return json.loads(server.check_output(f"docker image inspect {IMAGE}"))[0]["Id"]


def test_keep_leaves_both_containers_and_says_an_update_is_pending(server, users, play, new_lab_image, hostname):
    ids = {name: inspect(server, name)["Id"] for name in NAMES}
    run = play(changed_entries(users))
    assert run.rc == 0, run.text[-3000:]
    # (The role's preflight notes the new image's Jupyter once: that is its only change.)
    applied = re.search(
        r"TASK \[gpulab\.lab\.notebook : Apply every student's notebook\] .*? (ok|changed): \[", run.text
    )
    assert applied and applied.group(1) == "ok", run.text[-3000:]
    assert "student1: image update pending: the notebook runs on gpulab-test/dl-notebook:latest as it was" in run
    assert "to take it, set image_policy: rebase" in run
    assert {name: inspect(server, name)["Id"] for name in NAMES} == ids
    sheet = (EPHEMERAL / "access" / f"{hostname}.txt").read_text()
    assert sheet.count("update: image update pending") == 2


def test_rebase_and_replace_take_the_new_image_after_a_safety_backup(server, users, play, before, new_lab_image):
    entries = changed_entries(users, image_policy="replace")
    entries[0]["image_policy"] = "rebase"
    run = play(entries)
    assert run.rc == 0, run.text[-3000:]
    assert re.search(rf"student1: safety backup \S+ into {STORE}", run.text)
    assert "student1: rebased (new lab image gpulab-test/dl-notebook:latest, image_policy rebase)" in run
    assert "packages built against the old image may need reinstalling" in run
    rebased = tree(server, "student1")
    assert rebased.pop(NEW_IMAGE_FILE)["size"] == 3
    assert rebased == before["student1"]
    replaced = re.search(rf"student2: safety backup (\S+) into {STORE}", run.text)
    assert replaced, run.text[-3000:]
    assert "student2: replaced (new lab image" in run and "restore.yml brings the old environment back" in run
    fresh = tree(server, "student2")
    assert NEW_IMAGE_FILE in fresh and "/etc/issue.net" in fresh
    assert not [path for path in fresh if "dist-packages/studentpkg" in path]
    assert server.file(f"{users['student2']['workdir']}/{WORK_FILE}").content_string == "student2's work"
    assert jupyter(server, NEW_PORT, "--token", users["student1"]["token"]) == {"status": 200}
    # The replaced environment comes back from its safety backup (container_restore, as restore.yml runs it).
    ansible = shutil.which("ansible", path=str(Path(sys.executable).parent)) or "ansible"
    restore = subprocess.run(
        [
            ansible, server.backend.name, "-i", os.environ["MOLECULE_INVENTORY_FILE"], "-m",
            "gpulab.lab.container_restore", "-a",
            json.dumps({"store": STORE, "container": "notebook-student2", "backup": replaced.group(1), "force": True}),
        ],
        capture_output=True, text=True, check=False,
        env=dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections_path()),
    )  # fmt: skip
    assert restore.returncode == 0, restore.stdout[-3000:] + restore.stderr[-2000:]
    assert tree(server, "student2") == before["student2"]
