"""Tests of library/container_backup.py against this machine's real Docker engine (skipped without one).

Containers of a tiny two-layer image built here (tests/unit/backup_harness.py), changed with docker exec, backed up
into stores under tmp_path: what a second backup writes, check mode, bad input, retention, flattening, a backup killed
with SIGKILL while it writes a blob, the docker-archive format loaded with `docker load`, and the command line the
systemd timer runs.
"""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from backup_harness import (
    ROOT,
    build_tiny_image,
    engine_events,
    inspect,
    module_argv,
    needs_docker,
    remove_container,
    remove_images_of,
    run_container,
    run_module,
    sh,
    wait_for,
    write_args,
)
from module_harness import ModuleFail

from ansible_collections.gpulab.lab.plugins.module_utils.backup import backup as backup_job
from ansible_collections.gpulab.lab.plugins.module_utils.backup import cli as backup_cli
from ansible_collections.gpulab.lab.plugins.module_utils.backup import store as backup_store
from ansible_collections.gpulab.lab.plugins.modules import container_backup, container_restore

pytestmark = [needs_docker, pytest.mark.usefixtures("capture_exit")]


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    name, image_id = build_tiny_image(tmp_path_factory.mktemp("image"))
    yield {"name": name, "id": image_id, "layers": inspect(name, "image")["RootFS"]["Layers"]}
    subprocess.run(["docker", "rmi", "-f", name], capture_output=True, check=False)


@pytest.fixture
def container(tiny, tmp_path):
    """A running container of the tiny image with a bind-mounted work directory; removed afterwards."""
    name = f"gpulab-unittest-backup-{uuid.uuid4().hex[:8]}"
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("my notes\n")
    run_container(name, tiny["name"], "-v", f"{work}:/work")
    sh("docker", "exec", name, "sh", "-c", "echo installed > /root/package.txt")
    yield {"name": name, "work": work}
    remove_container(name)
    remove_images_of(name)


def backup(container, store, **options):
    return run_module(container_backup, {"container": container["name"], "store": str(store), **options})


def restore(container, store, **options):
    return run_module(container_restore, {"container": container["name"], "store": str(store), **options})


PATHS = {"commit-save": {"fast_path": False}, "overlay-upperdir": {}}


@pytest.mark.parametrize("path", PATHS)
def test_second_backup_after_a_small_change_writes_only_the_new_layer(container, tiny, tmp_path, path):
    store = tmp_path / "store"
    first = backup(container, store, **PATHS[path])
    assert first["changed"] is True
    assert first["path_taken"] == path
    if path == "overlay-upperdir":  # this engine: overlay2, and the module runs as root
        assert first["path_reason"] is None
        assert first["base_image_stored"] is True  # the image's layers went into the store first
        assert first["chunks_new"] >= 1
        assert first["paused_seconds"] > 0
    else:
        assert first["path_reason"] == "fast_path is off"
    assert first["layer_count"] == 3  # the image's two, and the commit's (or the writable layer)
    assert (first["layers_new"], first["layers_reused"]) == (3, 0)
    size1 = backup_store.Store(str(store)).disk_usage()
    assert first["store_bytes"] == size1
    assert abs(first["bytes_written"] - size1) < 64 * 1024  # what it says it wrote is on disk
    assert first["bytes_read"] >= sum(x["size"] for x in read_json(first["manifest"])["layers"])
    assert inspect(first["image_id"], "image") is None  # the commit is not left in the engine
    assert first["mounts"][0]["source"] == str(container["work"])

    # A small change: 200 kB in the container; the work directory is untouched.
    sh("docker", "exec", container["name"], "sh", "-c", "head -c 200000 /opt/data.txt > /root/change.txt")
    second = backup(container, store, **PATHS[path])
    assert second["path_taken"] == path
    # commit + save: the commit's layer anew; the fast path: a layer of what changed since its first backup's layer
    assert (second["layers_new"], second["layers_reused"]) == ((1, 2) if path == "commit-save" else (1, 3))
    manifest = read_json(second["manifest"])
    before = {b["digest"] for layer in read_json(first["manifest"])["layers"] for b in layer["blobs"]}
    new_blobs = [b for b in manifest["layers"][-1]["blobs"] if b["digest"] not in before]
    assert [x["diff_id"] for x in manifest["layers"][:2]] == tiny["layers"]
    assert second["mounts"][0]["reused"] is True  # unchanged work directory: not archived again
    size2 = backup_store.Store(str(store)).disk_usage()
    growth = size2 - size1
    manifest_size = os.path.getsize(second["manifest"])
    # The fast path's stat cache: a line of what changed, for the next backup's metadata walk.
    cache = store / "index" / f"{container['name']}.jsonl"
    cache_line = len(cache.read_bytes().splitlines(keepends=True)[-1]) if path != "commit-save" else 0
    # It wrote the new layer's blobs, the manifest (and that line), nothing else; the store grew by that (block
    # rounding aside).
    assert new_blobs
    assert second["bytes_written"] == sum(b["stored_size"] for b in new_blobs) + manifest_size + cache_line
    assert abs(growth - second["bytes_written"]) < (2 + len(new_blobs)) * 4096
    assert second["bytes_written"] < first["bytes_written"] / 20
    top_size = manifest["layers"][-1]["size"]
    if path == "commit-save":
        assert second["bytes_read"] > top_size  # the whole save stream was read through
    else:
        assert second["bytes_read"] == top_size  # only the writable layer was read
        assert second["base_image_stored"] is False
        assert backup_store.Store(str(store)).missing_blobs(manifest) == []


@pytest.mark.parametrize("path", PATHS)
def test_check_mode_changes_nothing(container, tmp_path, path):
    store = tmp_path / "store"
    before = inspect(container["name"])
    dangling = sh("docker", "images", "-q", "--filter", "dangling=true").split()
    since = time.time()
    result = run_module(
        container_backup, {"container": container["name"], "store": str(store), **PATHS[path]}, check_mode=True
    )
    until = time.time()
    assert result["changed"] is True
    assert result["check_mode"] is True
    assert result["backup_id"] is None
    assert result["layers_new"] == 3
    assert result["path_taken"] == path
    if path == "commit-save":
        assert "would commit and save container" in result["msg"]
    else:
        assert "would read the writable layer (overlay2 upper directory) of container" in result["msg"]
        assert "after storing its image's layers" in result["msg"]
        assert result["base_image_stored"] is True  # would be
    assert not store.exists()  # not even created
    time.sleep(1.1)  # docker events rounds --until down to the second
    assert engine_events(since, until, container["name"], "pause", "commit") == []  # not paused, not committed
    after = inspect(container["name"])
    assert after["State"] == before["State"]
    assert sh("docker", "images", "-q", "--filter", "dangling=true").split() == dangling  # no commit was made

    # With a store that has a backup: it says which layers it has and what retention would remove.
    backup(container, store, keep_last=1)
    files = sorted(str(p) for p in store.rglob("*"))
    again = run_module(
        container_backup, {"container": container["name"], "store": str(store), "keep_last": 1}, check_mode=True
    )
    assert again["layers_reused"] == 2
    assert again["layers_new"] == 1  # only the writable layer
    assert len(again["removed_backups"]) == 1
    if path == "overlay-upperdir":
        assert again["base_image_stored"] is False
        assert "after storing its image's layers" not in again["msg"]
    assert sorted(str(p) for p in store.rglob("*")) == files


def test_bad_input(container, tmp_path):
    with pytest.raises(ModuleFail, match="no container named gpulab-unittest-nope on the Docker engine"):
        run_module(container_backup, {"container": "gpulab-unittest-nope", "store": str(tmp_path / "s")})
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ModuleFail, match=f"the backup store {afile} exists and is not a directory"):
        backup(container, afile)
    with pytest.raises(ModuleFail, match="keep_last must be at least 1"):
        backup(container, tmp_path / "s", keep_last=0)
    with pytest.raises(ModuleFail, match="missing: archive_path"):
        run_module(container_backup, {"container": container["name"], "format": "docker-archive"})
    with pytest.raises(ModuleFail, match=r"container name '\.\./x' is not valid"):
        run_module(container_backup, {"container": "../x", "store": str(tmp_path / "s")})
    with pytest.raises(ModuleFail, match="flatten_threshold must be between"):
        backup(container, tmp_path / "s", flatten_threshold=500)
    assert not (tmp_path / "s").exists()


def test_retention_keeps_the_newest_complete_backup(container, tmp_path):
    store = tmp_path / "store"
    ids = []
    for i in range(3):
        sh("docker", "exec", container["name"], "sh", "-c", f"echo {i} > /root/round.txt")
        ids.append(backup(container, store, keep_last=2)["backup_id"])
    s = backup_store.Store(str(store))

    def kept():
        return [m["id"] for m in s.backups_of(container["name"])]

    assert kept() == ids[1:]
    # Every blob left is referenced, and every kept backup is complete.
    referenced = {
        b["digest"] for i in ids[1:] for b, _ in backup_store.manifest_blobs(s.read_manifest(container["name"], i))
    }
    assert {"sha256:" + n for n in os.listdir(s.blobs)} == referenced
    # The newest backup loses a blob: a restore refuses it by its id and names the complete one before, which it
    # takes only when asked for by its id (never an older backup on its own).
    newest = s.read_manifest(container["name"], ids[2])
    os.unlink(s.blob_path(newest["layers"][-1]["blobs"][-1]["digest"]))
    refused = (
        rf"the newest backup of container {container['name']}, {ids[2]}, cannot be restored.*newest first: {ids[1]}"
    )
    with pytest.raises(ModuleFail, match=refused):
        restore(container, store, verify_only=True)
    checked = restore(container, store, verify_only=True, backup=ids[1])
    assert checked["backup_id"] == ids[1]
    # keep_last 1: the new backup is now the newest complete one; both older ones go, and their blobs.
    latest = backup(container, store, keep_last=1)
    assert latest["removed_backups"] == ids[1:]
    assert kept() == [latest["backup_id"]]
    assert s.pick(container["name"]) == (s.read_manifest(container["name"], latest["backup_id"]), [])
    referenced = {
        b["digest"] for b, _ in backup_store.manifest_blobs(s.read_manifest(container["name"], latest["backup_id"]))
    }
    assert {"sha256:" + n for n in os.listdir(s.blobs)} == referenced


@pytest.mark.parametrize("path", PATHS)
def test_a_backup_killed_while_writing_leaves_the_store_consistent(container, tmp_path, path):
    store = tmp_path / "store"
    earlier = backup(container, store, **PATHS[path])
    # About 40 MB of compressible text in the container, stored at zstd level 19: seconds of writing to kill into.
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for i in range(400_000):
            f.write(f"line {i} {uuid.uuid4()} of a file a student wrote\n")
    sh("docker", "cp", big, f"{container['name']}:/root/big.txt")
    progress = tmp_path / "progress.json"
    args = write_args(
        tmp_path / "args.json",
        {
            "container": container["name"],
            "store": str(store),
            "compression_level": 19,
            "include_workdir": False,
            "progress_file": str(progress),
            **PATHS[path],
        },
    )
    proc = subprocess.Popen(module_argv("container_backup", args), start_new_session=True, stdout=subprocess.PIPE)
    tmp = store / "tmp"
    # The commit-save path writes a blob per layer; the fast path writes chunks, then zstd compresses them.
    pattern = "blob-*.tmp" if path == "commit-save" else "chunk-*.tmp.zst"

    def writing():
        return [p for p in tmp.glob(pattern) if p.exists() and p.stat().st_size > 0] if tmp.exists() else []

    try:
        assert wait_for(writing, timeout=120), "the backup never started writing a blob"
        report = wait_for(lambda: "bytes_read" in read_json(progress) and read_json(progress), timeout=10)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert inspect(container["name"])["State"]["Paused"] is False  # the fast path thaws it before compressing
    assert writing()  # it died with a temporary file in the store
    # what an async caller reads meanwhile
    assert report["phase"] == ("save" if path == "commit-save" else "compressing the new chunks")
    assert report["bytes_read"] > 0
    assert {"seconds", "bytes_written"} <= set(report)

    s = backup_store.Store(str(store))
    assert s.backup_ids(container["name"]) == [earlier["backup_id"]]  # no manifest, so no backup
    assert backup_cli.list_store(str(store))["backups"][0]["complete"] is True
    # Every earlier backup restorable: verified in full, and restored.
    checked = restore(container, store, verify_only=True)
    assert checked["verified"] == "full"
    restored = restore(container, store, backup=earlier["backup_id"], force=True)
    assert restored["replaced_container"] is True
    assert sh("docker", "exec", container["name"], "cat", "/root/package.txt") == "installed"
    # The next backup cleans up after the killed one.
    after = backup(container, store, include_workdir=False, **PATHS[path])
    assert any("temporary file" in w for w in after["notices"])
    assert os.listdir(tmp) == []
    assert [m["id"] for m in s.backups_of(container["name"])] == [earlier["backup_id"], after["backup_id"]]


def test_a_container_left_paused_by_a_killed_backup_is_thawed_and_one_its_user_paused_is_not(container, tmp_path):
    store = tmp_path / "store"
    backup(container, store)  # the store exists, with the image's layers
    container_id = inspect(container["name"])["Id"]
    # The user paused it: the backup reads it as it is and leaves it paused.
    sh("docker", "pause", container["name"])
    kept = backup(container, store)
    assert kept["path_taken"] == "overlay-upperdir"
    assert kept["paused_seconds"] == 0.0
    assert inspect(container["name"])["State"]["Paused"] is True
    assert not any("unpaused" in n for n in kept["notices"])
    # A backup killed (SIGKILL) while it held the container frozen leaves its marker in tmp/ and the container paused:
    # that state is made here, as the moment of a kill cannot be hit reliably.
    (store / "tmp" / f"paused-{container_id}").write_bytes(b"")
    thawed = backup(container, store)
    assert inspect(container["name"])["State"]["Paused"] is False
    assert any("left paused by a backup that was killed" in n for n in thawed["notices"])
    assert thawed["paused_seconds"] > 0  # then it was backed up as usual, paused while read
    assert os.listdir(store / "tmp") == []


def test_a_backup_thaws_another_container_a_killed_backup_left_paused(container, tiny, tmp_path):
    """The marker of another container (the timer's killed backup of bob) is not just cleaned away by the next backup
    of alice: bob is thawed first."""
    store = tmp_path / "store"
    backup(container, store)
    other = f"gpulab-unittest-backup-{uuid.uuid4().hex[:8]}"
    run_container(other, tiny["name"])
    try:
        sh("docker", "pause", other)
        (store / "tmp" / f"paused-{inspect(other)['Id']}").write_bytes(b"")
        result = backup(container, store)
        assert inspect(other)["State"]["Paused"] is False
        assert any(f"{other} was left paused by a backup that was killed" in n for n in result["notices"])
        assert os.listdir(store / "tmp") == []
    finally:
        remove_container(other)


def test_a_second_backup_waits_for_the_store_lock(container, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    progress = tmp_path / "progress.json"
    args = write_args(tmp_path / "args.json", {"container": container["name"], "store": str(store),
                                               "progress_file": str(progress)})  # fmt: skip
    with open(store / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another backup holds the store
        proc = subprocess.Popen(module_argv("container_backup", args), stdout=subprocess.PIPE, text=True)
        try:
            waiting = wait_for(lambda: progress.exists() and "waiting" in read_json(progress)["phase"], timeout=30)
            assert waiting, "the backup did not say it waits for the lock"
            time.sleep(1)
            assert proc.poll() is None
            assert not (store / "backups").exists() or not any((store / "backups").iterdir())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert json.loads(out[out.index("{") :])["layers_new"] == 3


def test_flatten_when_the_image_nears_the_layer_limit(container, tmp_path):
    store = tmp_path / "store"
    result = backup(container, store, flatten_threshold=3)
    assert result["flattened"] is True
    assert result["path_taken"] == "export-flatten"
    assert result["layer_count"] == 1
    assert any("flattens it into one layer" in w for w in result["notices"])
    assert inspect(container["name"])["State"]["Running"] is True  # unpaused after the export
    restored = restore(container, store, force=True)
    image = inspect(restored["image"], "image")
    assert len(image["RootFS"]["Layers"]) == 1
    assert sh("docker", "exec", container["name"], "cat", "/root/package.txt") == "installed"
    assert image["Config"]["Cmd"] == ["/bin/sleep", "infinity"]


def test_backup_restore_cycles_add_one_layer_each_until_the_guard_flattens(container, tmp_path):
    """Each backup/restore cycle through the fast path adds exactly one layer (the writable one on top of the restored
    image's); at flatten_threshold the backup flattens instead, and the cycles go on from one layer."""
    store = tmp_path / "store"
    counts, paths = [], []
    for cycle in range(5):
        sh("docker", "exec", container["name"], "sh", "-c", f"echo {cycle} > /root/cycle-{cycle}.txt")
        result = backup(container, store, flatten_threshold=5, include_workdir=False)
        counts.append(result["layer_count"])
        paths.append(result["path_taken"])
        config = json.loads(read_json(result["manifest"])["image"]["config"])
        history = [h for h in config["history"] if not h.get("empty_layer")]
        assert len(history) == len(config["rootfs"]["diff_ids"]) == result["layer_count"]  # what docker history reads
        restored = restore(container, store, force=True, restore_workdir=False)
        assert len(inspect(restored["image"], "image")["RootFS"]["Layers"]) == result["layer_count"]
        files = sh("docker", "exec", container["name"], "sh", "-c", "cat /root/cycle-*.txt")
        assert files.split() == [str(i) for i in range(cycle + 1)]  # every cycle's change is still there
    # tiny image: 2 layers; +1 per cycle; the image of the third cycle's container has 4, so its backup would have 5:
    # flattened to 1; then +1 again.
    assert counts == [3, 4, 1, 2, 3]
    assert paths == ["overlay-upperdir", "overlay-upperdir", "export-flatten", "overlay-upperdir", "overlay-upperdir"]


def test_docker_archive_loads_with_docker_load(container, tmp_path):
    path = tmp_path / "alice.tar"
    result = run_module(
        container_backup, {"container": container["name"], "format": "docker-archive", "archive_path": str(path)}
    )
    assert result["bytes_written"] == path.stat().st_size
    assert result["layer_count"] == 3
    assert not list(tmp_path.glob(".alice.tar.*"))  # no temporary file left
    assert inspect(result["image"], "image") is None  # the tagged commit is not left in the engine
    try:
        out = sh("docker", "load", "-i", path)
        assert result["image"] in out
        assert inspect(result["image"], "image")["Id"] == result["image_id"]
        check = sh(
            "docker", "run", "--rm", "--label", "io.gpulab.harness=1", result["image"], "cat", "/root/package.txt"
        )
        assert check == "installed"
    finally:
        subprocess.run(["docker", "rmi", "-f", result["image"]], capture_output=True, check=False)
    members = sh("tar", "-tf", path).splitlines()
    assert "gpulab-backup/backup.json" in members
    assert "gpulab-backup/mounts/0.tar" in members


def test_docker_archive_of_a_flattened_image(container, tmp_path):
    path = tmp_path / "flat.tar"
    result = run_module(
        container_backup,
        {"container": container["name"], "format": "docker-archive", "archive_path": str(path), "flatten_threshold": 2},
    )
    assert result["flattened"] is True
    assert result["layer_count"] == 1
    try:
        sh("docker", "load", "-i", path)
        assert len(inspect(result["image"], "image")["RootFS"]["Layers"]) == 1
        check = sh(
            "docker", "run", "--rm", "--label", "io.gpulab.harness=1", result["image"], "cat", "/root/package.txt"
        )
        assert check == "installed"
    finally:
        subprocess.run(["docker", "rmi", "-f", result["image"]], capture_output=True, check=False)


def test_skipped_mounts_and_secrets(tiny, tmp_path):
    name = f"gpulab-unittest-backup-{uuid.uuid4().hex[:8]}"
    run_container(
        name,
        tiny["name"],
        "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", f"{name}-vol:/data",
        "-e", "NOTEBOOK_TOKEN=s3cret",
        "-e", "VISIBLE=yes",
    )  # fmt: skip
    try:
        result = backup({"name": name}, tmp_path / "store")
        why = {m["destination"]: m["why"] for m in result["skipped_mounts"]}
        assert "a system path" in why["/var/run/docker.sock"]
        assert why["/data"].startswith("a volume mount")
        assert result["mounts"] == []
        assert result["secret_env_left_out"] == ["NOTEBOOK_TOKEN"]
        text = Path(result["manifest"]).read_text()
        assert "s3cret" not in text
        assert "VISIBLE=yes" in text
        assert "s3cret" not in json.dumps(result)
    finally:
        remove_container(name)
        subprocess.run(["docker", "volume", "rm", f"{name}-vol"], capture_output=True, check=False)
        remove_images_of(name)


def test_the_command_line_of_the_systemd_timer(container, tmp_path):
    """The backup package run on its own by python3, without Ansible, from a copy of the files role backup installs
    on the server (module_utils/docker_api.py, files.py and backup/*.py, nothing else)."""
    store = tmp_path / "store"
    lib = tmp_path / "lib"
    utils = ROOT / "ansible_collections" / "gpulab" / "lab" / "plugins" / "module_utils"
    for source in [utils / "docker_api.py", utils / "files.py", *sorted((utils / "backup").glob("*.py"))]:
        target = lib / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(lib)}
    # The server's own python3 (Debian's, without Ansible) when there is one, as the timer runs it.
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    argv = [python, "-m", "ansible_collections.gpulab.lab.plugins.module_utils.backup.cli"]
    progress = tmp_path / "progress.json"
    started = time.monotonic()
    proc = subprocess.run(
        [*argv, "backup", "--store", store, "--container", container["name"], "--keep-last", "2",
         "--progress-file", progress],
        capture_output=True, text=True, env=env, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["layers_new"] == 3
    assert result["seconds"] <= time.monotonic() - started
    assert not progress.exists()  # removed at the end
    listing = json.loads(
        subprocess.run([*argv, "list", "--store", store], capture_output=True, text=True, env=env, check=True).stdout
    )
    assert [b["backup_id"] for b in listing["backups"]] == [result["backup_id"]]
    checked = subprocess.run(
        [*argv, "restore", "--store", store, "--container", container["name"], "--verify-only"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert json.loads(checked.stdout)["verified"] == "full"
    bad = subprocess.run(
        [*argv, "backup", "--store", store, "--container", "gpulab-unittest-nope"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "backup of gpulab-unittest-nope failed: no container named gpulab-unittest-nope" in bad.stderr


def test_why_the_fast_path_is_not_taken(container, tmp_path):
    """Each reason the backup falls back to commit + save, on the container's real inspect data changed one way."""
    job = backup_job.BackupJob(container=container["name"], store=str(tmp_path / "store"))
    job.inspect()
    assert job.path_taken == "overlay-upperdir" and job.path_reason is None
    real = job.info

    def reason(**graph_driver):
        job.info = {**real, "GraphDriver": {**real["GraphDriver"], **graph_driver}}
        upper, config, why = job._fast_path_check()
        assert upper is None and config is None
        return why

    assert "storage driver is overlayfs, not overlay2" in reason(Name="overlayfs")  # containerd image store
    assert "storage driver is vfs, not overlay2" in reason(Name="vfs")
    assert "does not report the container's UpperDir" in reason(Data={})
    assert "is not on this machine" in reason(Data={"UpperDir": str(tmp_path / "elsewhere")})
    job.info = {**real, "Image": "sha256:" + "0" * 64}
    assert "config of the container's image cannot be read" in job._fast_path_check()[2]
    job.info = real
    job.fast_path = False
    assert job._fast_path_check()[2] == "fast_path is off"
    archive = backup_job.BackupJob(
        container=container["name"], format="docker-archive", archive_path=str(tmp_path / "a.tar")
    )
    archive.inspect()
    assert archive.path_taken == "commit-save" and "docker-archive" in archive.path_reason


def test_an_upper_dir_a_layer_cannot_represent_falls_back_to_commit_save(container, tmp_path):
    """overlay's metacopy (file data left in a lower layer) cannot be written as a layer from the upper directory: the
    backup says so and takes the commit + save path, and the backup restores."""
    upper = Path(inspect(container["name"])["GraphDriver"]["Data"]["UpperDir"])
    marked = upper / "root" / "package.txt"
    try:
        os.setxattr(marked, "trusted.overlay.metacopy", b"")
    except OSError as e:
        pytest.skip(f"this filesystem refuses trusted.* xattrs: {e}")
    result = backup(container, tmp_path / "store", include_workdir=False)
    assert result["path_taken"] == "commit-save"
    assert "could not be read as a layer" in result["path_reason"] and "metacopy" in result["path_reason"]
    assert any("commits and saves the container instead" in n for n in result["notices"])
    assert os.listdir(tmp_path / "store" / "tmp") == []  # the chunks of the abandoned attempt are gone
    assert inspect(container["name"])["State"]["Paused"] is False
    os.removexattr(marked, "trusted.overlay.metacopy")
    restore(container, tmp_path / "store", force=True, restore_workdir=False)
    assert sh("docker", "exec", container["name"], "cat", "/root/package.txt") == "installed"
