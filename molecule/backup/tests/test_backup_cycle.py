"""The rebuild after a reinstall, end to end, in each order an admin may take (molecule.yml says what the server is).

One module-scoped fixture runs the cycle the way a lab lives it, and the tests check its outcome:
1. each student changes the notebook: a Python module installed into the container's site-packages, a file saved
   through Jupyter into the work directory;
2. gpulab.lab.backup: the store on the server, its copy on the control node (backup_fetch_dir), the timer;
3. a small change and gpulab.lab.backup again: the copy grows by little; each container's complete file tree (the
   backup tree test's listing: every path's type, mode, owner, size, sha256, link target, hard links, xattrs; the work
   directory and the config mounted in it included) is taken;
4. three reinstalls, each followed by one order of the admin's commands, each ending with every student's tree as it
   was, byte for byte:
   - restore.yml then site.yml: the full reinstall (containers and images removed, Docker's packages purged,
     /var/lib/docker, /etc/docker, the work directories, the notebooks' configs and the server's whole backup store
     wiped); restore.yml from the control node's copy; then site.yml, which keeps the restored notebooks;
   - site.yml then restore.yml: the notebooks, their restored images, work directories, configs and the server's store
     wiped (the engine and the lab's image kept: the reinstalls share them, as restoring the lab's layers again would
     only repeat the first); site.yml with nothing to restore from (backup_auto_restore false) starts fresh, empty
     notebooks; restore.yml replaces them, without force, since their students changed nothing in them;
   - site.yml alone, after the same reinstall: it restores the missing notebooks from the control node's copy
     instead of starting them empty, and says so per student.
"""

import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
from playbook_run import PROJECT_DIR, run_playbook

# The backup tree test's listing of a container's complete file tree (tests/unit/test_backup_tree.py).
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests" / "unit"))
from test_backup_tree import LISTING

EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
COPY = EPHEMERAL / "backups"
CLIENT = PROJECT_DIR / "molecule" / "shared" / "tests" / "jupyter_client.py"
CLIENT_ON_SERVER = "/opt/gpulab-test/jupyter_client.py"
LISTING_ON_SERVER = "/opt/gpulab-test/tree_listing.py"
# Rewritten by every start of Jupyter (its server file and pid, the cookie secret): not the student's files.
JUPYTER_RUNTIME = "/tmp/jupyter-runtime"
ORDERS = ("restore.yml then site.yml", "site.yml then restore.yml", "site.yml alone")
# What a reinstall wipes. The full one (the first) also Docker, its packages and its data; the others keep the engine
# and the lab's image, which the cycles share.
WIPE_NOTEBOOKS = "/srv/notebooks /etc/gpulab /var/backups/gpulab /var/cache/gpulab"
FULL_REINSTALL = (
    "set -e; docker rm -f $(docker ps -aq); docker system prune -af --volumes >/dev/null; "
    "systemctl stop docker.socket docker containerd; "
    "apt-mark unhold docker.io containerd runc >/dev/null; "
    "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q docker.io containerd runc >/dev/null; "
    f"rm -rf /var/lib/docker/* /var/lib/containerd /etc/docker {WIPE_NOTEBOOKS}"
)
NOTEBOOKS_REINSTALL = (
    "set -e; docker rm -f $(docker ps -aq); "
    "docker images --format '{{.Repository}}:{{.Tag}}' | grep '^gpulab-backup/' | xargs -r docker rmi >/dev/null; "
    f"rm -rf {WIPE_NOTEBOOKS}"
)
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


def answers(host, name, auth):
    """Whether the notebook answers 200 with its secret (False while Jupyter is still starting)."""
    flags = shlex.join([f"--{key}" if i % 2 == 0 else value for key, value in auth.items() for i in (0, 1)])
    run = host.run(f"python3 {CLIENT_ON_SERVER} {USERS[name]['port']} {flags}")
    return run.rc == 0 and json.loads(run.stdout).get("status") == 200


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


def trees(host):
    """Each student's container's complete file tree, listed inside it as root (the backup tree test's listing; the
    containers at the same time), without Jupyter's runtime folder."""
    out = {name: f"/opt/gpulab-test/tree-{name}.json" for name in USERS}
    listings = [f"docker exec -i -u 0 notebook-{n} python3 - < {LISTING_ON_SERVER} > {p} &" for n, p in out.items()]
    host.check_output(" ".join(listings) + " wait; " + " && ".join(f"test -s {path}" for path in out.values()))
    found = {}
    for name, path in out.items():
        listed = json.loads(host.check_output(f"cat {path} && rm {path}"))
        found[name] = {
            p: e for p, e in listed.items() if p != JUPYTER_RUNTIME and not p.startswith(JUPYTER_RUNTIME + "/")
        }
    return found


def tree_differences(before, after):
    """The paths whose entries differ (the first 20), for a readable failure."""
    paths = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    return [(p, before.get(p), after.get(p)) for p in paths[:20]]


def newest_backup(name):
    manifests = [json.loads(p.read_text()) for p in COPY.glob(f"*/backups/notebook-{name}/*.json")]
    return max(manifests, key=lambda m: m["created"])["id"]


def containers(host):
    return {name: container(host, name) for name in USERS}


def reinstall_order(host, order):
    """One reinstall and the admin's commands in that order: what each command did, the containers after each, and
    every student's tree at the end."""
    hostname = host.backend.host
    done = {"order": order}
    if order == "restore.yml then site.yml":
        host.check_output(FULL_REINSTALL)
        done["wiped"] = {
            "/srv/notebooks": host.file("/srv/notebooks").exists,
            "/var/backups/gpulab": host.file("/var/backups/gpulab").exists,
            "dockerd": host.run("command -v dockerd").rc == 0,
        }
        done["restore"] = play(hostname, "gpulab.lab.restore")
        done["after_restore"] = containers(host) if done["restore"].rc == 0 else {}
        done["site"] = play(hostname, "site.yml") if done["restore"].rc == 0 else None
    elif order == "site.yml then restore.yml":
        host.check_output(NOTEBOOKS_REINSTALL)
        done["site"] = play(hostname, "site.yml", {"backup_auto_restore": False})
        done["fresh"] = containers(host) if done["site"].rc == 0 else {}
        done["restore"] = play(hostname, "gpulab.lab.restore") if done["site"].rc == 0 else None
    else:
        host.check_output(NOTEBOOKS_REINSTALL)
        done["site"] = play(hostname, "site.yml")
    last = done.get("restore") if order == "site.yml then restore.yml" else done["site"]
    done["final"] = containers(host) if last is not None and last.rc == 0 else {}
    done["trees"] = trees(host) if done["final"] else {}
    return done


@pytest.fixture(scope="module")
def cycle(host):
    hostname = host.backend.host
    host.check_output(f"mkdir -p {os.path.dirname(CLIENT_ON_SERVER)}")
    host.check_output(f"cat > {CLIENT_ON_SERVER} <<'EOF'\n{CLIENT.read_text()}\nEOF")
    host.check_output(f"cat > {LISTING_ON_SERVER} <<'EOF'\n{LISTING}\nEOF")
    auth = secrets_of(host)
    # Jupyter's second start on a home it has started in writes what its first did not (~/.jupyter/migrated): restarted
    # once, as every lab's notebooks have been, the notebooks hold what each later start finds.
    for name in USERS:
        host.check_output(f"docker restart notebook-{name}")
    for name in USERS:
        deadline = time.monotonic() + 120
        while not answers(host, name, auth[name]):
            assert time.monotonic() < deadline, f"the notebook of {name} does not answer after its restart"
            time.sleep(1)
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
    at_backup = trees(host)
    orders = {}
    for order in ORDERS:
        orders[order] = reinstall_order(host, order)
        if not orders[order]["final"]:
            break
    return {
        "auth": auth,
        "before": before,
        "first": first,
        "second": second,
        "sizes": (first_size, second_size),
        "trees": at_backup,
        "orders": orders,
        "final": orders[ORDERS[-1]]["final"] if len(orders) == len(ORDERS) else {},
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
        image = cycle["final"][result["container"].removeprefix("notebook-")]["Image"]
        layers = json.loads(host.check_output(f"docker image inspect {image}"))[0]["RootFS"]["Layers"]
        assert result["layer_count"] == len(layers) + 1  # the restored image's layers, and the writable one
        assert result["layers_reused"] >= len(layers)  # all in the store: only the writable layer can be new
        assert result["bytes_written"] < 5 * 2**20


def test_the_reinstall_wiped_everything(cycle):
    wiped = cycle["orders"]["restore.yml then site.yml"]["wiped"]
    assert wiped == {"/srv/notebooks": False, "/var/backups/gpulab": False, "dockerd": False}


def test_restore_yml_rebuilt_the_reinstalled_server(cycle):
    restore = cycle["orders"]["restore.yml then site.yml"]["restore"]
    assert restore.rc == 0, restore.raw[-5000:]
    assert restore.failed == 0


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", USERS)
def test_every_students_file_tree_is_back_byte_for_byte(cycle, order, name):
    """After each order of commands, the complete tree of each student's container (the work directory and config
    mounted in it included) is the tree at the backup: every path, type, mode, owner, size, sha256, link, xattr."""
    done = cycle["orders"].get(order)
    assert done and done["trees"], f"{order} did not end with the notebooks: " + " ".join(
        run.raw[-3000:] for key in ("restore", "site") if (run := (done or {}).get(key)) is not None
    )
    assert tree_differences(cycle["trees"][name], done["trees"][name]) == []
    assert len(done["trees"][name]) > 10000  # a whole system's tree, not an empty listing


@pytest.mark.parametrize("order", ORDERS)
def test_the_notebooks_run_the_newest_backup(cycle, order):
    for name, info in cycle["orders"][order]["final"].items():
        assert info["Config"]["Labels"]["io.gpulab.backup.restored-from"] == newest_backup(name)
        assert info["State"]["Running"]


def test_site_yml_with_nothing_in_reach_starts_fresh_notebooks_that_restore_yml_replaces(cycle):
    done = cycle["orders"]["site.yml then restore.yml"]
    assert done["site"].rc == 0, done["site"].raw[-4000:]
    for name, info in done["fresh"].items():  # site.yml's own: on the lab's image, restored from nothing
        assert "io.gpulab.backup.restored-from" not in info["Config"]["Labels"]
        assert info["Config"]["Labels"]["io.gpulab.notebook.user"] == name
    assert done["restore"].rc == 0, done["restore"].raw[-5000:]
    for name in USERS:
        assert (
            f"notebook-{name}: restored notebook-{name} from backup {newest_backup(name)} (replacing the fresh "
            "container gpulab had created, which held no change of its student"  # (YAML may double the ')
        ) in done["restore"]
        assert done["final"][name]["Id"] != done["fresh"][name]["Id"]


def test_site_yml_alone_restores_the_missing_notebooks_and_says_so(cycle):
    site = cycle["orders"]["site.yml alone"]["site"]
    assert site.rc == 0, site.raw[-5000:]
    for name in USERS:
        assert (
            f"{name}: the notebook notebook-{name} was missing; restored notebook-{name} from backup "
            f"{newest_backup(name)}"
        ) in site
    assert "instead of an empty notebook" in site


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
    ports = cycle["final"][name]["HostConfig"]["PortBindings"]["8888/tcp"]
    assert ports == [{"HostIp": "127.0.0.1", "HostPort": str(USERS[name]["port"])}]


@pytest.mark.parametrize("name", USERS)
def test_the_container_keeps_its_settings(cycle, name):
    old, new = cycle["before"][name], cycle["orders"]["restore.yml then site.yml"]["after_restore"][name]
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


def test_site_yml_after_the_restore_keeps_the_restored_notebooks(cycle):
    done = cycle["orders"]["restore.yml then site.yml"]
    again = done["site"]
    assert again is not None and again.rc == 0, again.raw[-4000:] if again else "restore failed"
    for name in USERS:
        assert done["final"][name]["Id"] == done["after_restore"][name]["Id"]


def test_a_backup_id_for_several_containers_is_refused_with_nothing_changed(host, cycle):
    before = {name: container(host, name)["Id"] for name in USERS}
    refused = play(host.backend.host, "gpulab.lab.restore", {"backup_restore_id": "20250101T000000.000Z-000000"})
    assert refused.rc != 0 and refused.failed == 1
    assert "backup_restore_id names one backup of one container: set backup_containers" in refused.text
    assert {name: container(host, name)["Id"] for name in USERS} == before
