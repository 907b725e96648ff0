"""The store's copy on a remote (plugins/module_utils/backup/remote.py) with a real rclone: its local backend (a folder
standing for the NAS) and its crypt remote over it. Stores with hand-made blobs and manifests (the remote code reads
only names, sizes and stored checksums); the full cycle with real backups and an SFTP server is molecule's
backup-remote scenario.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ansible_collections.gpulab.lab.plugins.module_utils.backup import remote
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import FORMAT, FORMAT_VERSION, BackupError
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not shutil.which("rclone"), reason="rclone is not installed (apt-get install rclone)")


def blob_entry(store, stored):
    """A blob in the store: its stored bytes under the sha256 of a made-up content."""
    digest = "sha256:" + hashlib.sha256(b"content:" + stored).hexdigest()
    path = Path(store.blob_path(digest))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(stored)
    return {
        "digest": digest,
        "size": len(stored) + 8,
        "stored_digest": "sha256:" + hashlib.sha256(stored).hexdigest(),
        "stored_size": len(stored),
    }


def add_backup(store, container, backup_id, *contents):
    store.create()
    blobs = [blob_entry(store, c) for c in contents]
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "id": backup_id,
        "container": container,
        "created": int(backup_id[:8]),
        "layers": [{"diff_id": "sha256:" + "0" * 64, "size": 1, "blobs": blobs}],
        "mounts": [],
    }
    store.write_manifest(manifest)
    return manifest


def settings_for(tmp_path, server, remote_path, *, crypt=""):
    config = tmp_path / f"rclone-{server}.conf"
    text, target = remote.config_text("[nas]\ntype = local\n", f"nas:{remote_path}", crypt_password=crypt)
    config.write_text(text)
    config.chmod(0o600)
    store = tmp_path / f"store-{server}"
    return remote.Settings(target, str(config), server, str(store), keep_last=2, shown=f"nas:{remote_path}")


@pytest.fixture
def nas(tmp_path):
    folder = tmp_path / "nas"
    folder.mkdir()
    return folder


def files_on(folder):
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_upload_sends_blobs_then_manifests_and_a_second_upload_only_what_changed(tmp_path, nas):
    settings = settings_for(tmp_path, "gpu1", nas)
    store = Store(settings.store, create=True)
    first = add_backup(store, "notebook-a", "20260101T000000.000Z-aaaaaa", os.urandom(4096), os.urandom(2048))
    up = remote.upload(settings)
    assert (up.blobs, up.bytes, up.manifests, up.blobs_there) == (2, 6144, 1, 0)
    on_nas = files_on(nas)
    for blob in first["layers"][0]["blobs"]:
        assert on_nas[f"blobs/sha256/{blob['digest'][7:]}"] == blob["stored_size"]
    assert "servers/gpu1/backups/notebook-a/20260101T000000.000Z-aaaaaa.json" in on_nas
    assert not [p for p in on_nas if p.startswith("locks/")]  # the upload's lock is gone

    # A small change: one new blob beside an old one.
    old = first["layers"][0]["blobs"][0]
    add_backup(store, "notebook-a", "20260102T000000.000Z-bbbbbb", os.urandom(100))
    second = store.read_manifest("notebook-a", "20260102T000000.000Z-bbbbbb")
    second["layers"][0]["blobs"].append(old)
    store.write_manifest(second)
    up = remote.upload(settings)
    assert (up.blobs, up.bytes, up.blobs_there, up.manifests, up.manifests_there) == (1, 100, 2, 1, 1)
    again = remote.upload(settings)
    assert (again.blobs, again.manifests) == (0, 0)


def test_check_mode_says_what_would_be_uploaded_and_sends_nothing(tmp_path, nas):
    settings = settings_for(tmp_path, "gpu1", nas)
    add_backup(Store(settings.store, create=True), "nb", "20260101T000000.000Z-aaaaaa", b"x" * 10)
    plan = remote.upload(settings, check_mode=True)
    assert (plan.blobs, plan.bytes, plan.manifests) == (1, 10, 1)
    assert files_on(nas) == {}


def test_two_servers_sharing_the_remote_store_the_shared_layer_once_and_their_manifests_apart(tmp_path, nas):
    image_layer = os.urandom(8192)  # the lab's common image: the same blob on both servers
    one, two = settings_for(tmp_path, "gpu1", nas), settings_for(tmp_path, "gpu2", nas)
    add_backup(Store(one.store, create=True), "notebook-a", "20260101T000000.000Z-aaaaaa", image_layer, b"a" * 50)
    add_backup(Store(two.store, create=True), "notebook-a", "20260101T000001.000Z-bbbbbb", image_layer, b"b" * 60)
    assert remote.upload(one).blobs == 2
    second = remote.upload(two)
    assert (second.blobs, second.bytes, second.blobs_there) == (1, 60, 1)
    on_nas = files_on(nas)
    assert len([p for p in on_nas if p.startswith("blobs/")]) == 3
    assert sum(1 for size in on_nas.values() if size == 8192) == 1
    assert "servers/gpu1/backups/notebook-a/20260101T000000.000Z-aaaaaa.json" in on_nas
    assert "servers/gpu2/backups/notebook-a/20260101T000001.000Z-bbbbbb.json" in on_nas


def test_retention_keeps_the_last_backups_and_every_blob_another_server_needs(tmp_path, nas):
    shared = os.urandom(1000)
    one, two = settings_for(tmp_path, "gpu1", nas), settings_for(tmp_path, "gpu2", nas)
    store_one, store_two = Store(one.store, create=True), Store(two.store, create=True)
    add_backup(store_two, "nb", "20260101T000000.000Z-222222", shared)
    remote.upload(two)
    ids = [f"2026010{d}T000000.000Z-11111{d}" for d in range(1, 5)]
    for number, backup_id in enumerate(ids):
        add_backup(store_one, "nb", backup_id, shared, bytes([number]) * (100 + number))
    remote.upload(one)
    pruned = remote.prune(one)  # keep_last=2
    assert sorted(pruned.manifests) == [f"nb/{ids[0]}", f"nb/{ids[1]}"]
    assert (pruned.blobs, pruned.bytes) == (2, 100 + 101)
    on_nas = files_on(nas)
    assert sorted(p.rsplit("/", 1)[1] for p in on_nas if p.startswith("servers/gpu1/")) == [
        f"{i}.json" for i in ids[2:]
    ]
    assert "servers/gpu2/backups/nb/20260101T000000.000Z-222222.json" in on_nas
    assert f"blobs/sha256/{hashlib.sha256(b'content:' + shared).hexdigest()}" in on_nas  # both servers need it
    assert len([p for p in on_nas if p.startswith("blobs/")]) == 3
    assert remote.prune(one) == remote.Pruned([], 0, 0, [])


def test_retention_removes_no_blob_while_another_servers_upload_runs(tmp_path, nas):
    one = settings_for(tmp_path, "gpu1", nas)
    add_backup(Store(one.store, create=True), "nb", "20260101T000000.000Z-aaaaaa", b"orphan" * 10)
    remote.upload(one)
    (nas / "servers/gpu1/backups/nb/20260101T000000.000Z-aaaaaa.json").unlink()  # its blob is now no one's
    lock = nas / "locks" / f"upload-gpu2-{int(time.time())}-0a0b0c0d"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text("{}")
    pruned = remote.prune(one)
    assert pruned.blobs == 0 and "an upload by gpu2 runs" in pruned.warnings[0]
    assert len(list((nas / "blobs/sha256").iterdir())) == 1
    lock.unlink()
    assert remote.prune(one).blobs == 1


def test_an_upload_killed_halfway_is_completed_by_the_next(tmp_path, nas):
    settings = settings_for(tmp_path, "gpu1", nas)
    store = Store(settings.store, create=True)
    add_backup(store, "nb", "20260101T000000.000Z-aaaaaa", *(os.urandom(512 * 1024) for _ in range(120)))
    settings_file = tmp_path / "remote.json"
    settings_file.write_text(json.dumps(settings._asdict()))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "ansible_collections.gpulab.lab.plugins.module_utils.backup.remote", "upload"]
    proc = subprocess.Popen([*command, "--settings", str(settings_file)], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((nas / "blobs" / "sha256").glob("*")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the upload and its rclone
    proc.wait()
    on_nas = files_on(nas)
    blobs_there = [p for p in on_nas if p.startswith("blobs/")]
    assert 0 < len(blobs_there) < 120, len(blobs_there)
    assert not [p for p in on_nas if p.startswith("servers/")]  # no manifest before its blobs
    assert [p for p in on_nas if p.startswith("locks/upload-gpu1-")]  # the killed run's lock
    done = subprocess.run(
        [*command, "--settings", str(settings_file)], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "manifest(s) uploaded" in done.stdout
    on_nas = files_on(nas)
    assert len([p for p in on_nas if p.startswith("blobs/")]) == 120
    assert all(size == 512 * 1024 for p, size in on_nas.items() if p.startswith("blobs/"))
    assert "servers/gpu1/backups/nb/20260101T000000.000Z-aaaaaa.json" in on_nas
    assert not [p for p in on_nas if p.startswith("locks/")]


def test_a_failed_upload_is_an_error_that_says_the_copy_is_incomplete(tmp_path):
    settings = settings_for(tmp_path, "gpu1", "/proc/no-such-nas")
    add_backup(Store(settings.store, create=True), "nb", "20260101T000000.000Z-aaaaaa", b"x")
    with pytest.raises(BackupError, match="rclone"):
        remote.upload(settings)
    assert Store(settings.store).backup_ids("nb") == ["20260101T000000.000Z-aaaaaa"]  # the local backup stays


def test_fetch_brings_the_newest_manifest_and_only_the_blobs_the_store_lacks(tmp_path, nas):
    settings = settings_for(tmp_path, "gpu1", nas)
    store = Store(settings.store, create=True)
    add_backup(store, "nb", "20260101T000000.000Z-aaaaaa", b"old" * 100)
    newest = add_backup(store, "nb", "20260102T000000.000Z-bbbbbb", b"one" * 100, b"two" * 200)
    remote.upload(settings)
    shutil.rmtree(settings.store)  # the reinstall
    fetched = remote.fetch(settings).fetched
    assert fetched == [remote.Fetched("nb", "20260102T000000.000Z-bbbbbb", 2, 900, 0, True, [])]
    store = Store(settings.store)
    assert store.backup_ids("nb") == ["20260102T000000.000Z-bbbbbb"]
    assert store.read_manifest("nb", newest["id"]) == newest
    assert not store.missing_blobs(newest)
    assert os.listdir(store.tmp) == []
    again = remote.fetch(settings).fetched[0]
    assert again[2:5] == (0, 0, 2) and not again.new  # it has them now
    older = remote.fetch(settings, ["nb"], "20260101T000000.000Z-aaaaaa").fetched
    assert older[0].blobs == 1
    with pytest.raises(BackupError, match="has no backup 2025"):
        remote.fetch(settings, ["nb"], "20250101T000000.000Z-cccccc")
    # A notebook with no backup anywhere (a new student) is left to the restore, named; asked for by id, refused.
    assert remote.fetch(settings, ["nb", "new-student"]) == remote.FetchResult([again], ["new-student"])
    with pytest.raises(BackupError, match="holds no backup of new-student"):
        remote.fetch(settings, ["new-student"], "20260101T000000.000Z-aaaaaa")


def test_a_remote_without_this_servers_backups_fetches_nothing_and_fails_nothing(tmp_path, nas):
    settings = settings_for(tmp_path, "gpu1", nas)
    assert remote.fetch(settings, ["notebook-a"]) == remote.FetchResult([], ["notebook-a"])
    assert remote.fetch(settings) == remote.FetchResult([], [])
    assert not Path(settings.store, "backups").exists()


def test_a_blob_damaged_on_the_remote_is_refused_by_its_name_and_the_scrub_has_it_sent_again(tmp_path, nas):
    settings = settings_for(tmp_path, "gpu1", nas)
    manifest = add_backup(Store(settings.store, create=True), "nb", "20260101T000000.000Z-aaaaaa", b"good" * 50)
    digest = manifest["layers"][0]["blobs"][0]["digest"]
    remote.upload(settings)
    target = nas / "blobs/sha256" / digest[7:]
    target.write_bytes(b"bad!" * 50)  # the same size: only a checksum tells
    reinstalled = settings._replace(store=str(tmp_path / "reinstalled"))
    with pytest.raises(BackupError, match=f"blob {digest} is damaged on nas:"):
        remote.fetch(reinstalled)
    store = Store(reinstalled.store)
    assert store.backup_ids("nb") == [] and os.listdir(store.blobs) == [] and os.listdir(store.tmp) == []
    assert remote.upload(settings).blobs == 0  # the same size: an upload cannot tell
    scrubbed = remote.scrub(settings)
    assert scrubbed.blobs == 1 and len(scrubbed.problems) == 2
    assert f"blob {digest} is damaged (its checksum differs) on nas:" in scrubbed.problems[0]
    assert "gpu1/nb/20260101T000000.000Z-aaaaaa" in scrubbed.problems[0]
    assert "moved to quarantine/sha256/" in scrubbed.problems[1]
    assert not target.exists() and (nas / "quarantine/sha256" / digest[7:]).read_bytes() == b"bad!" * 50
    assert f"blob {digest} is missing on nas:" in remote.scrub(settings, check_mode=True).problems[0]
    assert remote.upload(settings).blobs == 1  # the server that has it sends it again
    assert remote.scrub(settings).problems == []
    assert remote.fetch(reinstalled).fetched[0].blobs == 1


def test_the_scrub_of_a_sound_remote_finds_nothing(tmp_path, nas):
    settings = settings_for(tmp_path, "gpu1", nas)
    add_backup(Store(settings.store, create=True), "nb", "20260101T000000.000Z-aaaaaa", b"1" * 10, b"2" * 20)
    remote.upload(settings)
    (nas / "blobs/sha256" / ("f" * 64)).write_bytes(b"stray")
    scrubbed = remote.scrub(settings)
    assert (scrubbed.blobs, scrubbed.bytes, scrubbed.problems, scrubbed.unreferenced) == (2, 30, [], 1)


def test_with_crypt_the_remote_holds_no_readable_name_or_content_and_the_fetch_works(tmp_path, nas):
    settings = settings_for(tmp_path, "gpu1", nas, crypt="the lab's long crypt password")
    content = b"a student's notes, readable " * 40
    manifest = add_backup(Store(settings.store, create=True), "notebook-alice", "20260101T000000.000Z-aaaaaa", content)
    remote.upload(settings)
    for path in nas.rglob("*"):
        assert "notebook-alice" not in str(path) and "sha256" not in str(path) and "servers" not in str(path)
        if path.is_file():
            data = path.read_bytes()
            assert b"readable" not in data and b"notebook-alice" not in data and b"gpulab-backup" not in data
    shutil.rmtree(settings.store)
    assert remote.fetch(settings).fetched[0].blobs == 1
    assert not Store(settings.store).missing_blobs(manifest)
    assert remote.scrub(settings).problems == []
    # A wrong key reads nothing: every name is someone else's ciphertext.
    wrong = settings_for(tmp_path, "gpu1-wrong-key", nas, crypt="another password")
    assert remote.remote_containers(wrong._replace(server="gpu1")) == []


def test_the_crypt_section_is_kept_while_the_key_is_the_same_and_rewritten_when_it_changes():
    calls = []
    key, other = secrets.token_hex(8), secrets.token_hex(8)

    def obscure(secret):
        calls.append(secret)
        return f"obscured-{len(calls)}"

    text, target = remote.config_text("[nas]\ntype = sftp\n", "nas:gpulab", crypt_password=key, obscure=obscure)
    assert target == "gpulab-crypt:" and "remote = nas:gpulab" in text and "password = obscured-1" in text
    again, _ = remote.config_text("[nas]\ntype = sftp\n", "nas:gpulab", crypt_password=key, current=text)
    assert again == text and len(calls) == 1
    changed, _ = remote.config_text(
        "[nas]\ntype = sftp\n", "nas:gpulab", crypt_password=other, crypt_salt="s", current=text, obscure=obscure
    )
    assert (
        "password = obscured-2" in changed
        and "password2 = obscured-3" in changed
        and key not in changed
        and other not in changed
    )
    plain, target = remote.config_text("[nas]\ntype = sftp\n", "nas:gpulab")
    assert target == "nas:gpulab" and "crypt" not in plain
    with pytest.raises(BackupError, match="must not have a section"):
        remote.config_text("[gpulab-crypt]\ntype = local\n", "nas:x")


def test_the_configuration_is_written_root_only_and_only_when_it_changes(tmp_path):
    path = tmp_path / "etc" / "rclone.conf"
    assert remote.write_config(str(path), "[nas]\n", check_mode=True) and not path.exists()
    assert remote.write_config(str(path), "[nas]\n")
    assert path.stat().st_mode & 0o777 == 0o600
    assert not remote.write_config(str(path), "[nas]\n")


def test_a_blob_quarantined_in_the_store_is_fetched_again_from_the_remote_and_leaves_quarantine(tmp_path, nas):
    settings = settings_for(tmp_path, "gpu1", nas)
    store = Store(settings.store, create=True)
    manifest = add_backup(store, "nb", "20260101T000000.000Z-aaaaaa", b"fine" * 64, b"also" * 64)
    remote.upload(settings)
    bad = manifest["layers"][0]["blobs"][0]["digest"]
    store.quarantine(bad, "its content has another checksum", "scrub")
    assert store.missing_blobs(manifest)
    fetched = remote.fetch(settings).fetched
    assert fetched[0][2:4] == (1, 256)
    assert any(bad in notice for notice in fetched[0].notices)
    assert store.missing_blobs(manifest) == [] and store.quarantined() == {}
    assert remote.upload(settings).blobs == 0  # nothing new for the remote


def test_an_unreadable_manifest_on_the_remote_is_named_by_the_scrub_and_stops_retention_removing_blobs(tmp_path, nas):
    settings = settings_for(tmp_path, "gpu1", nas)
    add_backup(Store(settings.store, create=True), "nb", "20260101T000000.000Z-aaaaaa", b"k" * 10)
    remote.upload(settings)
    (nas / "blobs/sha256" / ("e" * 64)).write_bytes(b"nobody's")
    broken = nas / "servers/gpu2/backups/nb/20260101T000000.000Z-bbbbbb.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"format": "gpulab-backup", "layers": [')  # cut short
    scrubbed = remote.scrub(settings)
    assert (
        len(scrubbed.problems) == 1
        and "servers/gpu2/backups/nb/20260101T000000.000Z-bbbbbb.json" in (scrubbed.problems[0])
    )
    pruned = remote.prune(settings)
    assert pruned.blobs == 0 and "no blob was removed" in pruned.warnings[0]
    assert (nas / "blobs/sha256" / ("e" * 64)).exists()
