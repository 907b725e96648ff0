"""Tests of library/container_restore.py against this machine's real Docker engine (skipped without one).

A container of the tiny test image (tests/unit/backup_harness.py) set up as the notebook role sets one up (a port on
127.0.0.1, the work directory bind-mounted rw and a config folder ro, env, labels, restart policy, ipc host, limits,
user, working dir), backed up, removed with its image and work directory, and restored: same settings, same files.
Damaged backups are refused before Docker changes, shown by the engine's own event log.
"""

import json
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from backup_harness import (
    build_tiny_image,
    engine_events,
    engine_state,
    free_port,
    inspect,
    needs_docker,
    remove_container,
    remove_images_of,
    run_container,
    run_module,
    sh,
)
from module_harness import ModuleFail

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils import files as backup_files
from ansible_collections.gpulab.lab.plugins.module_utils.backup import common as backup_common
from ansible_collections.gpulab.lab.plugins.module_utils.backup import store as backup_store
from ansible_collections.gpulab.lab.plugins.modules import container_backup, container_restore

pytestmark = [needs_docker, pytest.mark.usefixtures("capture_exit")]


def read_json(path):
    return json.loads(Path(path).read_text())


SETTINGS = [
    ("HostConfig", "PortBindings"),
    ("HostConfig", "RestartPolicy"),
    ("HostConfig", "IpcMode"),
    ("HostConfig", "Memory"),
    ("HostConfig", "NanoCpus"),
    ("HostConfig", "Mounts"),
    ("HostConfig", "Binds"),
    ("HostConfig", "Init"),
    ("Config", "Env"),
    ("Config", "Cmd"),
    ("Config", "Entrypoint"),
    ("Config", "User"),
    ("Config", "WorkingDir"),
    ("Config", "ExposedPorts"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    name, image_id = build_tiny_image(tmp_path_factory.mktemp("image"))
    yield {"name": name, "id": image_id}
    subprocess.run(["docker", "rmi", "-f", name], capture_output=True, check=False)


@pytest.fixture
def notebook(tiny, tmp_path):
    """A container set up like a notebook: backed up once into tmp_path/store."""
    name = f"gpulab-unittest-restore-{uuid.uuid4().hex[:8]}"
    work = tmp_path / "srv" / "notebooks" / name
    work.mkdir(parents=True)
    os.chown(work, 1234, 1234)
    os.chmod(work, 0o750)  # noqa: S103 (a mode to restore)
    (work / "analysis.ipynb").write_text('{"cells": []}\n')
    os.chown(work / "analysis.ipynb", 1234, 1234)
    config = tmp_path / "etc" / name
    config.mkdir(parents=True)
    (config / "jupyter_notebook_config.json").write_text('{"NotebookApp": {"token": "t0k3n"}}')
    os.chmod(config / "jupyter_notebook_config.json", 0o400)
    for path in (config, config / "jupyter_notebook_config.json"):  # the user's own, as the notebook role makes it
        os.chown(path, 1234, 1234)
    port = free_port()
    run_container(
        name,
        tiny["name"],
        "-p", f"127.0.0.1:{port}:8888",
        "--mount", f"type=bind,source={work},target=/work",
        "--mount", f"type=bind,source={config},target=/etc/gpulab,readonly",
        "--ipc", "host",
        "--restart", "unless-stopped",
        "--memory", "256m",
        "--cpus", "0.5",
        "--init",
        "--user", "1234:1234",
        "--workdir", "/work",
        "-e", "LANG=C.UTF-8",
        "--label", "io.gpulab.notebook.user=alice",
    )  # fmt: skip
    sh("docker", "exec", "-u", "0", name, "sh", "-c", "echo torch > /root/installed.txt")
    sh("docker", "exec", name, "sh", "-c", "echo 'written inside' > /work/inside.txt")  # as uid 1234
    store = tmp_path / "store"
    backed_up = run_module(container_backup, {"container": name, "store": str(store)})
    yield {"name": name, "work": work, "config": config, "store": store, "port": port, "backup": backed_up}
    remove_container(name)
    remove_images_of(name)


def restore(notebook, **options):
    return run_module(container_restore, {"container": notebook["name"], "store": str(notebook["store"]), **options})


def wipe(notebook):
    """What a reinstall does: the container, its image and the work directory are gone."""
    remove_container(notebook["name"])
    remove_images_of(notebook["name"])
    subprocess.run(["rm", "-rf", str(notebook["work"]), str(notebook["config"])], check=True)


def test_the_restored_container_has_the_same_settings_and_files(notebook):
    before = inspect(notebook["name"])
    wipe(notebook)
    result = restore(notebook)
    assert result["changed"] is True
    assert result["backup_id"] == notebook["backup"]["backup_id"]
    assert result["container_started"] is True
    assert not {"started", "finished"} & result.keys()  # keys async_status reserves: a job would never finish
    assert result["image_loaded"] is True
    assert result["layers_present"] == 2  # the tiny image's layers are in the engine: only the commit's is sent
    assert result["layers_sent"] == 1
    assert result["verified"] == "content"
    assert sorted(result["workdir_restored"]) == sorted([str(notebook["work"]), str(notebook["config"])])
    after = inspect(notebook["name"])
    for section, key in SETTINGS:
        assert after[section].get(key) == before[section].get(key), f"{section}.{key}"
    assert after["HostConfig"]["PortBindings"] == {
        "8888/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(notebook["port"])}]
    }
    assert after["Config"]["Labels"]["io.gpulab.notebook.user"] == "alice"
    assert after["Config"]["Labels"][backup_common.RESTORED_LABEL] == result["backup_id"]
    assert after["Config"]["Image"] == result["image"] == f"gpulab-backup/{notebook['name']}:{result['backup_id']}"
    assert after["State"]["Running"] is True
    # Files: inside the container, and in the bind-mounted folders with their owner and mode.
    assert sh("docker", "exec", notebook["name"], "cat", "/root/installed.txt") == "torch"
    assert sh("docker", "exec", notebook["name"], "cat", "/etc/gpulab/jupyter_notebook_config.json").endswith(
        '"t0k3n"}}'
    )
    st = os.stat(notebook["work"] / "inside.txt")
    assert (st.st_uid, st.st_gid) == (1234, 1234)
    assert (notebook["work"] / "inside.txt").read_text() == "written inside\n"
    assert os.stat(notebook["work"] / "analysis.ipynb").st_uid == 1234
    assert stat.S_IMODE(os.stat(notebook["work"]).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(notebook["config"] / "jupyter_notebook_config.json").st_mode) == 0o400

    # Again: the container exists and is left alone.
    again = restore(notebook)
    assert again["changed"] is False
    assert again["container_exists"] is True
    assert "left alone" in again["msg"]
    assert inspect(notebook["name"])["Id"] == after["Id"]


def test_force_replaces_the_container_and_reuses_the_image(notebook):
    first = restore(notebook, force=True)
    assert first["replaced_container"] is True
    second = restore(notebook, force=True)
    assert second["image_loaded"] is False  # the engine has the image: only tagged
    assert second["layers_present"] == 3
    assert inspect(notebook["name"])["Id"] == second["container_id"]


def tree(root):
    """Every path under root (root included, as "."): kind, mode, owner, and content or link target."""
    out = {}
    root = Path(root)
    for path in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(path)
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            what = ("symlink", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            what = ("directory", None)
        else:
            what = ("file", path.read_bytes())
        out[rel] = (*what, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return out


def refused_without_change(notebook, match, **options):
    """Restore (force) must fail with match, and the engine must be as it was, its event log silent about it, and the
    work directory as it was."""
    state = engine_state(notebook["name"])
    files = tree(notebook["work"])
    since = time.time()
    with pytest.raises(ModuleFail, match=match) as info:
        restore(notebook, force=True, **options)
    time.sleep(1.1)
    until = time.time()
    assert engine_state(notebook["name"]) == state
    assert tree(notebook["work"]) == files
    assert not list(notebook["work"].parent.glob("*.gpulab-moved-*"))
    # (not every gpulab-backup/ image: other tests may run at the same time)
    words = [notebook["name"], notebook["backup"]["image_id"][7:19]]
    assert engine_events(since, until, *words) == []
    return info.value.result["msg"]


def test_a_corrupt_blob_is_refused_before_docker_changes(notebook):
    manifest = read_json(notebook["backup"]["manifest"])
    digest = manifest["layers"][-1]["blobs"][-1]["digest"]  # a chunk of the writable layer
    path = Path(backup_store.Store(str(notebook["store"])).blob_path(digest))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    msg = refused_without_change(notebook, f"blob {digest} is corrupt")
    assert "nothing was changed" in msg


def test_a_missing_blob_is_refused_before_docker_changes(notebook):
    manifest = read_json(notebook["backup"]["manifest"])
    digest = manifest["mounts"][0]["blobs"][0]["digest"]
    os.unlink(backup_store.Store(str(notebook["store"])).blob_path(digest))
    refused_without_change(notebook, f"blob {digest} is missing", backup=notebook["backup"]["backup_id"])
    # Without an id, the newest complete backup is wanted: there is none.
    refused_without_change(notebook, f"the newest backup of container {notebook['name']}, .*{digest} is missing")


def test_a_layer_whose_content_differs_is_refused_while_it_streams(notebook, tmp_path):
    """A blob that matches its stored checksum but not its content digest (a backup written wrong): the load breaks
    off before the tar's manifest, and the engine keeps nothing."""
    remove_container(notebook["name"])
    remove_images_of(notebook["name"])
    store = backup_store.Store(str(notebook["store"]))
    path = notebook["backup"]["manifest"]
    manifest = read_json(path)
    top = manifest["layers"][-1]
    chunk = top["blobs"][-1]
    forged = tmp_path / "forged.tar"
    subprocess.run(["zstd", "-dcq", store.blob_path(chunk["digest"]), "-o", forged], check=True)
    data = bytearray(forged.read_bytes())
    data[-2000] ^= 0x01  # same size, other content
    forged.write_bytes(bytes(data))
    blob_path = store.blob_path(chunk["digest"])
    os.chmod(blob_path, 0o600)
    subprocess.run(["zstd", "-qf", forged, "-o", blob_path], check=True)
    chunk.update(stored_digest=backup_files.file_sha256(blob_path), stored_size=os.path.getsize(blob_path))
    os.chmod(path, 0o600)
    Path(path).write_text(json.dumps(manifest))
    since = time.time()
    with pytest.raises(ModuleFail, match=f"layer {top['diff_id']} is corrupt"):
        restore(notebook)
    time.sleep(1.1)
    assert inspect(notebook["name"]) is None
    assert api.Engine().image(manifest["image"]["id"]) is None
    assert engine_events(since, time.time(), notebook["name"]) == []
    with pytest.raises(ModuleFail, match=f"blob {chunk['digest']} is corrupt"):
        restore(notebook, verify_only=True)  # the full check finds it without Docker


def test_bad_input(notebook, tmp_path):
    with pytest.raises(ModuleFail, match=f"has no backup 20990101T000000.000Z-000000 of container {notebook['name']}"):
        restore(notebook, backup="20990101T000000.000Z-000000")
    with pytest.raises(ModuleFail, match="has no backup of container gpulab-unittest-other"):
        run_module(container_restore, {"container": "gpulab-unittest-other", "store": str(notebook["store"])})
    with pytest.raises(ModuleFail, match=f"the backup store {tmp_path / 'nope'} does not exist"):
        run_module(container_restore, {"container": notebook["name"], "store": str(tmp_path / "nope")})
    with pytest.raises(ModuleFail, match=r"backup id '\.\./\.\./x' is not valid"):
        restore(notebook, backup="../../x")


def test_verify_only_and_check_mode_leave_docker_alone(notebook):
    # verify_only does not even talk to the engine: an engine that does not exist is no problem.
    checked = restore(notebook, verify_only=True, docker_host="unix:///nonexistent/docker.sock")
    assert checked["changed"] is False
    assert checked["verified"] == "full"
    assert checked["verified_content_bytes"] > 0
    wipe(notebook)
    time.sleep(1.1)  # the events of the wipe itself are over
    since = time.time()
    planned = run_module(
        container_restore, {"container": notebook["name"], "store": str(notebook["store"])}, check_mode=True
    )
    assert planned["changed"] is True
    assert "would load backup" in planned["msg"]
    assert "create the container and start it" in planned["msg"]
    time.sleep(1.1)
    assert inspect(notebook["name"]) is None
    assert not notebook["work"].exists()
    assert engine_events(since, time.time(), notebook["name"]) == []


def test_secret_env_values_must_be_given(tiny, tmp_path):
    name = f"gpulab-unittest-restore-{uuid.uuid4().hex[:8]}"
    run_container(name, tiny["name"], "-e", "JUPYTER_TOKEN=s3cret", "-e", "OTHER=1")
    store = tmp_path / "store"
    try:
        backed_up = run_module(container_backup, {"container": name, "store": str(store), "include_workdir": False})
        assert backed_up["secret_env_left_out"] == ["JUPYTER_TOKEN"]
        config = json.loads(read_json(backed_up["manifest"])["image"]["config"])
        assert not any(
            "s3cret" in e for e in config["config"]["Env"] + config.get("container_config", {}).get("Env", [])
        )
        assert "s3cret" not in Path(backed_up["manifest"]).read_text()
        remove_container(name)
        with pytest.raises(ModuleFail, match=r"left out the value of JUPYTER_TOKEN .*give them with env"):
            run_module(container_restore, {"container": name, "store": str(store)})
        assert inspect(name) is None
        run_module(container_restore, {"container": name, "store": str(store), "env": {"JUPYTER_TOKEN": "s3cret"}})
        env = inspect(name)["Config"]["Env"]
        assert "JUPYTER_TOKEN=s3cret" in env
        assert "OTHER=1" in env
    finally:
        remove_container(name)
        remove_images_of(name)


def test_gpu_device_requests_come_back(tiny, tmp_path):
    """A container created with --gpus (never started: this machine has no GPU) is restored with its request."""
    name = f"gpulab-unittest-restore-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    sh("docker", "create", "--name", name, "--label", "io.gpulab.harness=1", "--gpus", '"device=0,1"', tiny["name"])
    store = tmp_path / "store"
    try:
        before = inspect(name)["HostConfig"]["DeviceRequests"]
        assert before[0]["DeviceIDs"] == ["0", "1"]
        run_module(container_backup, {"container": name, "store": str(store)})
        remove_container(name)
        result = run_module(container_restore, {"container": name, "store": str(store)})
        assert result["container_started"] is False  # it was not running
        assert inspect(name)["HostConfig"]["DeviceRequests"] == before
    finally:
        remove_container(name)
        remove_images_of(name)


def student_works(notebook):
    """After the backup: the student saves a new file and a new folder, changes a file, deletes one, and installs
    something into the container."""
    work = notebook["work"]
    (work / "analysis.ipynb").write_text('{"cells": ["newer"]}\n')
    (work / "inside.txt").unlink()
    (work / "results").mkdir()
    (work / "results" / "run1.csv").write_text("1,2\n")
    (work / "new.txt").write_text("new\n")
    for path in (work / "results", work / "results" / "run1.csv", work / "new.txt"):
        os.chown(path, 1234, 1234)
    sh("docker", "exec", "-u", "0", notebook["name"], "sh", "-c", "echo newer > /root/second.txt")


def own_blob(newer, older):
    """A blob of the newer backup's layers that the older one does not reference."""
    theirs = {b["digest"] for b, _what in backup_store.manifest_blobs(older)}
    return next(b["digest"] for layer in newer["layers"] for b in layer["blobs"] if b["digest"] not in theirs)


@pytest.mark.parametrize("damage", ["missing chunk", "missing manifest", "truncated manifest"])
def test_a_damaged_newest_backup_is_refused_and_no_older_one_is_taken(notebook, damage):
    first = notebook["backup"]
    student_works(notebook)
    second = run_module(container_backup, {"container": notebook["name"], "store": str(notebook["store"])})
    (notebook["work"] / "after.txt").write_text("after the second backup\n")
    store = backup_store.Store(str(notebook["store"]))
    newer, older = read_json(second["manifest"]), read_json(first["manifest"])
    os.chmod(second["manifest"], 0o600)
    if damage == "missing chunk":
        digest = own_blob(newer, older)
        os.unlink(store.blob_path(digest))
        match = f"the newest backup of container {notebook['name']}, {second['backup_id']}, .*{digest} is missing"
    elif damage == "missing manifest":
        os.unlink(second["manifest"])
        match = f"backup {first['backup_id']} may not be the newest of container {notebook['name']}: .*no manifest"
    else:
        data = Path(second["manifest"]).read_bytes()
        Path(second["manifest"]).write_bytes(data[: len(data) // 2])
        match = f"the newest backup of container {notebook['name']}, {second['backup_id']}, .*cannot be read"
    msg = refused_without_change(notebook, match)
    assert f"Complete backups of {notebook['name']}, newest first: {first['backup_id']} (created " in msg
    assert f"backup_restore_id=<id> with backup_containers=[{notebook['name']}]" in msg
    # Asked for by its id, the older backup is restored, exactly: what was saved since is moved aside.
    result = restore(notebook, force=True, backup=first["backup_id"])
    assert result["backup_id"] == first["backup_id"]
    assert inspect(notebook["name"])["Config"]["Labels"][backup_common.RESTORED_LABEL] == first["backup_id"]
    assert sh("docker", "exec", notebook["name"], "cat", "/root/installed.txt") == "torch"
    assert sh("docker", "exec", notebook["name"], "cat", "/root/second.txt", check=False) == ""
    assert (notebook["work"] / "inside.txt").read_text() == "written inside\n"
    assert (notebook["work"] / "analysis.ipynb").read_text() == '{"cells": []}\n'
    assert sorted(result["workdir_moved_aside"][0]["paths"]) == ["after.txt", "new.txt", "results"]


def test_a_restored_work_directory_holds_exactly_the_backups_files(notebook):
    at_backup = tree(notebook["work"])
    config_at_backup = tree(notebook["config"])
    student_works(notebook)
    os.symlink("/etc", notebook["work"] / "sub")  # where the backup has nothing: moved aside, never followed
    result = restore(notebook, force=True)
    assert result["backup_id"] == notebook["backup"]["backup_id"]
    assert tree(notebook["work"]) == at_backup  # the changed file back, the deleted one back, nothing more
    assert tree(notebook["config"]) == config_at_backup
    moved = result["workdir_moved_aside"]
    assert [m["source"] for m in moved] == [str(notebook["work"])]
    folder = Path(moved[0]["moved_to"])
    assert folder.parent == notebook["work"].parent
    assert folder.name.startswith(notebook["work"].name + ".gpulab-moved-")
    st = os.stat(folder)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 1234, 1234)
    assert sorted(moved[0]["paths"]) == ["new.txt", "results", "sub"]
    assert (folder / "new.txt").read_text() == "new\n"
    assert (folder / "results" / "run1.csv").read_text() == "1,2\n"
    assert os.readlink(folder / "sub") == "/etc"
    assert any(str(folder) in notice and "3 path(s)" in notice for notice in result["notices"])


def test_a_damaged_work_directory_archive_changes_no_file(notebook):
    manifest = read_json(notebook["backup"]["manifest"])
    digest = manifest["mounts"][0]["blobs"][0]["digest"]
    path = Path(backup_store.Store(str(notebook["store"])).blob_path(digest))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    (notebook["work"] / "new.txt").write_text("kept where it is\n")
    msg = refused_without_change(notebook, f"blob {digest} is corrupt", backup=notebook["backup"]["backup_id"])
    assert f"No other backup of {notebook['name']} " in msg


def test_a_check_mode_verification_finds_a_corrupt_blob_and_moves_nothing(notebook):
    """verify_only in check mode reads every blob like a real verification, names the corrupt one, and leaves it in
    the store (a real run moves it to quarantine/)."""
    store = backup_store.Store(str(notebook["store"]))
    manifest = store.read_manifest(notebook["name"], notebook["backup"]["backup_id"])
    blob = max((b for b, _what in backup_store.manifest_blobs(manifest)), key=lambda b: b["size"])
    path = Path(store.blob_path(blob["digest"]))
    os.chmod(path, 0o600)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte flipped, the size kept
    path.write_bytes(bytes(data))
    with pytest.raises(ModuleFail, match=r"corrupt|cannot be read|decompress"):
        run_module(
            container_restore,
            {"container": notebook["name"], "store": str(notebook["store"]), "verify_only": True},
            check_mode=True,
        )
    assert path.read_bytes() == bytes(data)
    assert not list((Path(notebook["store"]) / "quarantine").rglob("*"))
    with pytest.raises(ModuleFail, match=r"corrupt|cannot be read|decompress"):
        restore(notebook, verify_only=True)
    assert not path.exists()
    assert list((Path(notebook["store"]) / "quarantine" / "sha256").glob(blob["digest"].split(":")[1] + "*"))
