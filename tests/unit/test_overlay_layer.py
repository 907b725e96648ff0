"""Tests of module_utils/backup/overlay.py: an overlay upper directory made here, written as a layer tar and read back
with Python's tarfile; and the member-aligned content-defined chunker.

Run as root (mknod, chown, trusted.* xattrs); cases the filesystem here refuses are skipped, not failed.
"""

import errno
import hashlib
import io
import os
import socket
import stat
import tarfile
import threading

import pytest

from ansible_collections.gpulab.lab.plugins.module_utils.backup import overlay as go

SPACED = "a file with spaces.txt"
NON_ASCII = "données_日本語_ß.txt"


def sha(data):
    return hashlib.sha256(data).hexdigest()


def try_setxattr(path, name, value):
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return False
        raise
    return True


@pytest.fixture
def upper(tmp_path):
    """A fake overlay upper directory; returns (path, expectations)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mknod, chown)")
    root = tmp_path / "upper"
    root.mkdir()
    exp = {"xattr": False, "opaque": False}
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (root / "home" / "student").mkdir(parents=True)
    (root / "home" / "student" / SPACED).write_bytes(b"spaces\n")
    (root / "home" / "student" / NON_ASCII).write_bytes("non-ascii ✓\n".encode())
    # A whiteout: the file "gone" of a lower layer was deleted.
    os.mknod(root / "etc" / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    # An opaque directory: its lower contents are hidden; one new file inside.
    (root / "opt" / "replaced").mkdir(parents=True)
    (root / "opt" / "replaced" / "new.txt").write_bytes(b"new\n")
    exp["opaque"] = try_setxattr(root / "opt" / "replaced", "trusted.overlay.opaque", b"y")
    # An overlay-private xattr that must not come through, on another directory.
    try_setxattr(root / "etc", "trusted.overlay.origin", b"\x00\xfb")
    # A user xattr, binary value included.
    exp["xattr"] = try_setxattr(root / "etc" / "passwd", "user.note", b"hello \xff\x00 world")
    os.symlink("../etc/passwd", root / "home" / "link")
    (root / "data").mkdir()
    (root / "data" / "first").write_bytes(b"linked content\n")
    os.link(root / "data" / "first", root / "data" / "second")
    (root / "empty").mkdir()
    (root / "bin").mkdir()
    (root / "bin" / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "bin" / "suid", 0o4755)  # noqa: S103 (a mode the layer must keep)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)  # noqa: S103 (a mode the layer must keep)
    (root / "owned").write_bytes(b"owned\n")
    os.chown(root / "owned", 1234, 5678)
    os.chown(root / "empty", 1234, 5678)
    os.mkfifo(root / "fifo")
    # A sparse file: 3 MiB hole, a few bytes, a hole to 5 MiB.
    with open(root / "sparse", "wb") as f:
        f.seek(3 * 1024 * 1024)
        f.write(b"middle")
        f.truncate(5 * 1024 * 1024)
    os.utime(root / "etc" / "passwd", (1_600_000_000, 1_600_000_000))
    return root, exp


def layer_of(root):
    out = io.BytesIO()
    calls = []
    stats = go.write_layer(str(root), out, progress=lambda s: calls.append(s["entries"]))
    data = out.getvalue()
    assert stats["tar_bytes"] == len(data)
    assert stats["diff_id"] == "sha256:" + sha(data)
    assert calls == list(range(1, stats["entries"] + 1))
    return data, stats


def members(data):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        result = {}
        for m in tar.getmembers():
            content = tar.extractfile(m).read() if m.isreg() else None
            result[m.name] = (m, content)
        return result, [m.name for m in tar.getmembers()]


def test_layer_entries(upper):
    root, _ = upper
    data, stats = layer_of(root)
    entries, order = members(data)

    # Names: relative, no "./"; the upper directory itself has no entry.
    assert all(not n.startswith(("/", "./")) for n in order)
    assert "." not in entries and "" not in entries
    # Raw header of a directory: written with a trailing slash, as docker save's layers.
    assert b"etc/\x00" in data

    def reg(name, content, mode=0o644, uid=0, gid=0):
        m, got = entries[name]
        assert m.type == tarfile.REGTYPE, name
        assert stat.S_IMODE(m.mode) == mode, (name, oct(m.mode))
        assert (m.uid, m.gid) == (uid, gid), name
        assert (m.uname, m.gname) == ("", ""), name
        assert sha(got) == sha(content), name
        return m

    passwd = reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    assert passwd.mtime == 1_600_000_000
    reg("home/student/" + SPACED, b"spaces\n")
    reg("home/student/" + NON_ASCII, "non-ascii ✓\n".encode())
    reg("opt/replaced/new.txt", b"new\n")
    reg("bin/suid", b"#!/bin/sh\n", mode=0o4755)
    reg("owned", b"owned\n", uid=1234, gid=5678)
    reg("sparse", b"\0" * (3 * 1024 * 1024) + b"middle" + b"\0" * (2 * 1024 * 1024 - 6))

    # The whiteout: an empty regular file .wh.gone; no character device left.
    wh, content = entries["etc/.wh.gone"]
    assert wh.type == tarfile.REGTYPE and wh.size == 0 and content == b""
    assert "etc/gone" not in entries
    assert not any(m.ischr() for m, _ in entries.values())
    assert stats["whiteouts"] == 1

    # Directories.
    for name, mode in (("etc", 0o755), ("empty", 0o755), ("tmp", 0o1777), ("opt/replaced", 0o755)):
        m, _ = entries[name]
        assert m.type == tarfile.DIRTYPE, name
        assert stat.S_IMODE(m.mode) == mode, (name, oct(m.mode))
    assert (entries["empty"][0].uid, entries["empty"][0].gid) == (1234, 5678)
    assert not any(n.startswith("empty/") for n in order)

    for m, _ in entries.values():
        assert not any(k.startswith("SCHILY.xattr.trusted.overlay.") for k in m.pax_headers), m.name

    # Symlink, hard link, fifo.
    link, _ = entries["home/link"]
    assert link.issym() and link.linkname == "../etc/passwd"
    first, content = entries["data/first"]
    assert first.isreg() and content == b"linked content\n"
    second, _ = entries["data/second"]
    assert second.islnk() and second.linkname == "data/first"
    assert stats["hardlinks"] == 1
    assert entries["fifo"][0].isfifo()

    # Order: sorted names, each directory before its contents.
    for i, name in enumerate(order):
        parent = os.path.dirname(name)
        if parent:
            assert parent in order[:i], name
    top = [n for n in order if "/" not in n]
    assert top == sorted(top)


def test_opaque_directory(upper):
    root, exp = upper
    if not exp["opaque"]:
        pytest.skip("the filesystem here refuses trusted.* xattrs")
    data, stats = layer_of(root)
    entries, order = members(data)
    m, content = entries["opt/replaced/.wh..wh..opq"]
    assert m.type == tarfile.REGTYPE and m.size == 0 and content == b""
    assert stat.S_IMODE(m.mode) == 0o755
    assert order.index("opt/replaced") < order.index("opt/replaced/.wh..wh..opq") < order.index("opt/replaced/new.txt")
    assert stats["opaque_dirs"] == 1
    assert not any(k.startswith("SCHILY.xattr.trusted.overlay.") for k in entries["opt/replaced"][0].pax_headers)


def test_user_xattr(upper):
    root, exp = upper
    if not exp["xattr"]:
        pytest.skip("the filesystem here refuses user.* xattrs")
    entries, _ = members(layer_of(root)[0])
    value = entries["etc/passwd"][0].pax_headers["SCHILY.xattr.user.note"]
    assert value.encode("utf-8", "surrogateescape") == b"hello \xff\x00 world"


def test_layer_is_deterministic(upper):
    root, _ = upper
    assert layer_of(root)[0] == layer_of(root)[0]


def test_layer_streams_to_a_pipe(upper):
    """A write-only, unseekable output works (the layer goes straight into a hash or compressor)."""
    root, _ = upper
    r, w = os.pipe()
    received = []
    reader = threading.Thread(target=lambda: received.append(os.fdopen(r, "rb").read()))
    reader.start()
    with os.fdopen(w, "wb") as out:
        stats = go.write_layer(root, out)
    reader.join()
    assert len(received[0]) == stats["tar_bytes"]
    assert "sha256:" + sha(received[0]) == stats["diff_id"]


def test_socket_is_skipped(tmp_path):
    (tmp_path / "u").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "u" / "sock"))
        (tmp_path / "u" / "file").write_bytes(b"x")
        data = io.BytesIO()
        stats = go.write_layer(tmp_path / "u", data)
    finally:
        sock.close()
    assert stats["skipped_sockets"] == 1
    names, _ = members(data.getvalue())
    assert list(names) == ["file"]


def test_metacopy_is_refused(tmp_path):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "f").write_bytes(b"")
    if not try_setxattr(tmp_path / "u" / "f", "trusted.overlay.metacopy", b""):
        pytest.skip("the filesystem here refuses trusted.* xattrs")
    with pytest.raises(go.UnsupportedOverlay):
        go.write_layer(tmp_path / "u", io.BytesIO())


# ---- chunker -------------------------------------------------------------------------------------------------------

SIZES = {"min_size": 16 * 1024, "max_size": 128 * 1024, "piece": 32 * 1024}


def pseudo_random(size, seed):
    """Random-looking bytes, the same on every run."""
    return hashlib.shake_256(seed).digest(size)


def tree(root, files):
    """files: name -> bytes, written below root (folders made as needed), all with the same mtime."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for path in [root, *root.rglob("*")]:
        os.utime(path, (1_700_000_000, 1_700_000_000))
    return root


def chunked(root):
    """(chunks, layer bytes, stats) of write_layer through a MemberChunker."""
    got = []

    class Out:
        def __init__(self):
            self.chunker = go.MemberChunker(got.append, **SIZES)
            self.layer = io.BytesIO()

        def write(self, data):
            self.layer.write(data)
            return self.chunker.write(data)

        def mark(self, name, size):
            self.chunker.mark(name, size)

    out = Out()
    stats = go.write_layer(root, out)
    out.chunker.close()
    return got, out.layer.getvalue(), stats


def small_files(count, seed):
    return {
        f"lib/pkg{i % 7}/module_{i:04d}.py": pseudo_random(2000 + (i * 37) % 3000, seed + b"%d" % i)
        for i in range(count)
    }


def test_chunks_join_into_the_layer_and_are_bounded(tmp_path):
    files = small_files(300, b"a")
    files["data/weights.bin"] = pseudo_random(200 * 1024, b"w")  # a large file: pieces of its own
    got, layer, stats = chunked(tree(tmp_path / "u", files))
    assert b"".join(got) == layer
    assert "sha256:" + sha(layer) == stats["diff_id"]
    assert len(got) > 5
    for chunk in got:
        assert len(chunk) <= SIZES["max_size"] + 8 * 1024  # at most one small member past max_size
    pieces = [c for c in got if b"weights.bin" in c[:1024]]
    assert len(pieces) == 1 and len(pieces[0]) == SIZES["piece"]  # the large file's first piece starts at its header
    assert chunked(tmp_path / "u")[0] == got  # the same tree, the same chunks


@pytest.mark.parametrize(
    "change",
    ["add a file", "modify a small file", "delete a file", "modify a large file in place", "append to a large file"],
)
def test_a_small_change_changes_few_chunks(tmp_path, change):
    files = small_files(600, b"b")
    files["data/weights.bin"] = pseudo_random(20 * SIZES["piece"], b"w")
    before, layer_before, _ = chunked(tree(tmp_path / "before", files))
    changed = dict(files)
    if change == "add a file":
        changed["lib/pkg3/new_module.py"] = pseudo_random(3000, b"new")
    elif change == "modify a small file":
        changed["lib/pkg2/module_0300.py"] = pseudo_random(3001, b"mod")
    elif change == "delete a file":
        del changed["lib/pkg4/module_0305.py"]
    elif change == "modify a large file in place":
        data = bytearray(files["data/weights.bin"])
        data[7 * SIZES["piece"] + 100 : 7 * SIZES["piece"] + 200] = b"\xff" * 100
        changed["data/weights.bin"] = bytes(data)
    else:
        changed["data/weights.bin"] = files["data/weights.bin"] + b"tail"
    after, layer_after, _ = chunked(tree(tmp_path / "after", changed))
    assert layer_after != layer_before
    old = {sha(c) for c in before}
    new_bytes = sum(len(c) for c in after if sha(c) not in old)
    # the change itself, and the chunk or two around it (each at most max_size plus a member)
    assert new_bytes <= 2 * (SIZES["max_size"] + 8 * 1024), (change, new_bytes, len(layer_after))
    assert new_bytes < len(layer_after) / 4


def test_chunker_checks_sizes():
    with pytest.raises(ValueError):
        go.MemberChunker(print, min_size=4096, max_size=1024)
