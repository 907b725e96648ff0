"""Tests of plugins/modules/docker_image_archive.py on real archives.

A real `docker save` archive of a tiny image built FROM scratch on this machine's engine (skipped without one), in
plain, gzip and zstd form; OCI-layout archives as Docker 25+ writes them (index.json, oci-layout, blobs/sha256 and a
manifest.json pointing into blobs/), assembled here from the same real layer; and broken files: a RAR archive, a
renamed file, truncated archives of each format, a wrong checksum. The load itself is tested against the engine.
"""

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import uuid

import pytest
from ansible.module_utils.testing import patch_module_args
from module_harness import ModuleExit, ModuleFail

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.modules import docker_image_archive as dia

SOCKET = "/var/run/docker.sock"


# Every test here may run main(): exit_json/fail_json raise ModuleExit/ModuleFail (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("capture_exit")


def run(args, check_mode=False):
    with patch_module_args({**args, "_ansible_check_mode": check_mode}), pytest.raises(ModuleExit) as info:
        dia.main()
    if isinstance(info.value, ModuleFail):
        raise info.value
    return info.value.result


def docker_ok():
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


needs_docker = pytest.mark.skipif(not docker_ok(), reason="no Docker engine answers")


def compress(plain, fmt):
    """plain .tar -> the same archive as .tar.gz or .tar.zst (beside it); skips the test without the zstd program."""
    if fmt == "zstd" and not shutil.which("zstd"):
        pytest.skip("no zstd program (Debian package zstd)")
    if fmt == "tar":
        return plain
    if fmt == "gzip":
        out = plain.with_suffix(".tar.gz")
        with open(plain, "rb") as src, gzip.open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return out
    out = plain.with_suffix(".tar.zst")
    subprocess.run(["zstd", "-q", "-f", "-3", str(plain), "-o", str(out)], check=True)
    return out


def add_file(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_archive(path, layer, tag="gpulab-unittest/oci:1", with_manifest_json=True, nested_index=False):
    """An archive in the OCI layout docker save writes since Docker 25 (image ID = config digest)."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [blob(layer)]}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(layer)}],
        }
    ).encode()
    desc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": blob(manifest),
        "size": len(manifest),
        "annotations": {"io.containerd.image.name": "docker.io/" + tag, "org.opencontainers.image.ref.name": "1"},
    }
    blobs = {blob(config): config, blob(manifest): manifest, blob(layer): layer}
    if nested_index:
        inner = json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode()
        blobs[blob(inner)] = inner
        desc = {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": blob(inner), "size": len(inner)}
    index = json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode()
    with tarfile.open(path, "w") as tar:
        for digest, data in blobs.items():
            add_file(tar, "blobs/sha256/" + digest.split(":")[1], data)
        add_file(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add_file(tar, "index.json", index)
        if with_manifest_json:
            legacy = [
                {
                    "Config": "blobs/sha256/" + blob(config).split(":")[1],
                    "RepoTags": [tag],
                    "Layers": ["blobs/sha256/" + blob(layer).split(":")[1]],
                }
            ]
            add_file(tar, "manifest.json", json.dumps(legacy).encode())
    return blob(config)


def a_layer():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_file(tar, "hello.txt", b"hello from gpulab\n")
    return buf.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real docker save archive of an image built FROM scratch; the image is removed from the engine again."""
    if not docker_ok():
        pytest.skip("no Docker engine answers")
    work = tmp_path_factory.mktemp("tiny")
    (work / "hello.txt").write_text(f"gpulab unit test {uuid.uuid4()}\n")  # unique content: a unique image ID
    (work / "Dockerfile").write_text('FROM scratch\nCOPY hello.txt /\nCMD ["/hello.txt"]\n')
    name = f"gpulab-unittest/deepo-tiny:{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "build", "-q", "-t", name, str(work)], check=True, capture_output=True)
    try:
        image_id = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Id}}", name], check=True, capture_output=True, text=True
        ).stdout.strip()
        plain = work / "tiny.tar"
        subprocess.run(["docker", "save", "-o", str(plain), name], check=True)
    finally:
        subprocess.run(["docker", "rmi", "-f", name], check=False, capture_output=True)
    return {"name": name, "id": image_id, "plain": plain}


# ---- checking archives ---------------------------------------------------------------------------------------------


@needs_docker
@pytest.mark.parametrize("fmt", ["tar", "gzip", "zstd"])
def test_real_docker_save_archive_in_each_format(saved, fmt):
    path = compress(saved["plain"], fmt)
    result = run({"path": str(path), "inspect_only": True})
    assert result["changed"] is False
    assert result["format"] == fmt
    assert result["layout"] == "legacy"  # Docker 20.10 on these machines
    assert result["image_ids"] == [saved["id"]]
    assert result["repo_tags"] == [saved["name"]]
    assert result["tar_bytes"] == saved["plain"].stat().st_size


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("with_manifest_json", [True, False])
def test_oci_layout(tmp_path, nested, with_manifest_json):
    path = tmp_path / "oci.tar"
    config_digest = oci_archive(path, a_layer(), with_manifest_json=with_manifest_json, nested_index=nested)
    result = run({"path": str(path), "inspect_only": True})
    assert result["layout"] == "oci"
    assert result["image_ids"] == [config_digest]
    assert result["repo_tags"] in (["gpulab-unittest/oci:1"], ["docker.io/gpulab-unittest/oci:1"])


def test_checksum_is_checked_first(tmp_path):
    path = tmp_path / "oci.tar"
    oci_archive(path, a_layer())
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert run({"path": str(path), "inspect_only": True, "sha256": good.upper()})["sha256"] == good
    with pytest.raises(ModuleFail) as info:
        run({"path": str(path), "inspect_only": True, "sha256": "0" * 64})
    assert f"has SHA-256 {good}, not the expected {'0' * 64}" in info.value.result["msg"]
    assert "Nothing was loaded" in info.value.result["msg"]


@pytest.mark.parametrize("fmt", ["tar", "gzip", "zstd"])
def test_truncated_archive_is_refused(tmp_path, fmt):
    plain = tmp_path / "oci.tar"
    oci_archive(plain, a_layer() + b"x" * 300_000)
    path = compress(plain, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModuleFail) as info:
        run({"path": str(path), "inspect_only": True})
    assert "truncated" in info.value.result["msg"] or "decompress" in info.value.result["msg"]


def test_a_corrupt_archive_is_named_by_its_whole_path(tmp_path):
    """zstd shortens the names in its messages to their last 20 characters (v/h3/dl-half.tar.zst): the module's error
    names the whole path of the archive."""
    folder = tmp_path / "var" / "cache" / "gpulab" / "deepo" / "v" / "h3"
    folder.mkdir(parents=True)
    plain = folder / "dl-half.tar"
    oci_archive(plain, a_layer() + b"x" * 300_000)
    path = compress(plain, "zstd")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModuleFail) as info:
        run({"path": str(path), "inspect_only": True})
    assert str(path) in info.value.result["msg"]
    assert "decompress" in info.value.result["msg"]


def test_plain_tar_cut_at_a_member_boundary_is_refused(tmp_path):
    """A plain tar is checked from its headers (the layers' data is sought over): a file cut just after a whole member
    lacks the end-of-archive blocks."""
    plain = tmp_path / "oci.tar"
    oci_archive(plain, a_layer() + b"x" * 300_000)
    with tarfile.open(plain) as tar:
        members = tar.getmembers()
    cut = members[1].offset_data + -(-members[1].size // 512) * 512  # just after the second member's data
    data = plain.read_bytes()
    plain.write_bytes(data[:cut])
    with pytest.raises(ModuleFail, match=r"truncated|incomplete"):
        run({"path": str(plain), "inspect_only": True})


@pytest.mark.parametrize("fmt", ["tar", "gzip"])
def test_archive_without_a_layer_its_manifest_names_is_refused(tmp_path, fmt):
    full = tmp_path / "full.tar"
    oci_archive(full, a_layer())
    plain = tmp_path / "oci.tar"
    layer_blob = "blobs/sha256/" + hashlib.sha256(a_layer()).hexdigest()
    with tarfile.open(full) as src, tarfile.open(plain, "w") as dst:
        for member in src.getmembers():
            if member.name != layer_blob:
                dst.addfile(member, src.extractfile(member))
    with pytest.raises(ModuleFail, match=f"is incomplete: its manifest names {layer_blob}"):
        run({"path": str(compress(plain, fmt)), "inspect_only": True})


def test_corrupt_gzip_is_refused(tmp_path):
    plain = tmp_path / "oci.tar"
    oci_archive(plain, a_layer() + bytes(range(256)) * 1000)
    path = compress(plain, "gzip")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModuleFail, match="corrupt or truncated"):
        run({"path": str(path), "inspect_only": True})


def test_rar_archive_is_refused(tmp_path):
    path = tmp_path / "deepo.rar"
    path.write_bytes(b"Rar!\x1a\x07\x01\x00" + b"\x00" * 600)
    with pytest.raises(ModuleFail) as info:
        run({"path": str(path), "inspect_only": True})
    assert "must end in .tar, .tar.gz, .tgz or .tar.zst" in info.value.result["msg"]
    renamed = tmp_path / "deepo.tar"
    shutil.copy(path, renamed)
    with pytest.raises(ModuleFail, match="is a RAR archive, not a docker save archive"):
        run({"path": str(renamed), "inspect_only": True})


def test_renamed_file_is_refused(tmp_path):
    plain = tmp_path / "oci.tar"
    oci_archive(plain, a_layer())
    gz = compress(plain, "gzip")
    wrong = tmp_path / "oci.tar.zst"
    gz.rename(wrong)
    with pytest.raises(ModuleFail, match="named like a zstd archive but its content is gzip"):
        run({"path": str(wrong), "inspect_only": True})


def test_a_tar_that_is_not_docker_save(tmp_path):
    path = tmp_path / "other.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, "readme.txt", b"hi")
    with pytest.raises(ModuleFail, match=r"neither manifest\.json nor index\.json"):
        run({"path": str(path), "inspect_only": True})


def test_missing_file(tmp_path):
    with pytest.raises(ModuleFail, match="does not exist on the server"):
        run({"path": str(tmp_path / "nope.tar"), "inspect_only": True})


# ---- loading into the engine ---------------------------------------------------------------------------------------


@needs_docker
def test_load_streams_into_the_engine_and_then_skips(saved, tmp_path):
    path = compress(saved["plain"], "zstd")  # the format Docker 20.10 cannot read itself
    progress = tmp_path / "progress.json"
    try:
        assert not api.Engine(SOCKET).has_image(saved["id"])
        checked = run({"path": str(path), "progress_file": str(progress)}, check_mode=True)
        assert checked["changed"] is True
        assert checked["missing_ids"] == [saved["id"]]
        assert not api.Engine(SOCKET).has_image(saved["id"])  # check mode loads nothing

        loaded = run({"path": str(path), "progress_file": str(progress)})
        assert loaded["changed"] is True
        assert api.Engine(SOCKET).has_image(saved["id"])
        assert not progress.exists()  # removed at the end

        again = run({"path": str(path)})
        assert again["changed"] is False
        assert again["missing_ids"] == []
    finally:
        subprocess.run(["docker", "rmi", "-f", saved["name"]], check=False, capture_output=True)


@needs_docker
def test_wrong_checksum_loads_nothing(saved):
    with pytest.raises(ModuleFail, match="not the expected"):
        run({"path": str(saved["plain"]), "sha256": "1" * 64})
    assert not api.Engine(SOCKET).has_image(saved["id"])


def test_progress_file(tmp_path):
    target = tmp_path / "p.json"
    progress = dia.Progress(str(target), bytes_total=1000)
    progress("load", 250, force=True)
    assert json.loads(target.read_text())["bytes_done"] == 250
    assert json.loads(target.read_text())["bytes_total"] == 1000


def test_only_unix_sockets():
    with pytest.raises(api.DockerApiError, match="only local sockets"):
        api.socket_path("tcp://127.0.0.1:2375")


def test_the_cache_skips_the_second_read_but_not_a_changed_file(tmp_path, monkeypatch):
    path = tmp_path / "oci.tar.gz"
    plain = tmp_path / "oci.tar"
    oci_archive(plain, a_layer())
    compress(plain, "gzip").rename(path)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    args = {"path": str(path), "inspect_only": True, "cache_dir": str(tmp_path / "cache"), "sha256": good}
    first = run(args)
    assert "cached" not in first

    def no_reading(*_args, **_kw):
        raise AssertionError("the archive was read again")

    with monkeypatch.context() as patched:
        patched.setattr(dia, "inspect_archive", no_reading)
        patched.setattr(dia, "file_sha256", no_reading)
        second = run(args)
        assert second["cached"] is True
        assert second["image_ids"] == first["image_ids"]
        with pytest.raises(ModuleFail, match="not the expected"):
            run({**args, "sha256": "2" * 64})  # a wrong checksum still fails, from the cached one

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: another size, so it is checked again
    with pytest.raises(ModuleFail, match=r"corrupt or truncated|not the expected"):
        run(args)
    with pytest.raises(ModuleFail, match="corrupt or truncated"):
        run({**args, "sha256": None})
