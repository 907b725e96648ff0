"""A container's whole file tree survives backup and restore on a wiped engine, through both of container_backup's
paths (issue 7): the fast one (the writable layer read from its overlay2 upper directory) and the fallback
(`docker commit` + `docker save`).

The base image is a private copy of gpulab-test/debian:12 (exported and imported: a layer no other image shares) with a
few folders of its own, so that after the backup the engine can be wiped of every layer of the container, and the
restore must bring all of them back from the store. Inside the container, as root, a varied set of changes: files
added, modified and deleted in folders of the image and in new ones; a folder replaced by a file, and one replaced by a
file and then by a folder again (an opaque folder in overlay terms); symlinks (to a file, to a folder, dangling), hard
links, modes (setuid, sticky, a base file's mode changed without its content), owners, user xattrs, an empty folder, a
fifo, names with spaces and non-ASCII (and one that is not UTF-8), a sparse file. The complete tree (every path's type,
mode, owner, size, sha256 of its content, link target, hard-link group, xattrs) is listed inside the container before
the backup and inside the restored one: they must be identical, and the fast path's restored tree must equal the
fallback's. One difference is Docker's own and asserted as such: `docker commit` keeps no user.* xattrs (its archive
package writes only security.capability), so the fallback path loses them; the fast path keeps them.
"""

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from backup_harness import inspect, needs_docker, remove_container, remove_images_of, run_module, sh

from ansible_collections.gpulab.lab.plugins.modules import container_backup, container_restore

pytestmark = [needs_docker, pytest.mark.usefixtures("capture_exit")]

BASE_SETUP = r"""
import os
os.makedirs("/opt/tree/sub", exist_ok=True)
for name in ("a.txt", "b.txt", "sub/c.txt"):
    open("/opt/tree/" + name, "w").write("base " + name * 100)
os.makedirs("/srv/becomes-a-file/inner", exist_ok=True)
open("/srv/becomes-a-file/inner/x", "w").write("x")
os.makedirs("/srv/roundtrip/old", exist_ok=True)
open("/srv/roundtrip/old/file", "w").write("old content")
open("/srv/roundtrip/kept-name", "w").write("base version")
open("/opt/mode-only.sh", "w").write("#!/bin/sh\necho hi\n")
os.chmod("/opt/mode-only.sh", 0o644)
"""

CHANGES = r"""
import os
# added: in folders of the image, and in new ones
open("/etc/gpulab-added.conf", "w").write("added = yes\n")
os.makedirs("/opt/newdir/deeper/deepest")
open("/opt/newdir/deeper/deepest/data.bin", "wb").write(bytes(range(256)) * 4000)
# modified and deleted
open("/opt/tree/a.txt", "a").write("appended by the student\n")
os.remove("/opt/tree/b.txt")
os.remove("/etc/issue.net")
import shutil
shutil.rmtree("/opt/tree/sub")
shutil.rmtree("/usr/share/doc/bash")
# a folder replaced by a file; a folder replaced by a file, then by a folder again (opaque)
shutil.rmtree("/srv/becomes-a-file")
open("/srv/becomes-a-file", "w").write("now a file")
shutil.rmtree("/srv/roundtrip")
open("/srv/roundtrip", "w").write("briefly a file")
os.remove("/srv/roundtrip")
os.makedirs("/srv/roundtrip/new")
open("/srv/roundtrip/kept-name", "w").write("new version")
# links
os.symlink("/opt/tree/a.txt", "/opt/link-to-file")
os.symlink("../etc", "/opt/link-to-dir")
os.symlink("/nowhere/at/all", "/opt/dangling")
open("/opt/newdir/hard-1", "w").write("one inode, three names")
os.link("/opt/newdir/hard-1", "/opt/newdir/hard-2")
os.link("/opt/newdir/hard-1", "/opt/hard-3")
# modes and owners
open("/usr/local/bin/setuid-tool", "w").write("#!/bin/sh\n")
os.chmod("/usr/local/bin/setuid-tool", 0o4755)
os.makedirs("/opt/shared-tmp")
os.chmod("/opt/shared-tmp", 0o1777)
os.chmod("/opt/mode-only.sh", 0o750)
open("/opt/owned", "w").write("owned by someone else")
os.chown("/opt/owned", 1234, 5678)
os.chown("/opt/tree/a.txt", 4321, 8765)
# xattrs
os.setxattr("/opt/owned", "user.comment", b"a student's note")
os.setxattr("/opt/newdir", "user.binary", bytes(range(1, 40)))
# an empty folder, a fifo, names
os.makedirs("/opt/empty-folder")
os.mkfifo("/opt/a-fifo")
open("/opt/a file with spaces.txt", "w").write("spaces")
open("/opt/résumé - 日本語.txt", "w").write("non-ascii")
open(b"/opt/latin1-\xe9t\xe9", "w").write("not utf-8")
# a sparse file: 64 MiB, 4 KiB of data in its middle
with open("/opt/sparse.img", "wb") as f:
    f.truncate(64 * 1024 * 1024)
    f.seek(32 * 1024 * 1024)
    f.write(b"\xab" * 4096)
"""

LISTING = r"""
import hashlib, json, os, stat
SKIP = {b"/proc", b"/sys", b"/dev", b"/etc/hostname", b"/etc/hosts", b"/etc/resolv.conf", b"/.dockerenv"}
entries, inodes = {}, {}
def add(path):
    st = os.lstat(path)
    e = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISREG(st.st_mode):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        e.update(size=st.st_size, sha256=h.hexdigest())
        if st.st_nlink > 1:
            inodes.setdefault(st.st_ino, []).append(path)
    elif stat.S_ISLNK(st.st_mode):
        e["target"] = os.fsdecode(os.readlink(path))
    xattrs = {}
    for name in os.listxattr(path, follow_symlinks=False):
        xattrs[name] = os.getxattr(path, name, follow_symlinks=False).hex()
    if xattrs:
        e["xattrs"] = xattrs
    entries[path] = e
for top, dirs, files in os.walk(b"/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in SKIP]
    for name in dirs + files:
        path = os.path.join(top, name)
        if path not in SKIP:
            add(path)
for paths in inodes.values():
    for path in paths:
        entries[path]["hardlinks"] = sorted(os.fsdecode(p) for p in paths)
print(json.dumps({os.fsdecode(p): e for p, e in entries.items()}, sort_keys=True))
"""


def py(container, code):
    return sh("docker", "exec", "-u", "0", container, "python3", "-c", code)


def tree(container):
    return json.loads(py(container, LISTING))


@pytest.fixture
def base_image():
    """A one-layer copy of gpulab-test/debian:12 plus BASE_SETUP, sharing no layer with any other image (made for each
    test: the test wipes it from the engine)."""
    maker = f"gpulab-unittest-tree-base-{uuid.uuid4().hex[:8]}"
    name = f"gpulab-unittest/tree-base:{uuid.uuid4().hex[:8]}"
    sh(
        "docker",
        "run",
        "--name",
        maker,
        "--label",
        "io.gpulab.harness=1",
        "gpulab-test/debian:12",
        "python3",
        "-c",
        BASE_SETUP,
    )
    try:
        export = subprocess.Popen(["docker", "export", maker], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "--change", 'CMD ["sleep", "infinity"]', "-", name],
            stdin=export.stdout,
            check=True,
            capture_output=True,
        )
        export.stdout.close()
        assert export.wait() == 0
    finally:
        remove_container(maker)
    yield name
    subprocess.run(["docker", "rmi", "-f", name], capture_output=True, check=False)


def images_with_layer(diff_id):
    ids = sh("docker", "images", "-aq", "--no-trunc").split()
    return [i for i in set(ids) if diff_id in (inspect(i, "image") or {}).get("RootFS", {}).get("Layers", [])]


RESTORED = {}


@pytest.mark.parametrize("path", ["overlay-upperdir", "commit-save"])
def test_the_restored_tree_is_the_backed_up_tree(base_image, tmp_path, path):
    name = f"gpulab-unittest-tree-{uuid.uuid4().hex[:8]}"
    base_layer = inspect(base_image, "image")["RootFS"]["Layers"][0]
    store = tmp_path / "store"
    sh("docker", "run", "-d", "--name", name, "--label", "io.gpulab.harness=1", base_image)
    try:
        py(name, CHANGES)
        before = tree(name)
        result = run_module(
            container_backup,
            {"container": name, "store": str(store), "include_workdir": False, "fast_path": path == "overlay-upperdir"},
        )
        assert result["path_taken"] == path, result["path_reason"]
        if path == "overlay-upperdir":
            assert result["base_image_stored"] is True
            assert result["paused_seconds"] > 0
            manifest = json.loads(Path(result["manifest"]).read_text())
            assert len(manifest["layers"][-1]["blobs"]) > 1  # the writable layer, in content-defined chunks
        # The engine is wiped of everything of this container: the container, the image, every layer of it.
        remove_container(name)
        sh("docker", "rmi", "-f", base_image)
        remove_images_of(name)
        assert images_with_layer(base_layer) == []

        restored = run_module(container_restore, {"container": name, "store": str(store)})
        assert restored["layers_present"] == 0  # every layer came from the store
        assert restored["container_started"] is True
        after = tree(name)
    finally:
        remove_container(name)
        remove_images_of(name)
    if path == "commit-save":
        # Docker's commit writes a layer through its archive package, which keeps only the security.capability xattr
        # of a file: the user.* xattrs are lost on this path (the fast path keeps them). Exactly that, nothing else.
        lost = {p for p, e in before.items() if any(k.startswith("user.") for k in e.get("xattrs", {}))}
        assert lost == {"/opt/owned", "/opt/newdir"}
        assert all("xattrs" not in after[p] for p in lost)
        after = {p: e if p not in lost else {**e, "xattrs": before[p]["xattrs"]} for p, e in after.items()}
    differences = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert differences == [], [(p, before.get(p), after.get(p)) for p in differences[:20]]
    # the changes are there at all (a listing that missed them would compare equal too)
    assert before["/srv/becomes-a-file"]["sha256"]
    assert "/opt/tree/b.txt" not in before and "/usr/share/doc/bash" not in before
    assert before["/opt/owned"]["xattrs"] == {"user.comment": b"a student's note".hex()}
    assert before["/opt/newdir/hard-1"]["hardlinks"] == ["/opt/hard-3", "/opt/newdir/hard-1", "/opt/newdir/hard-2"]
    assert before["/usr/local/bin/setuid-tool"]["mode"] == 0o4755
    assert before["/opt/latin1-\udce9t\udce9"]["size"] == 9
    assert "/srv/roundtrip/old" not in before and "/srv/roundtrip/new" in before
    RESTORED[path] = after
    if len(RESTORED) == 2:  # the fast path and the fallback restore the same tree
        assert RESTORED["overlay-upperdir"] == RESTORED["commit-save"]


STEPS = [
    # a file changed without its size changing, its mtime put back (only its ctime says so)
    r"""
import os
st = os.stat("/opt/tree/a.txt")
data = open("/opt/tree/a.txt", "rb").read()
open("/opt/tree/a.txt", "r+b").write(data[:10].upper())
os.utime("/opt/tree/a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
""",
    # a file replaced by another with the same mtime (and size), in the image and in the writable layer
    r"""
import os
for path in ("/opt/mode-only.sh", "/opt/newdir/deeper/deepest/data.bin"):
    st = os.stat(path)
    data = open(path, "rb").read()
    open(path + ".new", "wb").write(bytes(reversed(data)))
    os.utime(path + ".new", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(path + ".new", path)
""",
    # a folder deleted and made again: one of the image (opaque then) and one of the writable layer
    r"""
import os, shutil
shutil.rmtree("/srv/roundtrip")
os.makedirs("/srv/roundtrip/other")
open("/srv/roundtrip/other/file", "w").write("made again")
shutil.rmtree("/opt/newdir/deeper")
os.makedirs("/opt/newdir/deeper")
open("/opt/newdir/deeper/again.txt", "w").write("a new folder of the same name")
""",
    # a hard link added to an unchanged file; a file of the writable layer and one of the image deleted
    r"""
import os
os.link("/etc/gpulab-added.conf", "/opt/added-link")
os.remove("/opt/a file with spaces.txt")
os.remove("/etc/debian_version")
""",
]


def test_incremental_backups_restore_the_tree_of_each_backup(base_image, tmp_path):
    """Several fast-path backups with changes between them: each one a layer of changes over the first, read while the
    container is paused; every backup restores the tree it was taken of."""
    name = f"gpulab-unittest-tree-inc-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    sh("docker", "run", "-d", "--name", name, "--label", "io.gpulab.harness=1", base_image)
    trees, results = [], []
    try:
        py(name, CHANGES)
        for step in [None, *STEPS]:
            if step:
                py(name, step)
            trees.append(tree(name))
            result = run_module(
                container_backup, {"container": name, "store": str(store), "include_workdir": False, "keep_last": 9}
            )
            assert result["path_taken"] == "overlay-upperdir", result["path_reason"]
            results.append(result)
        manifests = [json.loads(Path(r["manifest"]).read_text()) for r in results]
        base = len(manifests[0]["layers"]) - 1
        for i, manifest in enumerate(manifests[1:], 1):
            layers = [layer["diff_id"] for layer in manifest["layers"]]
            assert layers[: base + 1] == [layer["diff_id"] for layer in manifests[0]["layers"]]  # the first kept
            assert len(layers) == base + 1 + i  # and a layer of changes for each backup since
            assert results[i]["bytes_read"] < 2_000_000, results[i]  # the changes, not the writable layer
        remove_container(name)
        sh("docker", "rmi", "-f", base_image)
        remove_images_of(name)
        for expected, result in reversed(list(zip(trees, results))):
            run_module(container_restore, {"container": name, "store": str(store), "backup": result["backup_id"],
                                           "force": True})  # fmt: skip
            after = tree(name)
            differences = sorted(p for p in set(expected) | set(after) if expected.get(p) != after.get(p))
            assert differences == [], (
                result["backup_id"],
                [(p, expected.get(p), after.get(p)) for p in differences[:20]],
            )
    finally:
        remove_container(name)
        remove_images_of(name)
    # the changes are there at all
    assert trees[1]["/opt/tree/a.txt"]["sha256"] != trees[0]["/opt/tree/a.txt"]["sha256"]
    assert trees[1]["/opt/tree/a.txt"]["size"] == trees[0]["/opt/tree/a.txt"]["size"]
    assert trees[2]["/opt/mode-only.sh"]["sha256"] != trees[1]["/opt/mode-only.sh"]["sha256"]
    assert "/srv/roundtrip/other/file" in trees[3] and "/srv/roundtrip/new" not in trees[3]
    assert "/opt/newdir/deeper/deepest" not in trees[3] and "/opt/newdir/deeper/again.txt" in trees[3]
    assert trees[4]["/opt/added-link"]["hardlinks"] == ["/etc/gpulab-added.conf", "/opt/added-link"]
    assert "/etc/debian_version" not in trees[4] and "/etc/debian_version" in trees[3]
