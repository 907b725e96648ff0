"""Tests of the scrub and the quarantine (module_utils/backup/scrub.py, store.py, verify.py) against this machine's real
Docker engine (skipped without one): a stored blob with one byte flipped, its size kept, found by the scrub and moved
to quarantine; the backups that need it listed as damaged with what they lack; the next backup storing the content
again from its source (and saying so), verified; no later manifest referencing the bad blob, also when the source no
longer has it. The same with an image-layer blob that two containers' backups share. Then the scrub's spreading over
its period, and a scrub killed outright that resumes where it was.
"""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from backup_harness import (
    ROOT,
    needs_docker,
    remove_container,
    remove_images_of,
    run_container,
    run_module,
    sh,
    timer_lib,
    tiny_fixture,  # noqa: F401 (the fixture tiny)
)
from module_harness import ModuleFail

from ansible_collections.gpulab.lab.plugins.module_utils.backup import cli as backup_cli
from ansible_collections.gpulab.lab.plugins.module_utils.backup import common as backup_common
from ansible_collections.gpulab.lab.plugins.module_utils.backup import scrub
from ansible_collections.gpulab.lab.plugins.module_utils.backup import store as backup_store
from ansible_collections.gpulab.lab.plugins.module_utils.backup import verify as backup_verify
from ansible_collections.gpulab.lab.plugins.module_utils.files import file_sha256
from ansible_collections.gpulab.lab.plugins.modules import backup_scrub, container_backup, container_restore

pytestmark = [needs_docker, pytest.mark.usefixtures("capture_exit")]
DAY = 86400


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture
def containers(tiny, tmp_path):
    """Two running containers of the tiny image, each with a work directory and 3 MB of its own in its writable layer
    (so that its layer is several chunks); removed afterwards."""
    made = []
    for i in ("a", "b"):
        name = f"gpulab-unittest-scrub-{i}-{uuid.uuid4().hex[:6]}"
        work = tmp_path / f"work-{i}"
        work.mkdir()
        (work / "notes.txt").write_text(f"notes of {name}\n")
        run_container(name, tiny, "-v", f"{work}:/work")
        sh("docker", "exec", name, "sh", "-c", "head -c 3000000 /opt/data.txt > /root/model.bin; echo x > /root/x")
        made.append({"name": name, "work": work})
    yield made
    for c in made:
        remove_container(c["name"])
        remove_images_of(c["name"])


def backup(container, store):
    return run_module(container_backup, {"container": container["name"], "store": str(store)})


def flip_a_byte(path):
    """One byte flipped in the middle of a stored blob, its size kept; returns the damaged bytes."""
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(path, 0o600)
    Path(path).write_bytes(bytes(data))
    return bytes(data)


def referenced(manifest):
    return {b["digest"] for b, _what in backup_store.manifest_blobs(manifest)}


def cli(*args):
    return backup_cli.main([str(a) for a in args])


def test_a_flipped_byte_is_quarantined_and_the_next_backup_stores_it_again(containers, tmp_path, capsys):
    c = containers[0]
    store_dir = tmp_path / "store"
    first, second = backup(c, store_dir), backup(c, store_dir)
    store = backup_store.Store(str(store_dir))
    m1, m2 = read_json(first["manifest"]), read_json(second["manifest"])
    chunk = next(b for b in m2["layers"][-1]["blobs"] if b["digest"] in referenced(m1))  # both backups need it
    digest = chunk["digest"]
    bad = flip_a_byte(store.blob_path(digest))
    assert os.path.getsize(store.blob_path(digest)) == chunk["stored_size"]
    assert store.missing_blobs(m2) == []  # sizes cannot tell: only reading it back can

    # The scrub reads it back, finds it and quarantines it; the timer's command exits 1 and names the damage.
    capsys.readouterr()
    assert cli("scrub", "--store", store_dir, "--all") == 1
    printed = capsys.readouterr()
    report = json.loads(printed.out.strip().splitlines()[-1])
    assert [q["digest"] for q in report["quarantined"]] == [digest]
    assert report["finished"] is True
    assert report["blobs_checked"] == report["store_blobs"] - 1 >= 3  # all but the bad one
    assert "DAMAGED backups" in printed.err
    assert f"{c['name']} {first['backup_id']} lacks layer 3" in printed.err
    assert not os.path.exists(store.blob_path(digest))
    assert Path(store.quarantine_copy(digest)).read_bytes() == bad
    record = read_json(store.quarantine_copy(digest) + ".json")
    assert (record["found_by"], record["healed_utc"]) == ("scrub", None)
    assert sorted(b[1] for b in record["backups"]) == sorted([first["backup_id"], second["backup_id"]])

    # Both backups are listed as damaged, with what they lack; the one gate of reuse no longer offers the blob.
    listing = backup_cli.list_store(str(store_dir), c["name"])
    assert listing["damaged"] == [first["backup_id"], second["backup_id"]]
    for entry in listing["backups"]:
        assert entry["complete"] is False
        assert any(digest in lack and "found by the scrub" in lack for lack in entry["lacks"])
    assert digest not in store.blob_index()
    assert m2["layers"][-1]["diff_id"] not in store.layer_index()
    with pytest.raises(ModuleFail, match=f"blob {digest} is damaged .quarantined"):
        run_module(
            container_restore,
            {"container": c["name"], "store": str(store_dir), "backup": second["backup_id"], "verify_only": True},
        )

    # The next backup: the container still has that content, so it is stored again, and the backup says so.
    third = backup(c, store_dir)
    m3 = read_json(third["manifest"])
    assert digest in referenced(m3)
    assert any(f"stored again from its source: blob {digest}" in n for n in third["notices"])
    assert any("complete again" in n and first["backup_id"] in n for n in third["notices"])
    assert Path(store.blob_path(digest)).read_bytes() != bad
    assert backup_verify.verify_backup(store, m3).blobs == len(referenced(m3))
    assert third["damaged_backups"] == []
    assert [b["backup_id"] for b in third["backups"] if b["complete"]] == [
        first["backup_id"],
        second["backup_id"],
        third["backup_id"],
    ]
    assert not os.path.exists(store.quarantine_copy(digest))  # the bad copy went; the record says when it healed
    assert (
        read_json(store.quarantine_copy(digest) + ".json")["healed_by"] == f"backup {third['backup_id']} of {c['name']}"
    )
    assert backup_verify.verify_backup(store, m1).blobs == len(referenced(m1))

    # A scrub after it finds nothing; list says when each backup was last verified.
    assert cli("scrub", "--store", store_dir, "--all") == 0
    for entry in backup_cli.list_store(str(store_dir), c["name"])["backups"]:
        assert entry["last_verified"] is not None
        assert entry["damaged"] is False


def test_content_the_source_no_longer_has_is_never_referenced_again(containers, tmp_path, capsys):
    c = containers[0]
    store_dir = tmp_path / "store"
    first = backup(c, store_dir)
    store = backup_store.Store(str(store_dir))
    m1 = read_json(first["manifest"])
    chunk = m1["layers"][-1]["blobs"][0]["digest"]
    flip_a_byte(store.blob_path(chunk))
    report = scrub.scrub(str(store_dir), full=True)
    assert [q["digest"] for q in report.quarantined] == [chunk]
    assert [d["backup_id"] for d in report.damaged] == [first["backup_id"]]
    sh("docker", "exec", c["name"], "sh", "-c", "rm /root/model.bin /root/x")  # the content is gone from the source
    second = backup(c, store_dir)
    m2 = read_json(second["manifest"])
    assert chunk not in referenced(m2)
    assert backup_verify.verify_backup(store, m2).blobs == len(referenced(m2))
    assert any(
        f"backup {first['backup_id']} of {c['name']} is damaged (the source no longer has that content)" in n
        for n in second["notices"]
    )
    assert second["damaged_backups"] == [first["backup_id"]]
    lacks = next(b for b in second["backups"] if b["backup_id"] == first["backup_id"])["lacks"]
    assert lacks and all(chunk in lack for lack in lacks)
    assert not os.path.exists(store.blob_path(chunk))
    # The timer's backup: its result, and a line in the journal naming the damaged backup and what it lacks.
    capsys.readouterr()
    assert cli("backup", "--store", store_dir, "--container", c["name"]) == 0
    printed = capsys.readouterr()
    assert chunk not in referenced(read_json(json.loads(printed.out.strip().splitlines()[-1])["manifest"]))
    assert f"gpulab_backup: damaged backups in {store_dir}: {c['name']} {first['backup_id']} lacks layer" in printed.err


def test_a_damaged_image_layer_shared_by_two_containers(containers, tmp_path):
    store_dir = tmp_path / "store"
    a, b = containers
    firsts = [backup(c, store_dir) for c in containers]
    store = backup_store.Store(str(store_dir))
    manifests = [read_json(f["manifest"]) for f in firsts]
    layer = manifests[0]["layers"][1]  # the image's second layer: one blob, stored once for both containers
    assert manifests[1]["layers"][1] == layer
    digest = layer["blobs"][0]["digest"]
    bad = flip_a_byte(store.blob_path(digest))
    report = scrub.scrub(str(store_dir), full=True)
    assert [q["digest"] for q in report.quarantined] == [digest]
    assert sorted(d["container"] for d in report.damaged) == sorted([a["name"], b["name"]])
    assert all(any(layer["diff_id"] in lack for lack in d["lacks"]) for d in report.damaged)
    assert layer["diff_id"] not in store.layer_index()

    # The next backup of a stores the image's layer again from the image; b's backup is complete again with it.
    again = backup(a, store_dir)
    assert again["base_image_stored"] is True
    assert any(f"stored again from its source: blob {digest}" in n and b["name"] in n for n in again["notices"])
    assert Path(store.blob_path(digest)).read_bytes() != bad
    assert digest in referenced(read_json(again["manifest"]))
    for manifest in [*manifests, read_json(again["manifest"])]:
        assert backup_verify.verify_backup(store, manifest).blobs == len(referenced(manifest))
    listing = backup_cli.list_store(str(store_dir))
    assert listing["damaged"] == []
    later = backup(b, store_dir)
    assert later["base_image_stored"] is False
    assert not any("damaged" in n or "stored again" in n for n in later["notices"])


def test_a_restore_quarantines_what_its_verification_finds_and_the_backup_heals_it(containers, tmp_path):
    c = containers[0]
    store_dir = tmp_path / "store"
    first = backup(c, store_dir)
    store = backup_store.Store(str(store_dir))
    digest = read_json(first["manifest"])["mounts"][0]["blobs"][0]["digest"]  # the work directory's archive
    flip_a_byte(store.blob_path(digest))
    with pytest.raises(ModuleFail, match=f"blob {digest} is corrupt .*moved to .*never used again"):
        run_module(container_restore, {"container": c["name"], "store": str(store_dir), "verify_only": True})
    assert read_json(store.quarantine_copy(digest) + ".json")["found_by"] == "restore"
    second = backup(c, store_dir)  # the work directory is unchanged: archived again, not reused
    assert second["mounts"][0]["reused"] is False
    assert any(f"stored again from its source: blob {digest}" in n for n in second["notices"])
    assert second["damaged_backups"] == []


def test_a_blob_cut_short_is_quarantined_by_the_next_backup(containers, tmp_path):
    c = containers[0]
    store_dir = tmp_path / "store"
    first = backup(c, store_dir)
    store = backup_store.Store(str(store_dir))
    sh("docker", "exec", c["name"], "sh", "-c", "rm /root/model.bin")
    blob = read_json(first["manifest"])["layers"][-1]["blobs"][0]
    path = store.blob_path(blob["digest"])
    os.chmod(path, 0o600)
    os.truncate(path, blob["stored_size"] // 2)
    second = backup(c, store_dir)
    assert blob["digest"] not in referenced(read_json(second["manifest"]))
    assert any(f"blob {blob['digest']} was quarantined" in n for n in second["notices"])
    assert read_json(store.quarantine_copy(blob["digest"]) + ".json")["found_by"] == "backup"
    assert second["damaged_backups"] == [first["backup_id"]]


# ---- spreading, resuming -------------------------------------------------------------------------------------------


def a_store(tmp_path, count=40, size=200_000):
    """A store of count blobs (one backup of one container, each blob a layer), written 'now'."""
    store = backup_store.Store(str(tmp_path / "store"), create=True)
    store.create()
    layers = []
    for i in range(count):
        data = os.urandom(size // 2) + bytes(size // 2) + i.to_bytes(4, "big")
        raw = tmp_path / f"raw-{i}"
        raw.write_bytes(data)
        digest = backup_common.sha256_of(data)
        subprocess.run(["zstd", "-qf", "--rm", raw, "-o", store.blob_path(digest)], check=True)
        path = store.blob_path(digest)
        blob = {"digest": digest, "size": len(data), "stored_digest": file_sha256(path),
                "stored_size": os.path.getsize(path)}  # fmt: skip
        layers.append({"diff_id": digest, "size": len(data), "blobs": [blob]})
    manifest = {"format": backup_common.FORMAT, "version": 1, "id": "20260101T000000.000Z-aaaaaa",
                "container": "kim", "created": 1, "layers": layers, "mounts": []}  # fmt: skip
    store.write_manifest(manifest)
    return store, manifest


def test_the_scrub_covers_the_store_within_its_period(tmp_path):
    store, _manifest = a_store(tmp_path)
    start = os.stat(store.blobs).st_mtime + 60
    seen, checked = set(), []
    for day in range(10):  # a daily timer, a period of 10 days
        report = scrub.scrub(store.path, period_days=10, now=start + day * DAY)
        checked.append(report.blobs_checked)
        state = read_json(Path(store.path) / "scrub" / "state.json")
        seen |= set(state["verified"])
    assert len(seen) == 40  # every blob within the period
    assert max(checked) <= 6  # a tenth of the store a day (4 blobs), not all at once
    assert sum(checked) <= 48
    report = scrub.scrub(store.path, period_days=10, now=start + 10 * DAY)
    assert report.verified_within_period == 1.0
    # Twenty days without a run: everything is overdue, and one run verifies it all.
    late = scrub.scrub(store.path, period_days=10, now=start + 30 * DAY)
    assert late.blobs_checked == 40
    with pytest.raises(backup_common.BackupError, match="at least 1 day"):
        scrub.scrub(store.path, period_days=0)


KILLER = """
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from ansible_collections.gpulab.lab.plugins.module_utils.backup import cli, scrub
scrub.SAVE_EVERY = 0.0  # the state written after each blob
real, calls, lock, never = scrub.verify_blob, [], threading.Lock(), threading.Event()
def verify_blob(*args, **kwargs):
    with lock:
        calls.append(1)
        number = len(calls)
    if number == 11:  # the ten before it recorded, then killed outright, as by the OOM killer or a power cut
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)
    if number > 10:
        never.wait()
    return real(*args, **kwargs)
scrub.verify_blob = verify_blob
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_scrub_killed_outright_resumes_where_it_was(tmp_path):
    store, _manifest = a_store(tmp_path, count=30)
    argv = [sys.executable, "-c", KILLER, str(ROOT), "scrub", "--store", store.path, "--all"]
    killed = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    state = read_json(Path(store.path) / "scrub" / "state.json")
    before = len(state["verified"])
    assert before == 10  # what was checked before the kill is recorded
    assert state["full_started"] is not None  # a full run in progress
    resumed = scrub.scrub(store.path, full=True)
    assert (resumed.resumed, resumed.finished, resumed.blobs_checked) == (True, True, 30 - before)
    assert read_json(Path(store.path) / "scrub" / "state.json")["full_started"] is None
    again = scrub.scrub(store.path, full=True)
    assert (again.resumed, again.blobs_checked) == (False, 30)


def test_a_stopped_scrub_keeps_what_it_verified(tmp_path, monkeypatch):
    store, _manifest = a_store(tmp_path, count=12)
    monkeypatch.setattr(scrub, "SAVE_EVERY", 0.0)
    real, calls = scrub.verify_blob, []

    def stopped_at_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise backup_common.Stopped("SIGTERM")
        return real(*args, **kwargs)

    monkeypatch.setattr(scrub, "verify_blob", stopped_at_the_fifth)
    with pytest.raises(backup_common.Stopped):
        scrub.scrub(store.path, full=True)
    kept = len(read_json(Path(store.path) / "scrub" / "state.json")["verified"])
    assert kept >= 3  # the blobs checked before the stop (the other worker's go on until it is seen)
    monkeypatch.setattr(scrub, "verify_blob", real)
    assert scrub.scrub(store.path, full=True).blobs_checked == 12 - kept


def test_check_mode_finds_and_moves_nothing(tmp_path):
    store, manifest = a_store(tmp_path, count=3)
    digest = manifest["layers"][0]["blobs"][0]["digest"]
    bad = flip_a_byte(store.blob_path(digest))
    report = scrub.scrub(store.path, full=True, check_mode=True)
    assert [(q["digest"], q["quarantined"]) for q in report.quarantined] == [(digest, False)]
    assert Path(store.blob_path(digest)).read_bytes() == bad
    assert not (Path(store.path) / "scrub" / "state.json").exists()
    assert not os.path.exists(store.quarantine_copy(digest) + ".json")


def verify_unit_command(store_dir, python, period_days=30):
    """argv of the verify timer's ExecStart, rendered from role backup's tasks/schedule.yml as the role renders it."""
    import shlex  # noqa: PLC0415

    import jinja2  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    role = ROOT / "ansible_collections/gpulab/lab/roles/backup"
    assert (
        "\nExecStart={{ __backup_verify_command }}\n"
        in (role / "templates/gpulab-backup-verify.service.j2").read_text()
    )
    tasks = yaml.safe_load((role / "tasks/schedule.yml").read_text())
    task = next(t for t in tasks if t["name"] == "Install the verify service and timer")
    text = jinja2.Template(task["vars"]["__backup_verify_command"]).render(
        backup_store_dir=str(store_dir), backup_verify_period_days=period_days
    )
    return [python if a == "/usr/bin/python3" else a for a in shlex.split(text)]


def test_the_verify_timers_command_fails_while_the_store_holds_damaged_backups(tmp_path):
    store, manifest = a_store(tmp_path, count=6)
    env, python = timer_lib(tmp_path)
    argv = verify_unit_command(store.path, python, period_days=1)
    ok = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["blobs_checked"] == 6  # a period of a day: the whole store is its share
    digest = manifest["layers"][4]["blobs"][0]["digest"]
    flip_a_byte(store.blob_path(digest))
    (Path(store.path) / "scrub" / "state.json").unlink()  # every blob due again
    bad = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert bad.returncode == 1  # the unit fails: systemctl status and the timer's list show it
    assert "Traceback" not in bad.stderr
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith(f"gpulab_backup: scrub of {store.path}: ")
    assert f"DAMAGED backups: kim {manifest['id']} lacks layer 5" in line
    assert "stores the content again from its source" in line
    again = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert again.returncode == 1  # still failing while the backup stays damaged, even with nothing new found
    assert json.loads(again.stdout)["quarantined"] == []


def test_module_backup_scrub(tmp_path):
    store, manifest = a_store(tmp_path, count=4)
    digest = manifest["layers"][1]["blobs"][0]["digest"]
    flip_a_byte(store.blob_path(digest))
    planned = run_module(backup_scrub, {"store": store.path}, check_mode=True)
    assert (planned["changed"], planned["check_mode"]) == (False, True)
    assert [q["digest"] for q in planned["quarantined"]] == [digest]
    assert os.path.exists(store.blob_path(digest))  # check mode moves nothing
    done = run_module(backup_scrub, {"store": store.path})
    assert done["changed"] is True
    assert [d["backup_id"] for d in done["damaged"]] == [manifest["id"]]
    assert [b["damaged"] for b in done["backups"]] == [True]
    assert "DAMAGED backups" in done["msg"]
    again = run_module(backup_scrub, {"store": store.path, "full": False})
    assert again["changed"] is False
    with pytest.raises(ModuleFail, match="not a backup store"):
        run_module(backup_scrub, {"store": str(tmp_path)})
