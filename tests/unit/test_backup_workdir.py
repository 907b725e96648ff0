"""Work directories backed up as trees of content-defined chunks (issue 15) and read consistently (issue 14): only new
or changed files are read, unchanged ones take their chunks; a restore rebuilds the tree exactly (modes, owners,
mtimes to the nanosecond, symlinks, hard links, empty folders, fifos, xattrs, names that are not UTF-8) after several
incremental backups with changes between them; a tar archive of an older backup still restores; two students with the
same dataset store it once; a file rewritten in place all the time while it is backed up is stored as one complete
version (read while the container is paused), or named in the manifest and the warning when it cannot be paused.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from backup_harness import LABEL, needs_docker, remove_container, run_module, sh

from ansible_collections.gpulab.lab.plugins.module_utils.backup import blobs as backup_blobs
from ansible_collections.gpulab.lab.plugins.module_utils.backup import common as backup_common
from ansible_collections.gpulab.lab.plugins.module_utils.backup import mounts as backup_mounts
from ansible_collections.gpulab.lab.plugins.module_utils.backup import store as backup_store
from ansible_collections.gpulab.lab.plugins.module_utils.backup import streams as backup_streams
from ansible_collections.gpulab.lab.plugins.module_utils.backup import tree as backup_tree
from ansible_collections.gpulab.lab.plugins.module_utils.backup import verify as backup_verify
from ansible_collections.gpulab.lab.plugins.modules import container_backup, container_restore

MiB = 1024 * 1024
IMAGE = "gpulab-test/debian:12"


@pytest.fixture
def store(tmp_path):
    s = backup_store.Store(str(tmp_path / "store"), create=True)
    s.create()
    return s


def listing(top):
    """Every path under top (top included): type, mode, owner, mtime in ns, size and sha256, link target, hard-link
    group, xattrs."""
    out, inodes = {}, {}
    top = os.fsencode(top)
    for folder, dirs, files in os.walk(top):
        for name in [b"", *dirs, *files] if folder == top else [*dirs, *files]:
            path = os.path.join(folder, name) if name else folder
            st = os.lstat(path)
            e = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                 "gid": st.st_gid, "mtime": st.st_mtime_ns}  # fmt: skip
            if stat.S_ISREG(st.st_mode):
                e.update(size=st.st_size, sha256=hashlib.sha256(Path(os.fsdecode(path)).read_bytes()).hexdigest())
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(os.fsdecode(os.path.relpath(path, top)))
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.fsdecode(os.readlink(path))
            xattrs = {
                n: os.getxattr(path, n, follow_symlinks=False).hex() for n in os.listxattr(path, follow_symlinks=False)
            }
            if xattrs:
                e["xattrs"] = xattrs
            out[os.fsdecode(os.path.relpath(path, top))] = e
    for paths in inodes.values():
        for path in paths:
            out[path]["links"] = sorted(paths)
    return out


def make_tree(work):
    (work / "sub" / "deeper").mkdir(parents=True)
    (work / "empty").mkdir()
    (work / "notebook.ipynb").write_text('{"cells": []}')
    (work / "same-size.txt").write_text("version one")
    (work / "replaced.txt").write_text("the first file")
    (work / "sub" / "data.bin").write_bytes(os.urandom(3 * MiB + 17))  # several pieces, not a whole number of them
    for i in range(300):
        (work / "sub" / "deeper" / f"small-{i:03d}.txt").write_text(f"small file {i}\n" * (i + 1))
    (work / "to-delete").mkdir()
    (work / "to-delete" / "inside.txt").write_text("in a folder deleted and made again")
    (work / "hard-1").write_text("one inode, two names")
    os.link(work / "hard-1", work / "sub" / "hard-2")
    (work / "linked-later").write_text("a hard link comes later")
    os.symlink("notebook.ipynb", work / "link")
    os.symlink("/nowhere", work / "dangling")
    os.mkfifo(work / "a-fifo")
    (work / "owned").write_text("someone else's")
    os.chown(work / "owned", 1234, 5678)
    os.chmod(work / "owned", 0o4750)  # noqa: S103 (a mode to restore)
    os.chmod(work / "sub", 0o750)  # noqa: S103 (a mode to restore)
    os.setxattr(work / "owned", "user.note", b"a note")
    (work / os.fsdecode(b"latin1-\xe9t\xe9")).write_text("not utf-8")
    os.utime(work / "notebook.ipynb", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def change_tree(work, step):
    """The changes an incremental backup must see, each in another backup."""
    if step == 0:  # a file changed without its size changing (its mtime kept, too: only its ctime says so)
        mtime = os.stat(work / "same-size.txt").st_mtime_ns
        (work / "same-size.txt").write_text("version two")
        os.utime(work / "same-size.txt", ns=(mtime, mtime))
    elif step == 1:  # a file replaced by another with the same mtime (and size)
        mtime = os.stat(work / "replaced.txt").st_mtime_ns
        (work / "replaced.new").write_text("the other file")
        os.utime(work / "replaced.new", ns=(mtime, mtime))
        os.rename(work / "replaced.new", work / "replaced.txt")
    elif step == 2:  # a folder deleted and made again
        shutil.rmtree(work / "to-delete")
        (work / "to-delete").mkdir()
        (work / "to-delete" / "new-inside.txt").write_text("made again")
    elif step == 3:  # a hard link added to an unchanged file
        os.link(work / "linked-later", work / "sub" / "linked-later-2")
        (work / "sub" / "deeper" / "small-150.txt").unlink()


def backup(store, mount, previous, **kwargs):
    done = backup_mounts.archive_mount(store, mount, previous, 1, known=store.blob_index(), **kwargs)
    manifest = {"format": backup_common.FORMAT, "version": 1, "id": backup_common.new_backup_id(),
                "container": "alice", "created": time.time(), "layers": [], "mounts": [done.entry]}  # fmt: skip
    store.write_manifest(manifest)
    return done, manifest


def start(name, work, *command):
    """A notebook-like container of the Debian test image with work bind-mounted at /work, running command."""
    remove_container(name)
    sh("docker", "run", "-d", "--name", name, "--label", LABEL, "-v", f"{work}:/work", IMAGE, *command)


def settle():
    time.sleep(0.05)  # files written just now are read again at once (they may change within the same clock tick)


def test_incremental_backups_read_only_what_changed_and_restore_the_exact_tree(store, tmp_path):
    work = tmp_path / "srv" / "alice"
    make_tree(work)
    mount = {"source": str(work), "destination": "/work", "read_only": False, "kind": "directory"}
    settle()
    first, manifest = backup(store, mount, {})
    assert first.entry["format"] == "tree"
    assert first.read == sum(e.get("size", 0) for p, e in listing(work).items() if p != "sub/hard-2")
    assert first.warning is None
    states, done = [(listing(work), manifest)], first
    for step in range(4):
        change_tree(work, step)
        settle()
        done, manifest = backup(store, mount, {str(work): done.entry})
        changed = {0: ["same-size.txt"], 1: ["replaced.txt"], 2: ["to-delete/new-inside.txt"], 3: ["linked-later"]}
        assert done.read == sum((work / p).stat().st_size for p in changed[step]), step  # nothing else read
        assert done.written < 300_000, step  # the changed file's chunk and the listing's chunks around it
        states.append((listing(work), manifest))
        assert backup_verify.verify_backup(store, manifest).blobs == len(done.entry["blobs"])
    nothing, _ = backup(store, mount, {str(work): done.entry})
    assert (nothing.read, nothing.written, nothing.entry["reused"]) == (0, 0, True)
    # Each backup restores its own tree, over whatever is there now.
    for expected, manifest in [states[-1], states[2], states[0]]:
        shutil.rmtree(work)
        entry = manifest["mounts"][0]
        backup_mounts.restore_mount(store, entry, backup_mounts.archive_kinds(store, entry))
        after = listing(work)
        differences = sorted(p for p in set(expected) | set(after) if expected.get(p) != after.get(p))
        assert differences == [], [(p, expected.get(p), after.get(p)) for p in differences[:10]]
    assert listing(work)["notebook.ipynb"]["mtime"] == 1_600_000_000_123_456_789
    assert listing(work)["owned"]["mode"] == 0o4750


def test_a_restore_over_the_current_tree_replaces_files_and_moves_aside_what_the_backup_lacks(store, tmp_path):
    work = tmp_path / "srv" / "bob"
    make_tree(work)
    mount = {"source": str(work), "destination": "/work", "read_only": False, "kind": "directory"}
    expected = listing(work)
    done, _ = backup(store, mount, {})
    (work / "hard-1").write_text("changed through one name")  # the other name must not keep this content
    (work / "new-file").write_text("not in the backup")
    (work / "empty").rmdir()
    restored = backup_mounts.restore_mount(store, done.entry, stamp="20250101T000000Z")
    assert restored.moved == ["new-file"]
    after = listing(work)
    assert after == expected, sorted(p for p in set(expected) | set(after) if expected.get(p) != after.get(p))


def test_a_work_directory_archive_of_an_older_backup_still_restores(store, tmp_path):
    """Backups before the tree format hold one tar archive of the source (tar --create, zstd): still restored."""
    work = tmp_path / "srv" / "carol"
    make_tree(work)
    expected = listing(work)
    tar = backup_streams.TarOf(str(work))
    with backup_blobs.BlobWriter(store, 1) as writer:
        for block in tar.chunks():
            writer.write(block)
        assert tar.close() is None
        blob = writer.finish()
        kept, _written = store.keep(writer, blob, {})
    entry = {"source": str(work), "destination": "/work", "read_only": False, "kind": "directory", "uid": 0,
             "gid": 0, "mode": 0o755, "parents": [], "size": blob["size"], "blobs": [kept]}  # fmt: skip
    shutil.rmtree(work)
    backup_mounts.restore_mount(store, entry, backup_mounts.archive_kinds(store, entry))
    after = listing(work)
    # tar keeps mtimes to the microsecond (its pax records): compare those as tar has them
    strip = {p: {k: v for k, v in e.items() if k != "mtime"} for p, e in expected.items()}
    assert {p: {k: v for k, v in e.items() if k != "mtime"} for p, e in after.items()} == strip


def test_a_file_that_lies_about_its_metadata_is_read_in_a_periodic_full_read(store, tmp_path):
    work = tmp_path / "srv" / "dave"
    work.mkdir(parents=True)
    (work / "data").write_bytes(b"A" * 1000)
    mount = {"source": str(work), "destination": "/work", "read_only": False, "kind": "directory"}
    settle()
    first, _ = backup(store, mount, {})
    # Same size, mtime, ctime and inode cannot be faked from user space; an entry whose last full read is old stands in.
    stale = dict(first.entry, full_read=time.time() - 8 * 86400)
    again, _ = backup(store, mount, {str(work): stale}, full_read_days=7)
    assert again.read == 1000
    assert again.entry["full_read"] > stale["full_read"]
    incremental, _ = backup(store, mount, {str(work): again.entry}, full_read_days=7)
    assert incremental.read == 0
    # an mtime in the future is not trusted
    future = time.time_ns() + 3600 * 10**9
    os.utime(work / "data", ns=(future, future))
    settle()
    seen, _ = backup(store, mount, {str(work): incremental.entry})
    read_again, _ = backup(store, mount, {str(work): seen.entry})
    assert read_again.read == 1000


@needs_docker
@pytest.mark.usefixtures("capture_exit")
def test_two_students_with_the_same_dataset_store_it_once(tmp_path):
    """Two notebooks whose work directories hold the same 1 GB dataset (and notebooks of their own): the store grows by
    about 1 GB for both, not 2."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    for i in range(4):
        with open(dataset / f"part-{i}.bin", "wb") as f:
            for _ in range(256):
                f.write(os.urandom(MiB))
    store = tmp_path / "store"
    names = [f"gpulab-unittest-ds-{uuid.uuid4().hex[:6]}-{who}" for who in ("erin", "finn")]
    try:
        for name in names:
            work = tmp_path / "srv" / name
            shutil.copytree(dataset, work / "dataset")
            (work / "notebook.ipynb").write_text(f'{{"owner": "{name}"}}')
            start(name, work, "sleep", "infinity")
        shutil.rmtree(dataset)
        time.sleep(0.05)
        used = []
        for name in names:
            result = run_module(container_backup, {"container": name, "store": str(store)})
            assert result["mounts"][0]["size"] >= 1024 * MiB
            used.append(backup_store.Store(str(store)).disk_usage())
    finally:
        for name in names:
            remove_container(name)
    assert used[0] > 1024 * MiB
    assert used[1] - used[0] < 20 * MiB, used  # the second student's dataset is the first's chunks


PY_WRITER = r"""
import os, sys, time
size, whole = int(sys.argv[1]), sys.argv[2] == "whole"
fd = os.open("/work/model.bin", os.O_RDWR | os.O_CREAT, 0o644)
versions = []
for version in range(2):  # made once: the writer then writes without a pause
    block = (b"version %08d " % version) * (4096 // 17)
    versions.append((block + b"." * (4096 - len(block))) * (size // 4096))
open("/work/started", "w").write("yes")
while True:
    data = versions.pop(0)
    versions.append(data)
    os.pwrite(fd, data, 0)  # one write: a version is whole between two writes
    if whole:
        time.sleep(0.01)  # in user space now and then: the freezer can catch it
"""


def one_version(data):
    first = data[:4096]
    return len(data) > 0 and data == first * (len(data) // 4096)


@needs_docker
@pytest.mark.usefixtures("capture_exit")
@pytest.mark.parametrize("pause", [True, False])
def test_a_file_rewritten_all_the_time_is_stored_as_one_version_or_named(tmp_path, pause):
    """The writer rewrites the whole file with one write() at a time, all the time: with pause, the backup reads it
    again while the container is paused; without, it is named (or, when it found the file quiet once, stored as that
    one version)."""
    name = f"gpulab-unittest-torn-{uuid.uuid4().hex[:8]}"
    work = tmp_path / "srv" / "gina"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("quiet file")
    store = tmp_path / "store"
    size = 32 * MiB
    start(name, work, "python3", "-c", PY_WRITER, str(size), "whole" if pause else "busy")
    try:
        deadline = time.monotonic() + 30
        while not (work / "started").exists() or (work / "model.bin").stat().st_size < size:
            assert time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        result = run_module(container_backup, {"container": name, "store": str(store), "pause": pause})
        manifest = json.loads(Path(result["manifest"]).read_text())
    finally:
        remove_container(name)
    entry = manifest["mounts"][0]
    s = backup_store.Store(str(store))
    records = {r["p"]: r for r in backup_tree.read_listing(s, entry)}
    reader = backup_streams.BlobReader(s.blob_path("sha256:" + ref[0]) for ref in records["model.bin"]["r"])
    data = b"".join(reader.chunks())
    reader.close()
    parts = records["model.bin"]["r"]
    sizes = {b["digest"]: b["size"] for b in entry["blobs"]}
    assert all(ref[1] == 0 and ref[2] == sizes["sha256:" + ref[0]] for ref in parts)  # whole pieces
    assert len(data) == size
    if pause:  # read again while the container was paused (the writer between two writes), unless a read between
        # two writes of a busy machine found it quiet
        assert entry["unstable"] == []
        assert one_version(data), "the stored copy mixes versions"
        assert not any("kept changing" in w for w in result["notices"])
    elif entry["unstable"]:  # never the same for a moment, and no pause: named, in the manifest and the warning
        assert entry["unstable"] == ["model.bin"]
        assert entry["read_while_paused"] == []
        warning = next(w for w in result["notices"] if "kept changing" in w)
        assert str(work / "model.bin") in warning
        assert "the container was not paused" in warning
    else:  # the writer stood still long enough once (a loaded machine): that copy is of one moment
        assert one_version(data), "the stored copy mixes versions and is not named"
    # the quiet file is stored as it is, either way
    assert records["notes.txt"]["s"] == len("quiet file")
    subprocess.run(["rm", "-rf", str(work)], check=True)
    try:
        run_module(container_restore, {"container": name, "store": str(store), "start": False})
    finally:
        remove_container(name)
    assert (work / "notes.txt").read_text() == "quiet file"
    assert len((work / "model.bin").read_bytes()) == size
