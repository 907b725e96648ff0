"""Tests of the backup package's parts (module_utils/backup/), on archives and stores made here.

docker save streams in both layouts, synthesized (the engine here is Docker 20.10, which writes only the legacy one):
the legacy layout with its layers in the order of their folder names, not of the image; the OCI layout of Docker 25+
(index.json, blobs/sha256, with and without manifest.json, a nested index, a gzip-compressed layer as the containerd
image store keeps them). The store: atomic manifests, retention, garbage collection, leftovers of a killed run, the
checks of a restore. The docker load tar assembled from a store, and (with an engine) loaded for real.
"""

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
from backup_harness import LABEL, needs_docker

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils import files as backup_files
from ansible_collections.gpulab.lab.plugins.module_utils.backup import blobs as backup_blobs
from ansible_collections.gpulab.lab.plugins.module_utils.backup import common as backup_common
from ansible_collections.gpulab.lab.plugins.module_utils.backup import ingest as backup_ingest
from ansible_collections.gpulab.lab.plugins.module_utils.backup import mounts as backup_mounts
from ansible_collections.gpulab.lab.plugins.module_utils.backup import overlay as gpulab_overlay
from ansible_collections.gpulab.lab.plugins.module_utils.backup import restore as restore_job
from ansible_collections.gpulab.lab.plugins.module_utils.backup import settings as run_settings
from ansible_collections.gpulab.lab.plugins.module_utils.backup import store as backup_store
from ansible_collections.gpulab.lab.plugins.module_utils.backup import streams as backup_streams
from ansible_collections.gpulab.lab.plugins.module_utils.backup import verify as backup_verify

# ---- archives made here --------------------------------------------------------------------------------------------


def blob_id(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def member(tar, name, data, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def layer_tar(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            member(tar, name, data)
    return buf.getvalue()


def config_of(layers, env=None):
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": env or ["PATH=/bin"], "Cmd": ["/bin/sleep", "infinity"]},
            "container_config": {"Env": env or ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [blob_id(x) for x in layers]},
        },
        separators=(",", ":"),
    ).encode()


def legacy_archive(layers, config, dirs=None):
    """docker save's legacy layout; dirs: the layer folders' names (Docker sorts the archive by them)."""
    dirs = dirs or [hashlib.sha256(f"v1-{i}".encode()).hexdigest() for i in range(len(layers))]
    buf = io.BytesIO()
    entries = {f"{d}/layer.tar": data for d, data in zip(dirs, layers)}
    entries.update({f"{d}/VERSION": b"1.0" for d in dirs})
    config_name = blob_id(config)[7:] + ".json"
    entries[config_name] = config
    manifest = [{"Config": config_name, "RepoTags": None, "Layers": [f"{d}/layer.tar" for d in dirs]}]
    entries["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(entries):
            member(tar, name, entries[name])
    return buf.getvalue()


def oci_archive(layers, config, gzip_layers=(), with_manifest_json=True, nested=False):
    """docker save's OCI layout (Docker 25+); layers whose index is in gzip_layers are stored gzip-compressed."""
    blobs, descriptors = {}, []
    for i, data in enumerate(layers):
        stored = gzip.compress(data, mtime=0) if i in gzip_layers else data
        blobs[blob_id(stored)] = stored
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if i in gzip_layers else "")
        descriptors.append({"mediaType": media, "digest": blob_id(stored), "size": len(stored)})
    blobs[blob_id(config)] = config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob_id(config)},
            "layers": descriptors,
        }
    ).encode()
    blobs[blob_id(manifest)] = manifest
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob_id(manifest)}
    if nested:
        inner = json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode()
        blobs[blob_id(inner)] = inner
        desc = {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": blob_id(inner)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for digest, data in sorted(blobs.items()):
            member(tar, "blobs/sha256/" + digest[7:], data)
        member(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        member(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode())
        if with_manifest_json:
            legacy = [
                {
                    "Config": "blobs/sha256/" + blob_id(config)[7:],
                    "RepoTags": ["gpulab-unittest/oci:1"],
                    "Layers": ["blobs/sha256/" + d["digest"][7:] for d in descriptors],
                }
            ]
            member(tar, "manifest.json", json.dumps(legacy).encode())
    return buf.getvalue()


def sample_layers():
    return [
        layer_tar({"etc/base.txt": b"base\n" * 1000}),
        layer_tar({"opt/big.bin": os.urandom(300_000), "opt/readme": b"r"}),
        layer_tar({"root/change.txt": f"{uuid.uuid4()}\n".encode() * 50}),
    ]


@pytest.fixture
def store(tmp_path):
    s = backup_store.Store(str(tmp_path / "store"), create=True)
    s.create()
    return s


def decompressed(store, blob):
    return subprocess.run(["zstd", "-dc", store.blob_path(blob["digest"])], capture_output=True, check=True).stdout


def ingest(store, archive, expected=None, known=None, guess=True):
    reader = backup_ingest.SaveIngest(store, {} if known is None else known, expected=expected, guess_by_size=guess)
    config, layers = reader.read(io.BytesIO(archive))
    return reader, config, layers


# ---- reading docker save streams -----------------------------------------------------------------------------------


def test_legacy_layout_layers_come_in_folder_order_and_are_put_back_in_image_order(store):
    layers = sample_layers()
    config = config_of(layers)
    # Folder names sorted against the image order: the stream has layer 3, then 1, then 2.
    archive = legacy_archive(layers, config, dirs=["bbbb", "cccc", "aaaa"])
    expected = [blob_id(x) for x in layers]
    reader, got_config, got = ingest(store, archive, expected=expected)
    assert got_config == config
    assert [x["diff_id"] for x in got] == expected
    for data, layer in zip(layers, got):
        assert layer["new"] is True
        assert layer["size"] == len(data)
        assert decompressed(store, layer["blobs"][0]) == data
        assert layer["blobs"][0]["stored_digest"] == backup_files.file_sha256(store.blob_path(layer["diff_id"]))
    assert reader.bytes_written == sum(x["blobs"][0]["stored_size"] for x in got)
    assert os.listdir(store.tmp) == []


def test_legacy_layout_known_layers_are_read_through_not_written(store):
    layers = sample_layers()
    expected = [blob_id(x) for x in layers]
    _, _, first = ingest(store, legacy_archive(layers[:2], config_of(layers[:2])), expected=expected[:2])
    known = {x["diff_id"]: x["blobs"][0] for x in first}
    reader, _, second = ingest(store, legacy_archive(layers, config_of(layers)), expected=expected, known=known)
    assert [x["new"] for x in second] == [False, False, True]
    assert [x["guessed"] for x in second] == [True, True, False]
    assert reader.bytes_written == second[2]["blobs"][0]["stored_size"]
    assert reader.reader.bytes_read == len(legacy_archive(layers, config_of(layers)))


def test_a_wrong_guess_by_size_is_caught_and_reading_again_hashes_all(store):
    old = layer_tar({"a.txt": b"A" * 5000})
    new = layer_tar({"b.txt": b"B" * 5000})  # another layer of exactly the same size
    assert len(old) == len(new)
    _, _, first = ingest(store, legacy_archive([old], config_of([old])), expected=[blob_id(old)])
    known = {first[0]["diff_id"]: first[0]["blobs"][0]}
    archive = legacy_archive([old, new], config_of([old, new]), dirs=["bbbb", "aaaa"])  # new comes first
    with pytest.raises(backup_ingest.GuessedWrong):
        ingest(store, archive, expected=[blob_id(old), blob_id(new)], known=dict(known))
    _, _, got = ingest(store, archive, expected=[blob_id(old), blob_id(new)], known=dict(known), guess=False)
    assert [x["diff_id"] for x in got] == [blob_id(old), blob_id(new)]
    assert [x["new"] for x in got] == [False, True]


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("with_manifest_json", [True, False])
def test_oci_layout(store, nested, with_manifest_json):
    layers = sample_layers()
    config = config_of(layers)
    archive = oci_archive(layers, config, gzip_layers={1}, with_manifest_json=with_manifest_json, nested=nested)
    expected = [blob_id(x) for x in layers]
    _, got_config, got = ingest(store, archive, expected=expected)
    assert got_config == config
    assert [x["diff_id"] for x in got] == expected
    for data, layer in zip(layers, got):
        assert decompressed(store, layer["blobs"][0]) == data
    # The gzip layer is stored by the digest of its content, not of the compressed blob.
    assert got[1]["compressed_digest"] != got[1]["diff_id"]
    # Again, with the layers known: nothing is written.
    known = {x["diff_id"]: x["blobs"][0] for x in got}
    plain = oci_archive(layers, config, with_manifest_json=with_manifest_json, nested=nested)
    again, _, second = ingest(store, plain, expected=expected, known=known)
    assert again.bytes_written == 0
    assert [x["new"] for x in second] == [False, False, False]


def test_a_stream_whose_layer_does_not_match_its_config_is_refused(store):
    layers = sample_layers()
    config = config_of([layers[0], layers[1], layer_tar({"other": b"x"})])
    with pytest.raises(backup_common.BackupError, match=r"layer 3 .* has digest .* the config says"):
        ingest(store, legacy_archive(layers, config))


@pytest.mark.parametrize("cut", [0.01, 0.5, 0.9])
def test_a_truncated_stream_is_refused(store, cut):
    layers = sample_layers()
    archive = legacy_archive(layers, config_of(layers))
    with pytest.raises(backup_common.BackupError, match=r"truncated|end-of-archive"):
        ingest(store, archive[: int(len(archive) * cut)])
    assert os.listdir(store.tmp) == []  # the blob being written is removed


def test_a_stream_without_manifest(store):
    with pytest.raises(backup_common.BackupError, match=r"no manifest\.json, no index\.json"):
        ingest(store, layer_tar({"readme": b"not docker save"}))


def test_tar_reader_long_names_pax_and_gnu():
    names = ["short", "d/" + "x" * 150, "p/" + "ü" * 80]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for i, name in enumerate(names):
                member(tar, name, str(i).encode() * (i * 700))
        reader = backup_streams.TarReader(io.BytesIO(buf.getvalue()))
        seen = [(m.name, b"".join(reader.data())) for m in reader.members()]
        assert seen == [(n, str(i).encode() * (i * 700)) for i, n in enumerate(names)]
        assert reader.bytes_read == len(buf.getvalue())


# ---- the docker load tar -------------------------------------------------------------------------------------------


def test_load_tar_from_the_store(store):
    layers = sample_layers()
    config = config_of(layers)
    _, _, got = ingest(store, legacy_archive(layers, config), expected=[blob_id(x) for x in layers])
    for skip in (0, 2):
        data = b"".join(iter(restore_job.LoadTar(store, config, got, "gpulab-backup/t:1", skip=skip).read, b""))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            manifest = json.loads(tar.extractfile("manifest.json").read())
            assert manifest[0]["RepoTags"] == ["gpulab-backup/t:1"]
            assert tar.extractfile(manifest[0]["Config"]).read() == config
            for i, (name, original) in enumerate(zip(manifest[0]["Layers"], layers)):
                assert tar.extractfile(name).read() == (b"" if i < skip else original)


def test_load_tar_breaks_off_before_the_manifest_when_a_layer_is_corrupt(store):
    layers = sample_layers()
    config = config_of(layers)
    _, _, got = ingest(store, legacy_archive(layers, config), expected=[blob_id(x) for x in layers])
    got[2] = dict(got[2], diff_id=blob_id(b"something else"))
    stream = restore_job.LoadTar(store, config, got, "gpulab-backup/t:1")
    sent = []
    with pytest.raises(backup_common.BackupError, match="is corrupt"):
        for block in iter(stream.read, b""):
            sent.append(block)
    assert b"manifest.json" not in b"".join(sent)


@needs_docker
def test_an_oci_archive_stored_and_loaded_into_the_engine(store):
    """OCI layout (as Docker 25+ writes it) -> store -> docker load tar -> the engine: same image ID."""
    layers = [layer_tar({"hello.txt": f"hello {uuid.uuid4()}\n".encode()}), layer_tar({"b/c.txt": b"c" * 9000})]
    config = json.loads(config_of(layers))
    config["config"]["Labels"] = dict([LABEL.split("=", 1)])
    config = json.dumps(config).encode()
    _, got_config, got = ingest(store, oci_archive(layers, config, gzip_layers={0}))
    name = f"gpulab-backup/unittest-oci:{uuid.uuid4().hex[:8]}"
    engine = api.Engine()
    try:
        engine.load(restore_job.LoadTar(store, got_config, got, name))
        assert engine.image(name)["Id"] == blob_id(config)
        assert engine.image(name)["RootFS"]["Layers"] == [blob_id(x) for x in layers]
    finally:
        subprocess.run(["docker", "rmi", "-f", name], capture_output=True, check=False)


# ---- the store -----------------------------------------------------------------------------------------------------


def a_manifest(store, container, backup_id, layers, created):
    _, config, got = ingest(store, legacy_archive(layers, config_of(layers)), expected=[blob_id(x) for x in layers])
    manifest = {
        "format": backup_common.FORMAT,
        "version": backup_common.FORMAT_VERSION,
        "id": backup_id,
        "container": container,
        "created": created,
        "image": {"id": blob_id(config), "config": config.decode()},
        "layers": [{"diff_id": x["diff_id"], "size": x["size"], "blobs": x["blobs"]} for x in got],
        "mounts": [],
        "run_settings": {},
    }
    store.write_manifest(manifest)
    return manifest


def test_retention_keeps_the_newest_and_the_newest_complete_and_collects_garbage(store):
    base = layer_tar({"base": b"b" * 3000})
    tops = [layer_tar({"top": f"{i}".encode() * 3000}) for i in range(4)]
    manifests = [a_manifest(store, "alice", f"2025010{i}T000000Z-00000{i}", [base, tops[i]], i) for i in range(4)]
    a_manifest(store, "bob", "20250101T000000Z-0000bb", [base], 0)
    # The two newest lose a blob: incomplete. keep_last 1 keeps the newest and the newest complete one (#1).
    for m in manifests[2:]:
        os.unlink(store.blob_path(m["layers"][1]["diff_id"]))
    removed, blobs, _, warnings = store.retention("alice", 1)
    assert warnings == []
    assert removed == [manifests[0]["id"], manifests[2]["id"]]
    assert store.backup_ids("alice") == [manifests[1]["id"], manifests[3]["id"]]
    assert blobs == [manifests[0]["layers"][1]["diff_id"]]  # only the removed backup's own top layer
    assert os.path.exists(store.blob_path(blob_id(base)))  # still used by alice #1 and bob
    # The newest is incomplete: refused by name, the complete one named, never taken on its own; asked for, it is.
    with pytest.raises(backup_common.BackupError) as refused:
        store.pick("alice")
    assert f"the newest backup of container alice, {manifests[3]['id']}, cannot be restored" in str(refused.value)
    assert f"Complete backups of alice, newest first: {manifests[1]['id']}" in str(refused.value)
    assert store.pick("alice", manifests[1]["id"]).manifest["id"] == manifests[1]["id"]
    with pytest.raises(backup_common.BackupError, match="keep_last must be at least 1"):
        store.retention("alice", 0)


def test_no_complete_backup_names_the_missing_blob(store):
    layers = sample_layers()[:1]
    manifest = a_manifest(store, "carol", "20250101T000000Z-aaaaaa", layers, 1)
    os.unlink(store.blob_path(manifest["layers"][0]["diff_id"]))
    with pytest.raises(
        backup_common.BackupError,
        match=rf"lacks: layer 1 .*{manifest['layers'][0]['diff_id']} is missing.*No other backup of carol .*complete",
    ):
        store.pick("carol")
    with pytest.raises(backup_common.BackupError, match="has no backup nope of container carol"):
        store.pick("carol", "nope")
    with pytest.raises(backup_common.BackupError, match="has no backup of container dave"):
        store.pick("dave")


def test_leftovers_of_a_killed_run_are_cleaned(store):
    Path(store.tmp, "blob-x.tmp").write_bytes(b"")
    os.mkdir(os.path.join(store.tmp, "somedir"))
    assert sorted(store.clean_tmp()) == ["blob-x.tmp", "somedir"]
    assert os.listdir(store.tmp) == []


def test_store_paths(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(backup_common.BackupError, match="exists and is not a directory"):
        backup_store.Store(str(afile), create=True)
    with pytest.raises(backup_common.BackupError, match="does not exist"):
        backup_store.Store(str(tmp_path / "none"))
    with pytest.raises(backup_common.BackupError, match="absolute path"):
        backup_store.Store("relative/store")
    with pytest.raises(backup_common.BackupError, match="not valid"):
        backup_store.Store(str(tmp_path), create=True).manifest_path("../etc", "x")


def test_verify_names_corrupt_and_missing_blobs(store):
    layers = sample_layers()
    manifest = a_manifest(store, "erin", "20250101T000000Z-eeeeee", layers, 1)
    figures = backup_verify.verify_backup(store, manifest)
    assert figures.blobs == 3
    assert figures.content_bytes == sum(len(x) for x in layers)
    digest = manifest["layers"][1]["diff_id"]
    path = store.blob_path(digest)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(path, 0o600)
    Path(path).write_bytes(bytes(data))
    with pytest.raises(backup_common.BackupError, match=rf"layer 2 .*blob {digest} is corrupt \(its file has"):
        backup_verify.verify_backup(store, manifest, layer_content=False, found_by=None)  # as in check mode
    assert Path(path).read_bytes() == bytes(data)  # left where it is
    with pytest.raises(backup_common.BackupError, match=rf"layer 2 .*blob {digest} is corrupt .*moved to"):
        backup_verify.verify_backup(store, manifest, layer_content=False)
    # The restore's verification moved it to quarantine: the backup now lacks it, and names why.
    assert not os.path.exists(path)
    assert Path(store.quarantine_copy(digest)).read_bytes() == bytes(data)
    with pytest.raises(
        backup_common.BackupError, match=f"blob {digest} is damaged .quarantined: .*found by the restore"
    ):
        backup_verify.verify_backup(store, manifest)
    os.unlink(store.quarantine_copy(digest) + ".json")
    with pytest.raises(backup_common.BackupError, match=f"blob {digest} is missing"):
        backup_verify.verify_backup(store, manifest)


# ---- run settings, secrets, paths ----------------------------------------------------------------------------------


def test_secrets_are_left_out_unless_the_image_has_them():
    env = ["PATH=/bin", "JUPYTER_TOKEN=abc", "GPG_KEY=public", "my_password=x", "HOME=/root"]
    kept, left_out = run_settings.split_env(env, ["PATH=/bin", "GPG_KEY=public"], run_settings.DEFAULT_SECRET_ENV)
    assert kept == ["PATH=/bin", "GPG_KEY=public", "HOME=/root"]
    assert left_out == ["JUPYTER_TOKEN", "my_password"]
    config = config_of(sample_layers(), env=env)
    redacted = json.loads(run_settings.redact_config(config, set(left_out)))
    assert redacted["config"]["Env"] == kept
    assert redacted["container_config"]["Env"] == kept
    assert run_settings.redact_config(config, set()) is config


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/var/run/docker.sock", "a system path"),
        ("/run/user/0", "a system path"),
        ("/proc/1", "a system path"),
        ("/dev/shm", "a system path"),
        ("/", "top-level"),
        ("/home", "top-level"),
        ("/etc/localtime", "system"),  # a file of /etc (a link into /usr/share)
        ("/etc/hostname", "system file of /etc"),
        ("/var/lib/docker/volumes/x", "a system path"),
        ("/etc/gpulab/notebook/alice", None),
        ("/srv/notebooks/alice", None),
    ],
)
def test_system_paths(path, why):
    reason = backup_mounts.system_path_reason(path)
    assert (reason is None) if why is None else (why in reason)


def test_backup_tag():
    assert backup_common.backup_tag("Alice_Notebook.1", "20250101T000000Z-abc123") == (
        "gpulab-backup/alice-notebook-1",
        "20250101T000000Z-abc123",
    )


# ---- bind-mount sources --------------------------------------------------------------------------------------------


def test_archive_and_restore_a_work_directory(store, tmp_path):
    work = tmp_path / "srv" / "alice"
    (work / "sub").mkdir(parents=True)
    (work / "notebook.ipynb").write_text("{}")
    (work / "sub" / "data.bin").write_bytes(os.urandom(50_000))
    os.symlink("notebook.ipynb", work / "link")
    os.chown(work / "notebook.ipynb", 1234, 2345)
    os.chmod(work / "sub", 0o750)  # noqa: S103 (a mode to restore)
    config = tmp_path / "jupyter.json"
    config.write_text('{"token": "x"}')
    os.chown(config, 1234, 1234)
    os.chmod(config, 0o400)
    mounts = [
        {"source": str(work), "destination": "/workspace", "read_only": False, "kind": "directory"},
        {"source": str(config), "destination": "/etc/jupyter.json", "read_only": True, "kind": "file"},
    ]
    entries = [backup_mounts.archive_mount(store, m, {}, 3) for m in mounts]
    assert all(e[1] > 0 and e[2] > 0 for e in entries)  # read and written
    # Unchanged: the previous archive is reused, nothing read or written.
    again = backup_mounts.archive_mount(store, mounts[0], {str(work): entries[0][0]}, 3)
    assert again[0]["reused"] is True
    assert again[1:3] == (0, 0)
    (work / "notebook.ipynb").write_text('{"cells": []}')
    changed = backup_mounts.archive_mount(store, mounts[0], {str(work): entries[0][0]}, 3)
    assert changed[0]["reused"] is False
    assert changed[0]["signature"] != entries[0][0]["signature"]
    # Wiped, then restored: content, owners, modes, the symlink.
    subprocess.run(["rm", "-rf", str(tmp_path / "srv"), str(config)], check=True)
    for entry in (changed[0], entries[1][0]):
        backup_mounts.restore_mount(store, entry)
    assert (work / "notebook.ipynb").read_text() == '{"cells": []}'
    st = os.stat(work / "notebook.ipynb")
    assert (st.st_uid, st.st_gid) == (1234, 2345)
    assert stat.S_IMODE(os.stat(work / "sub").st_mode) == 0o750
    assert os.readlink(work / "link") == "notebook.ipynb"
    assert len((work / "sub" / "data.bin").read_bytes()) == 50_000
    assert config.read_text() == '{"token": "x"}'
    assert (os.stat(config).st_uid, stat.S_IMODE(os.stat(config).st_mode)) == (1234, 0o400)


def test_a_mount_under_a_system_path_is_not_restored(store):
    with pytest.raises(backup_common.BackupError, match="not restored: /proc/x is under /proc"):
        backup_mounts.restore_mount(store, {"source": "/proc/x", "blobs": []})


def test_a_blob_that_backups_describe_is_never_replaced(store, tmp_path):
    """The same content again at another compression level: the stored chunk stays (the older backup's stored checksum
    is that of its bytes), and only the listing's chunk with the file's new ctime is written."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("same content\n" * 1000)
    mount = {"source": str(work), "destination": "/work", "read_only": False, "kind": "directory"}
    entry, _, written, _ = backup_mounts.archive_mount(store, mount, {}, 1)
    assert written > 0
    manifest = {"format": backup_common.FORMAT, "version": 1, "id": "20250101T000000.000Z-a", "container": "frank",
                "created": 1, "layers": [], "mounts": [entry]}  # fmt: skip
    store.write_manifest(manifest)
    os.chmod(work / "a.txt", 0o644)  # a new ctime: another listing, the same content
    again, _, written, _ = backup_mounts.archive_mount(store, mount, {}, 19, known=store.blob_index())
    assert written == sum(b["stored_size"] for b in again["index"])
    content = [b for b in entry["blobs"] if b not in entry["index"]]
    assert content and [b for b in again["blobs"] if b not in again["index"]] == content
    assert backup_verify.verify_backup(store, manifest).blobs == len(entry["blobs"])


def test_a_layer_of_several_blobs_loads_as_one(store):
    """The manifest's layer is a list of blobs (one per layer today; content-defined chunks later): verify and the
    docker load tar take the layer as their concatenation."""
    layers = sample_layers()
    config = config_of(layers)
    parts = []
    for piece in (layers[1][:100_000], layers[1][100_000:]):
        with backup_blobs.BlobWriter(store) as writer:
            writer.write(piece)
            blob = writer.finish()
            parts.append(store.keep(writer, blob, {})[0])
    _, _, got = ingest(store, legacy_archive(layers, config), expected=[blob_id(x) for x in layers])
    got[1] = {"diff_id": blob_id(layers[1]), "size": len(layers[1]), "blobs": parts}
    manifest = {"id": "x", "container": "gina", "layers": got, "mounts": []}
    assert backup_verify.verify_backup(store, manifest).blobs == 4
    data = b"".join(iter(restore_job.LoadTar(store, config, got, "gpulab-backup/t:1").read, b""))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = json.loads(tar.extractfile("manifest.json").read())[0]["Layers"]
        assert tar.extractfile(names[1]).read() == layers[1]


# ---- the fast path's chunked layers --------------------------------------------------------------------------------

SMALL_CHUNKS = {"min_size": 16 * 1024, "max_size": 64 * 1024, "piece": 32 * 1024}


def a_tree(root, count, seed):
    for i in range(count):
        path = root / f"pkg{i % 5}" / f"m{seed}-{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(3000 + i * 50))
    (root / f"weights-{seed}.bin").write_bytes(os.urandom(200_000))  # a large file: its own pieces
    return root


def stored_files(store):
    return sorted(os.listdir(store.blobs))


def test_chunked_layer_writer_stores_each_chunk_once_and_leaves_nothing_behind(store, tmp_path, monkeypatch):
    monkeypatch.setattr(
        backup_blobs.ChunkedLayerWriter, "BATCH_FILES", 3
    )  # several zstd batches, some running meanwhile
    syncs = []
    real_sync = backup_blobs.sync_filesystem
    monkeypatch.setattr(backup_blobs, "sync_filesystem", lambda path: syncs.append(path) or real_sync(path))
    tree = a_tree(tmp_path / "upper", 80, "a")
    layer = io.BytesIO()
    gpulab_overlay.write_layer(tree, layer)

    known = {}
    writer = backup_blobs.ChunkedLayerWriter(store, known, **SMALL_CHUNKS)
    stats = gpulab_overlay.write_layer(tree, writer)
    blobs, written = writer.finish()
    assert writer.chunks_new > 6 and len(blobs) == writer.chunks_new + writer.chunks_reused
    assert b"".join(decompressed(store, b) for b in blobs) == layer.getvalue()
    assert stats["diff_id"] == blob_id(layer.getvalue())
    assert written == sum(os.path.getsize(store.blob_path(d)) for d in {b["digest"] for b in blobs})
    assert all(b["stored_digest"] == backup_files.file_sha256(store.blob_path(b["digest"])) for b in blobs)
    assert syncs == [store.tmp]  # one syncfs for all the chunks, before they were renamed into blobs/
    assert os.listdir(store.tmp) == []

    # The same tree again: every chunk is known, nothing is written, nothing synced.
    again = backup_blobs.ChunkedLayerWriter(store, known, **SMALL_CHUNKS)
    gpulab_overlay.write_layer(tree, again)
    assert again.finish() == (blobs, 0)
    assert (again.chunks_new, syncs) == (0, [store.tmp])

    # A layer given up halfway (the fast path falls back): its chunks, compressed or not, leave no trace.
    before = stored_files(store)
    a_tree(tree, 60, "b")
    abandoned = backup_blobs.ChunkedLayerWriter(store, known, **SMALL_CHUNKS)
    gpulab_overlay.write_layer(tree, abandoned)
    assert abandoned.chunks_new > 3 and os.listdir(store.tmp)  # chunk files were there
    abandoned.abort()
    assert os.listdir(store.tmp) == []
    assert stored_files(store) == before


def chunked_manifest(store, count):
    """A manifest whose one layer is `count` small blobs (a chunked writable layer)."""
    pieces = [os.urandom(5000 + i) for i in range(count)]
    blobs = []
    for piece in pieces:
        with backup_blobs.BlobWriter(store) as writer:
            writer.write(piece)
            blobs.append(store.keep(writer, writer.finish(), {})[0])
    data = b"".join(pieces)
    layer = {"diff_id": blob_id(data), "size": len(data), "blobs": blobs}
    return {"id": "x", "container": "hana", "layers": [layer], "mounts": []}, data


def test_chunks_are_verified_in_batches_and_a_bad_one_is_named(store, monkeypatch):
    monkeypatch.setattr(backup_verify, "BATCH_VERIFY_FILES", 3)
    one_by_one = []
    real_verify_blob = backup_verify.verify_blob
    monkeypatch.setattr(
        backup_verify, "verify_blob", lambda *a: one_by_one.append(a[1]["digest"]) or real_verify_blob(*a)
    )
    manifest, _ = chunked_manifest(store, 8)
    blobs = manifest["layers"][0]["blobs"]
    assert backup_verify.verify_backup(store, manifest).blobs == 8
    assert one_by_one == []  # three batches, each through one zstd

    # A blob whose file is damaged, and one whose file matches its stored checksum but holds other content (written
    # wrong): each named, and only it; the batch that held it was checked blob by blob.
    damaged, forged = blobs[1]["digest"], blobs[6]["digest"]
    path = Path(store.blob_path(damaged))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data))
    other = subprocess.run(["zstd", "-q", "-c"], input=os.urandom(5006), capture_output=True, check=True).stdout
    os.chmod(store.blob_path(forged), 0o600)
    Path(store.blob_path(forged)).write_bytes(other)
    blobs[6].update(stored_digest=blob_id(other), stored_size=len(other))
    with pytest.raises(backup_common.BackupError) as refused:
        backup_verify.verify_backup(store, manifest)
    message = str(refused.value)
    assert f"blob {damaged} is corrupt (its file has" in message
    assert f"blob {forged} is corrupt (its content has" in message
    assert all(b["digest"] not in message for i, b in enumerate(blobs) if i not in (1, 6))
    # only the (at most two) batches that held them: at most six blobs of eight
    assert {damaged, forged} <= set(one_by_one) and len(set(one_by_one)) <= 6


def test_a_layer_of_more_blobs_than_one_zstd_reads(store, monkeypatch):
    monkeypatch.setattr(backup_streams.BlobReader, "BATCH_PATHS", 3)
    manifest, data = chunked_manifest(store, 8)
    paths = [store.blob_path(b["digest"]) for b in manifest["layers"][0]["blobs"]]
    reader = backup_streams.BlobReader(paths)
    assert b"".join(reader.chunks()) == data  # three zstd processes, one after the other
    reader.close()
    with pytest.raises(backup_common.BackupError, match="8 blobs are more than one zstd process reads"):
        backup_streams.BlobReader(paths).pipe()
    config = config_of([data])
    tar_bytes = b"".join(iter(restore_job.LoadTar(store, config, manifest["layers"], "gpulab-backup/t:1").read, b""))
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        names = json.loads(tar.extractfile("manifest.json").read())[0]["Layers"]
        assert tar.extractfile(names[0]).read() == data


def test_what_the_store_knows_of_the_newest_backup(store):
    """pick(): an unreadable older manifest is a warning; a newer run's blobs without a manifest, and no temporary
    file, are refused (its manifest may be lost); a run interrupted while writing (its temporary files) is no backup."""
    layers = sample_layers()
    older = a_manifest(store, "erin", "20250101T000000Z-aaaaaa", layers[:1], 1)
    newest = a_manifest(store, "erin", "20250102T000000Z-bbbbbb", layers[:1], 2)
    path = store.manifest_path("erin", older["id"])
    Path(path).write_text(Path(path).read_text()[:40])
    picked = store.pick("erin")
    assert picked.manifest["id"] == newest["id"]
    assert len(picked.warnings) == 1
    assert picked.warnings[0].startswith(f"backup {older['id']} of erin is damaged: the manifest {path} cannot be read")
    mtime = os.stat(store.manifest_path("erin", newest["id"])).st_mtime_ns
    # A later run's blob, no manifest, no temporary file: refused.
    data = layer_tar({"later": os.urandom(2000)})
    with backup_blobs.BlobWriter(store, 3) as writer:
        writer.write(data)
        blob = writer.finish()
        writer.commit(blob["digest"])
    os.utime(store.blob_path(blob["digest"]), ns=(mtime + 10**9, mtime + 10**9))
    with pytest.raises(
        backup_common.BackupError,
        match=rf"backup {newest['id']} may not be the newest of container "
        r"erin: the store holds 1 blob\(s\) .*no manifest.*newest first: " + newest["id"],
    ):
        store.pick("erin")
    assert store.pick("erin", newest["id"]).manifest["id"] == newest["id"]  # asked for by its id
    # The same blob from before the newest manifest is no trace of a later run.
    os.utime(store.blob_path(blob["digest"]), ns=(mtime - 10**9, mtime - 10**9))
    assert store.pick("erin").manifest["id"] == newest["id"]
    # A run interrupted while writing: not a backup; the newest manifest is taken, with a warning.
    os.utime(store.blob_path(blob["digest"]), ns=(mtime + 10**9, mtime + 10**9))
    Path(store.tmp, "chunk-x.tmp").write_bytes(b"partial")
    os.utime(os.path.join(store.tmp, "chunk-x.tmp"), ns=(mtime + 10**9, mtime + 10**9))
    picked = store.pick("erin")
    assert picked.manifest["id"] == newest["id"]
    assert picked.warnings[0].startswith(f"a backup run after {newest['id']} was interrupted (1 temporary file(s)")
    # The newest manifest damaged: refused by its id, the older one is damaged too: none is complete.
    Path(store.manifest_path("erin", newest["id"])).write_text("{")
    with pytest.raises(
        backup_common.BackupError,
        match=rf"the newest backup of container erin, {newest['id']}, "
        r"cannot be restored: the manifest .* cannot be read.*No other backup of erin",
    ):
        store.pick("erin")


def test_a_restore_moves_aside_what_the_backup_lacks_and_follows_no_symlink(store, tmp_path):
    """A symlink where the backup has a folder, a folder where it has a file: moved aside, not written through."""
    work = tmp_path / "srv" / "bob"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "a.txt").write_text("a")
    (work / "notes.txt").write_text("notes")
    os.chown(work, 1234, 2345)
    entry = backup_mounts.archive_mount(
        store, {"source": str(work), "destination": "/w", "read_only": False, "kind": "directory"}, {}, 3
    ).entry
    outside = tmp_path / "outside"
    outside.mkdir()
    subprocess.run(["rm", "-rf", str(work / "sub")], check=True)
    os.symlink(outside, work / "sub")
    (work / "notes.txt").unlink()
    (work / "notes.txt").mkdir()
    (work / "notes.txt" / "deep.txt").write_text("deep")
    done = backup_mounts.restore_mount(store, entry, stamp="20250101T000000Z")
    assert done.source == str(work)
    assert done.moved_to == f"{work}.gpulab-moved-20250101T000000Z"
    assert sorted(done.moved) == ["notes.txt", "sub"]
    assert os.listdir(outside) == []  # nothing written through the symlink
    assert (work / "sub" / "a.txt").read_text() == "a"
    assert (work / "notes.txt").read_text() == "notes"
    moved = Path(done.moved_to)
    assert os.readlink(moved / "sub") == str(outside)
    assert (moved / "notes.txt" / "deep.txt").read_text() == "deep"
    st = os.stat(moved)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 1234, 2345)
    # Again, with nothing the backup lacks: nothing moved, no folder made.
    again = backup_mounts.restore_mount(store, entry, stamp="20250101T000001Z")
    assert again.moved_to is None and again.moved == []
    assert not os.path.exists(f"{work}.gpulab-moved-20250101T000001Z")
