"""The store's copy on an SFTP NAS, encrypted, and the rebuild from it alone (molecule.yml says what runs where).

One module-scoped fixture runs the cycle, and the tests check its outcome:
1. each student changes the notebook (a module in site-packages, a file through Jupyter); gpulab.lab.backup uploads
   the store to nas:gpulab (the SFTP container); a small change and gpulab.lab.backup again upload about the change;
2. the reinstall: Docker, the work directories, the server's store and /etc/gpulab (the rclone configuration) wiped;
   the control node never had a copy (no backup_fetch_dir);
3. gpulab.lab.restore fetches from the remote alone and restores both students;
4. the timer's service: backup, upload and retention on the remote (backup_keep_last 2); the remote scrub's service;
5. a blob damaged on the NAS: the scrub names it, and a restore from the remote refuses it by name, changing nothing.
"""

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
from playbook_run import PROJECT_DIR, run_playbook

CLIENT = PROJECT_DIR / "molecule" / "shared" / "tests" / "jupyter_client.py"
CLIENT_ON_SERVER = "/opt/gpulab-test/jupyter_client.py"
NAS_FOLDER = "/home/gpulab/gpulab"  # nas:gpulab, as the SFTP server stores it
RCLONE = "rclone --config /etc/gpulab/rclone.conf"
FIGURES = PROJECT_DIR / ".cache" / "backup-remote" / "figures.json"
MARK = secrets.token_hex(6)
USERS = {
    "student1": {"port": 7777, "workdir": "/srv/notebooks/student1"},
    "student2": {"port": 7778, "workdir": "/srv/notebooks/student2"},
}


SECONDS = {}  # each step's wall time, written with the upload figures to .cache/backup-remote/figures.json


def play(hostname, playbook, extra_vars=None, step=None):
    start = time.monotonic()
    run = run_playbook(hostname, playbook, extra_vars, timeout=1800)
    if step:
        SECONDS[step] = round(time.monotonic() - start, 1)
    return run


def sftp_name(host):
    return host.ansible.get_variables()["gpulab_test_sftp"]


def on_nas(host, command):
    """A command in the SFTP server's container (the NAS's own view of its disk)."""
    return subprocess.run(
        ["docker", "exec", sftp_name(host), "sh", "-c", command], capture_output=True, text=True, check=False
    )


def nas_bytes(host):
    return int(on_nas(host, f"du -sb {NAS_FOLDER} | cut -f1").stdout.split()[0])


def jupyter(host, name, token=None, password=None, put=None):
    args = [str(USERS[name]["port"])]
    if token is not None:
        args += ["--token", token]
    if password is not None:
        args += ["--password", password]
    if put:
        args += ["--put", *put]
    return json.loads(host.check_output(f"python3 {CLIENT_ON_SERVER} {shlex.join(args)}"))


def container(host, name):
    return json.loads(host.check_output(f"docker inspect notebook-{name}"))[0]


def uploaded(run):
    """(blobs, MiB) of the play's report line 'copy on nas:gpulab (encrypted): uploaded N blob(s) (X MiB)'."""
    found = re.search(r"copy on nas:gpulab \(encrypted\): uploaded (\d+) blob\(s\) \(([\d.]+) MiB\)", run.text)
    assert found, run.raw[-3000:]
    return int(found.group(1)), float(found.group(2))


def newest_manifest(host, name):
    folder = f"/var/backups/gpulab/backups/notebook-{name}"
    newest = sorted(host.check_output(f"ls {folder}").split())[-1]
    return json.loads(host.check_output(f"cat {folder}/{newest}"))


@pytest.fixture(scope="module")
def cycle(host):
    hostname = host.backend.host
    users = {u["name"]: u for u in host.ansible.get_variables()["notebook_users"]}
    auth = {"student1": {"token": users["student1"]["token"]}, "student2": {"password": users["student2"]["password"]}}
    host.check_output(f"mkdir -p {os.path.dirname(CLIENT_ON_SERVER)}")
    host.check_output(f"cat > {CLIENT_ON_SERVER} <<'EOF'\n{CLIENT.read_text()}\nEOF")
    for name in USERS:
        site = host.check_output(
            f"docker exec notebook-{name} python3 -c 'import site; print(site.getsitepackages()[0])'"
        )
        host.check_output(
            f'docker exec -u 0 notebook-{name} sh -c "echo \'MARK = \\"{MARK}-{name}\\"\' > {site}/gpulab_course.py"'
        )
        assert jupyter(host, name, **auth[name], put=[f"notes-{MARK}.txt", f"{name} {MARK}"])["put"] == 201

    out = {"auth": auth}
    out["first"] = play(hostname, "gpulab.lab.backup", step="first backup.yml")
    out["nas_first"] = nas_bytes(host)
    host.check_output(f"docker exec -u 0 notebook-student1 sh -c 'echo {MARK} > /opt/after-first-backup.txt'")
    out["second"] = play(hostname, "gpulab.lab.backup", step="second backup.yml")
    out["nas_second"] = nas_bytes(host)

    # The reinstall. The control node has no copy: backup_fetch_dir was never set.
    host.check_output(
        "set -e; docker rm -f $(docker ps -aq); docker system prune -af --volumes >/dev/null; "
        "systemctl stop docker.socket docker containerd; apt-mark unhold docker.io containerd runc >/dev/null; "
        "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q docker.io containerd runc rclone >/dev/null; "
        "rm -rf /var/lib/docker/* /var/lib/containerd /etc/docker /srv/notebooks /etc/gpulab /var/backups/gpulab "
        "/var/cache/gpulab"
    )
    out["wiped"] = [p for p in ("/srv/notebooks", "/var/backups/gpulab", "/etc/gpulab") if host.file(p).exists]
    out["restore"] = play(hostname, "gpulab.lab.restore", step="restore.yml from the remote")
    out["after_restore"] = {n: container(host, n) for n in USERS} if out["restore"].rc == 0 else {}

    # The timer's run: backup, then the upload and retention (its second ExecStart).
    out["timer"] = host.run("systemctl start gpulab-backup.service")
    out["timer_journal"] = host.check_output("journalctl -u gpulab-backup.service --no-pager -o cat")
    out["remote_manifests"] = host.check_output(f"{RCLONE} lsf -R --files-only gpulab-crypt:servers").split()
    start = time.monotonic()
    out["scrub"] = host.run("systemctl start gpulab-backup-remote-verify.service")
    SECONDS["remote scrub"] = round(time.monotonic() - start, 1)

    # A blob of student2's newest backup (the timer's) damaged on the NAS, its encrypted name asked of rclone.
    out["damaged"] = newest_manifest(host, "student2")["mounts"][0]["blobs"][0]["digest"]
    hex_name = out["damaged"].removeprefix("sha256:")
    encrypted = host.check_output(f"{RCLONE} cryptdecode --reverse gpulab-crypt: blobs/sha256/{hex_name}").split()[-1]
    damage = on_nas(host, f"printf 'DAMAGE' | dd of={NAS_FOLDER}/{encrypted} bs=1 seek=60 conv=notrunc 2>&1")
    assert damage.returncode == 0, damage.stdout + damage.stderr
    # A restore from the remote alone refuses it (the server's store set aside: it would need nothing from the NAS).
    out["before_refused"] = container(host, "student2")["Id"]
    host.check_output("mv /var/backups/gpulab /var/backups/gpulab.aside")
    out["refused"] = play(
        hostname, "gpulab.lab.restore", {"backup_containers": ["notebook-student2"], "backup_restore_force": True}
    )
    host.check_output("rm -rf /var/backups/gpulab && mv /var/backups/gpulab.aside /var/backups/gpulab")
    # The scrub names it and moves it aside on the NAS; the next upload, from this server's store, sends it again.
    out["scrub_damaged"] = host.run("systemctl start gpulab-backup-remote-verify.service")
    out["scrub_journal"] = host.check_output("journalctl -u gpulab-backup-remote-verify.service --no-pager -o cat")
    out["resent"] = host.run("systemctl start gpulab-backup.service")
    out["resent_listing"] = host.run(f"{RCLONE} lsf gpulab-crypt:blobs/sha256/{hex_name}").stdout.strip()
    figures = {
        "first_upload": uploaded(out["first"]) if out["first"].rc == 0 else None,
        "second_upload": uploaded(out["second"]) if out["second"].rc == 0 else None,
        "nas_bytes": [out["nas_first"], out["nas_second"]],
        "seconds": SECONDS,
        "load": os.getloadavg(),
    }
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=1) + "\n")
    return out


def test_the_first_backup_uploads_the_store_and_the_second_about_the_change(cycle):
    assert cycle["first"].rc == 0, cycle["first"].raw[-4000:]
    assert cycle["second"].rc == 0, cycle["second"].raw[-4000:]
    blobs, mib = uploaded(cycle["first"])
    assert blobs > 2 and mib > 300  # the image's layers and both notebooks' changes
    blobs, small = uploaded(cycle["second"])
    assert blobs >= 1 and small < 0.05 * mib, (blobs, small, mib)
    first, second = cycle["nas_first"], cycle["nas_second"]
    assert first > 300 * 2**20 and second - first < 0.05 * first, (first, second)


def test_the_nas_holds_no_readable_name_or_content(host, cycle):
    names = on_nas(host, f"find {NAS_FOLDER}").stdout
    assert names.count("\n") > 10
    for word in ("sha256", "servers", "backups", "notebook", ".json", cycle["damaged"][7:20]):
        assert word not in names, word
    # What the server reads back through the crypt remote does hold them: a manifest names its container and mounts.
    listing = host.check_output(f"{RCLONE} lsf -R --files-only gpulab-crypt:servers")
    manifest = host.check_output(f"{RCLONE} cat gpulab-crypt:servers/{listing.split()[0]}")
    known = ["gpulab-backup", "/srv/notebooks/student", "notebook-student"]
    assert all(word in manifest for word in known)
    for word in [*known, f"notes-{MARK}", MARK]:
        assert on_nas(host, f"grep -r -l -F {shlex.quote(word)} {NAS_FOLDER}").returncode == 1, word


def test_the_reinstall_wiped_the_store_and_the_remotes_configuration(cycle):
    assert cycle["wiped"] == []


def test_restore_from_the_remote_alone_ran(cycle):
    assert cycle["restore"].rc == 0, cycle["restore"].raw[-5000:]
    assert "from nas:gpulab (encrypted)" in cycle["restore"].text


@pytest.mark.parametrize("name", USERS)
def test_each_notebook_is_back_with_its_secret_and_the_students_files(host, cycle, name):
    auth = cycle["auth"][name]
    if "token" in auth:
        assert jupyter(host, name, token=auth["token"])["status"] == 200
    else:
        assert jupyter(host, name, password=auth["password"]) == {"login": 302, "status": 200}
    assert jupyter(host, name)["status"] == 403
    code = "import gpulab_course; print(gpulab_course.MARK)"
    assert host.check_output(f"docker exec notebook-{name} python3 -c '{code}'") == f"{MARK}-{name}"
    notes = host.file(f"{USERS[name]['workdir']}/notes-{MARK}.txt")
    assert notes.content_string == f"{name} {MARK}"
    assert notes.uid == host.user(name).uid


def test_the_newest_backup_came_back(host, cycle):
    assert cycle["restore"].rc == 0
    assert host.check_output("docker exec notebook-student1 cat /opt/after-first-backup.txt") == MARK


def test_the_timer_uploads_and_applies_retention_on_the_remote(cycle):
    assert cycle["timer"].rc == 0, cycle["timer"].stderr + cycle["timer_journal"][-3000:]
    assert "copy on nas:gpulab (encrypted):" in cycle["timer_journal"]
    assert "retention removed 2 backup(s)" in cycle["timer_journal"]
    manifests = cycle["remote_manifests"]
    for name in USERS:
        assert len([m for m in manifests if f"/notebook-{name}/" in m]) == 2, manifests  # backup_keep_last: 2


def test_a_blob_damaged_on_the_remote_is_refused_by_its_name_and_nothing_changes(host, cycle):
    refused = cycle["refused"]
    assert refused.rc != 0 and refused.failed == 1, refused.raw[-3000:]
    assert cycle["damaged"] in refused.text, refused.raw[-3000:]
    assert "nothing was changed" in refused.text
    assert container(host, "student2")["Id"] == cycle["before_refused"]


def test_the_remote_scrub_passes_then_names_the_damaged_blob_and_the_next_upload_sends_it_again(cycle):
    assert cycle["scrub"].rc == 0, cycle["scrub_journal"][-3000:]
    assert cycle["scrub_damaged"].rc != 0
    assert f"blob {cycle['damaged']} cannot be read (damaged)" in cycle["scrub_journal"]
    assert "moved to quarantine/sha256/" in cycle["scrub_journal"]
    assert cycle["resent"].rc == 0
    assert cycle["resent_listing"] == cycle["damaged"].removeprefix("sha256:")
