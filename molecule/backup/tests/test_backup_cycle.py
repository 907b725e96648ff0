"""The rebuild after a reinstall, end to end (molecule.yml says what the server is).

One module-scoped fixture runs the cycle the way a lab lives it, and the tests check its outcome:
1. each student changes the notebook: a Python module installed into the container's site-packages, a file saved
   through Jupyter into the work directory;
2. gpulab.lab.backup: the store on the server, its copy on the control node (backup_fetch_dir), the timer;
3. a small change and gpulab.lab.backup again: the copy grows by little;
4. the reinstall: containers and images removed, Docker's packages purged, /var/lib/docker, /etc/docker, the work
   directories, the notebooks' configs and the server's whole backup store wiped;
5. gpulab.lab.restore from the control node's copy; then site.yml again, which must leave the restored notebooks
   (and the students' changes in them) alone.
"""

import json
import os
import secrets
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
from playbook_run import PROJECT_DIR, run_playbook

EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
COPY = EPHEMERAL / "backups"
CLIENT = PROJECT_DIR / "molecule" / "shared" / "tests" / "jupyter_client.py"
CLIENT_ON_SERVER = "/opt/gpulab-test/jupyter_client.py"
MARK = secrets.token_hex(6)
WRONG = secrets.token_hex(8)  # a secret no notebook has
USERS = {
    "student1": {"port": 7777, "workdir": "/srv/notebooks/student1", "auth": ["--token"]},
    "student2": {"port": 7778, "workdir": "/srv/notebooks/student2", "auth": ["--password"]},
}


def play(hostname, playbook, extra_vars=None):
    return run_playbook(hostname, playbook, extra_vars, timeout=1800)


def copy_size():
    return sum(p.stat().st_size for p in COPY.rglob("*") if p.is_file())


def jupyter(host, name, token=None, password=None, put=None):
    """The notebook's answers, asked from inside the server (as the SSH tunnel's far end does)."""
    args = [str(USERS[name]["port"])]
    if token is not None:
        args += ["--token", token]
    if password is not None:
        args += ["--password", password]
    if put:
        args += ["--put", *put]
    return json.loads(host.check_output(f"python3 {CLIENT_ON_SERVER} {shlex.join(args)}"))


def secrets_of(host):
    users = {u["name"]: u for u in host.ansible.get_variables()["notebook_users"]}
    return {"student1": {"token": users["student1"]["token"]}, "student2": {"password": users["student2"]["password"]}}


def container(host, name):
    return json.loads(host.check_output(f"docker inspect notebook-{name}"))[0]


def install_module(host, name, marker):
    """A Python package installed into the container's site-packages (as root: what `sudo pip install` does; the
    notebook itself runs as the student)."""
    site = host.check_output(f"docker exec notebook-{name} python3 -c 'import site; print(site.getsitepackages()[0])'")
    module = f"{site}/gpulab_course.py"
    host.check_output(f'docker exec -u 0 notebook-{name} sh -c "echo \'MARK = \\"{marker}\\"\' > {module}"')


@pytest.fixture(scope="module")
def cycle(host):
    hostname = host.backend.host
    host.check_output(f"mkdir -p {os.path.dirname(CLIENT_ON_SERVER)}")
    host.check_output(f"cat > {CLIENT_ON_SERVER} <<'EOF'\n{CLIENT.read_text()}\nEOF")
    auth = secrets_of(host)
    before = {}
    for name in USERS:
        install_module(host, name, f"{MARK}-{name}")
        answer = jupyter(host, name, **auth[name], put=[f"notes-{MARK}.txt", f"{name} {MARK}"])
        assert answer["put"] == 201, answer
        before[name] = container(host, name)

    first = play(hostname, "gpulab.lab.backup")
    first_size = copy_size()
    host.check_output(f"docker exec -u 0 notebook-student1 sh -c 'echo {MARK} > /opt/after-first-backup.txt'")
    second = play(hostname, "gpulab.lab.backup")
    second_size = copy_size()

    # The reinstall: nothing of Docker, the notebooks or the server's store is left.
    host.check_output(
        "set -e; docker rm -f $(docker ps -aq); docker system prune -af --volumes >/dev/null; "
        "systemctl stop docker.socket docker containerd; "
        "apt-mark unhold docker.io containerd runc >/dev/null; "
        "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q docker.io containerd runc >/dev/null; "
        "rm -rf /var/lib/docker/* /var/lib/containerd /etc/docker /srv/notebooks /etc/gpulab /var/backups/gpulab "
        "/var/cache/gpulab"
    )
    wiped = {
        "/srv/notebooks": host.file("/srv/notebooks").exists,
        "/var/backups/gpulab": host.file("/var/backups/gpulab").exists,
        "dockerd": host.run("command -v dockerd").rc == 0,
    }
    restore = play(hostname, "gpulab.lab.restore")
    after_restore = {name: container(host, name) for name in USERS} if restore.rc == 0 else {}
    again = play(hostname, "site.yml") if restore.rc == 0 else None
    return {
        "auth": auth,
        "before": before,
        "first": first,
        "second": second,
        "sizes": (first_size, second_size),
        "wiped": wiped,
        "restore": restore,
        "after_restore": after_restore,
        "again": again,
    }


def test_backups_ran_and_the_copy_grew_by_little_the_second_time(cycle):
    assert cycle["first"].rc == 0, cycle["first"].raw[-4000:]
    assert cycle["second"].rc == 0, cycle["second"].raw[-4000:]
    first, second = cycle["sizes"]
    assert first > 300 * 2**20  # the image's layers, compressed: hundreds of MiB
    assert second - first < 0.05 * first, (first, second)  # one small new layer, the new manifests
    # Both backups read the writable layers from their overlay2 upper directories (the fast path); the first saved the
    # image's layers into the store before.
    for name in USERS:
        manifests = [json.loads(p.read_text()) for p in COPY.glob(f"*/backups/notebook-{name}/*.json")]
        assert [m["path_taken"] for m in sorted(manifests, key=lambda m: m["created"])] == ["overlay-upperdir"] * 2
    assert "notebook-student1: backup" in cycle["second"].text and "(overlay-upperdir)" in cycle["second"].text


def test_the_backup_timer_is_set_up(host):
    timer = host.service("gpulab-backup.timer")
    assert timer.is_enabled
    unit = host.file("/etc/systemd/system/gpulab-backup.service").content_string
    command = "-m ansible_collections.gpulab.lab.plugins.module_utils.backup.cli"
    # backup_containers empty: the timer asks the engine for the notebooks when it runs, and thaws after any run.
    assert f"{command} backup --settings /usr/local/lib/gpulab/backup-timer.json --notebooks" in unit
    assert f"ExecStopPost=/usr/bin/python3 {command} thaw --settings" in unit
    assert "KillMode=mixed" in unit
    settings = json.loads(host.file("/usr/local/lib/gpulab/backup-timer.json").content_string)
    assert "container" not in settings
    assert settings["store"] == "/var/backups/gpulab" and settings["keep_last"] == 3
    assert "OnCalendar=*-*-* 03:30:00" in host.file("/etc/systemd/system/gpulab-backup.timer").content_string


def test_the_timer_service_backs_up_on_its_own_after_the_restore(host, cycle):
    """The timer's service runs the backup code the role copied to the server (no Ansible): on the restored
    notebooks it takes the fast path, the restored images' layers being in the store already."""
    started = host.run("systemctl start gpulab-backup.service")
    journal = host.check_output("journalctl -u gpulab-backup.service --no-pager -o cat")
    assert started.rc == 0, started.stderr + journal[-3000:]
    # The backup's results, one a container (the unit's ExecStopPost, cli thaw, prints its own line after them).
    results = [
        r for r in (json.loads(line) for line in journal.splitlines() if line.startswith("{")) if "container" in r
    ]
    results = results[-2:]
    assert sorted(r["container"] for r in results) == ["notebook-student1", "notebook-student2"]
    for result in results:
        assert result["path_taken"] == "overlay-upperdir", result["path_reason"]
        assert result["base_image_stored"] is False
        image = cycle["after_restore"][result["container"].removeprefix("notebook-")]["Image"]
        layers = json.loads(host.check_output(f"docker image inspect {image}"))[0]["RootFS"]["Layers"]
        assert result["layer_count"] == len(layers) + 1  # the restored image's layers, and the writable one
        assert result["layers_reused"] >= len(layers)  # all in the store: only the writable layer can be new
        assert result["bytes_written"] < 5 * 2**20


def test_the_reinstall_wiped_everything(cycle):
    assert cycle["wiped"] == {"/srv/notebooks": False, "/var/backups/gpulab": False, "dockerd": False}


def test_restore_ran(cycle):
    assert cycle["restore"].rc == 0, cycle["restore"].raw[-5000:]
    assert cycle["restore"].failed == 0


@pytest.mark.parametrize("name", USERS)
def test_each_notebook_answers_on_its_old_port_with_its_old_secret(host, cycle, name):
    auth = cycle["auth"][name]
    if "token" in auth:
        assert jupyter(host, name, token=auth["token"])["status"] == 200
        assert jupyter(host, name, token=WRONG)["status"] == 403
    if "password" in auth:
        answer = jupyter(host, name, password=auth["password"])
        assert answer == {"login": 302, "status": 200}
        assert jupyter(host, name, password=WRONG)["status"] == 403
    assert jupyter(host, name)["status"] == 403  # no secret: refused
    ports = cycle["after_restore"][name]["HostConfig"]["PortBindings"]["8888/tcp"]
    assert ports == [{"HostIp": "127.0.0.1", "HostPort": str(USERS[name]["port"])}]


@pytest.mark.parametrize("name", USERS)
def test_the_container_keeps_its_settings(cycle, name):
    old, new = cycle["before"][name], cycle["after_restore"][name]
    for key in ("IpcMode", "RestartPolicy", "DeviceRequests", "Memory", "NanoCpus", "ShmSize"):
        assert new["HostConfig"][key] == old["HostConfig"][key], key
    assert sorted(new["HostConfig"]["Binds"] or []) == sorted(old["HostConfig"]["Binds"] or [])
    assert new["Config"]["Cmd"] == old["Config"]["Cmd"]
    assert new["State"]["Running"]


@pytest.mark.parametrize("name", USERS)
def test_the_students_changes_are_back(host, cycle, name):
    code = "import gpulab_course; print(gpulab_course.MARK)"
    marker = host.check_output(f"docker exec notebook-{name} python3 -c '{code}'")
    assert marker == f"{MARK}-{name}"
    notes = host.file(f"{USERS[name]['workdir']}/notes-{MARK}.txt")
    assert notes.content_string == f"{name} {MARK}"
    assert notes.uid == host.user(name).uid


def test_the_newest_backup_was_restored(host, cycle):
    assert host.check_output("docker exec notebook-student1 cat /opt/after-first-backup.txt") == MARK


def test_site_yml_after_the_restore_keeps_the_restored_notebooks(host, cycle):
    again = cycle["again"]
    assert again is not None and again.rc == 0, again.raw[-4000:] if again else "restore failed"
    for name in USERS:
        assert container(host, name)["Id"] == cycle["after_restore"][name]["Id"]
    assert host.check_output("docker exec notebook-student1 cat /opt/after-first-backup.txt") == MARK


def test_a_backup_id_for_several_containers_is_refused_with_nothing_changed(host, cycle):
    before = {name: container(host, name)["Id"] for name in USERS}
    refused = play(host.backend.host, "gpulab.lab.restore", {"backup_restore_id": "20250101T000000.000Z-000000"})
    assert refused.rc != 0 and refused.failed == 1
    assert "backup_restore_id names one backup of one container: set backup_containers" in refused.text
    assert {name: container(host, name)["Id"] for name in USERS} == before
