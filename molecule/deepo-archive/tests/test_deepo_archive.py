"""Checks of role deepo with deepo_image_source: archive on a Debian 12 lab server without a GPU, after converge.

prepare built three small images on the instance's engine, saved them, fetched the archives to the control node
(MOLECULE_EPHEMERAL_DIRECTORY/archives: deepo.tar.zst, cuda-base.tar.gz, tools.tar, with each image's ID in
<name>.id) and removed the images. converge loaded them through the role. The later tests run gpulab.lab.deepo
again: a run that loads nothing, then a wrong deepo_image_archive_sha256, a truncated archive and a RAR file, each of
which must fail with a clear message and load nothing.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
from playbook_run import JSON_RESULTS, playbook_runner

ARCHIVES = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "archives"
IMAGES = {
    "gpulab-test/deepo:all-py38-cpu": "deepo",
    "gpulab-test/cuda-base:12": "cuda-base",
    "gpulab-test/tools:1": "tools",
}


@pytest.fixture(scope="module")
def hostname(host):
    return host.backend.host


@pytest.fixture(scope="module")
def deepo_play(hostname, tmp_path_factory):
    """Run gpulab.lab.deepo against the instance (in group gpu_servers) with extra vars; returns a Run."""
    folder = tmp_path_factory.mktemp("inventory")
    return playbook_runner(hostname, "gpulab.lab.deepo", folder, env=JSON_RESULTS, timeout=300)


def image_ids(host):
    out = host.check_output("docker image ls --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}'")
    return dict(line.split() for line in out.splitlines())


def expected_id(name):
    return (ARCHIVES / f"{IMAGES[name]}.id").read_text().strip()


def sha256_of(name):
    return (ARCHIVES / f"{name}.sha256").read_text().strip()


# ---- the converged server -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(IMAGES))
def test_each_format_loaded_its_image(host, name):
    """.tar.zst (main image, tag auto -> the CPU tag), .tar.gz and .tar (deepo_extra_images), with the saved IDs."""
    assert image_ids(host).get(name) == expected_id(name)


def test_the_loaded_image_runs(host):
    assert host.run("docker run --rm --network none gpulab-test/deepo:all-py38-cpu").rc == 0


def test_zstd_was_installed_for_the_zstd_archive(host):
    assert host.package("zstd").is_installed


def test_archives_were_copied_once_into_the_cache(host):
    cache = host.file("/var/cache/gpulab/deepo")
    assert cache.is_directory
    assert cache.mode == 0o700
    assert sorted(cache.listdir()) == ["cuda-base.tar.gz", "deepo.tar.zst", "tools.tar"]


# ---- further runs ---------------------------------------------------------------------------------------------------


def test_a_second_run_copies_and_loads_nothing(host, deepo_play):
    before = image_ids(host)
    run = deepo_play({"deepo_image_archive_sha256": sha256_of("deepo.tar.zst")})
    assert run.rc == 0, run.raw[-3000:]
    assert run.changed == 0
    assert "Loaded" not in run.text
    assert image_ids(host) == before


def test_check_mode_says_what_it_would_load_and_loads_nothing(host, deepo_play):
    host.check_output("docker rmi gpulab-test/tools:1")
    run = deepo_play({}, "--check")
    assert run.rc == 0, run.raw[-3000:]
    assert f"Check mode: would copy and load {ARCHIVES}/tools.tar" in run
    assert "gpulab-test/tools:1" not in image_ids(host)


def test_a_wrong_checksum_fails_and_loads_nothing(host, deepo_play):
    host.check_output("docker rmi gpulab-test/deepo:all-py38-cpu")
    before = image_ids(host)
    wrong = "0" * 64
    run = deepo_play({"deepo_image_archive_sha256": wrong})
    assert run.rc != 0
    assert f"{ARCHIVES}/deepo.tar.zst has SHA-256 {sha256_of('deepo.tar.zst')}, not the expected {wrong}" in run
    assert "Nothing was loaded" in run
    assert image_ids(host) == before


def test_a_truncated_archive_fails_and_loads_nothing(host, deepo_play):
    before = image_ids(host)
    run = deepo_play(
        {
            "deepo_image_archive": str(ARCHIVES / "truncated.tar.gz"),
            "deepo_image_tag": "all-py38-cpu",
            "deepo_extra_images": [],
        }
    )
    assert run.rc != 0
    assert f"{ARCHIVES}/truncated.tar.gz is corrupt or truncated (gzip)" in run
    assert image_ids(host) == before


def test_a_rar_file_fails_before_anything_changes(host, deepo_play):
    before = image_ids(host)
    run = deepo_play({"deepo_image_archive": str(ARCHIVES / "deepo.rar"), "deepo_extra_images": []})
    assert run.rc != 0
    assert "is not a docker save archive gpulab can load: its name must end in .tar, .tar.gz, .tgz, .tar.zst" in run
    assert run.changed == 0
    assert image_ids(host) == before


def test_the_right_run_restores_everything(host, deepo_play):
    run = deepo_play({"deepo_image_archive_sha256": sha256_of("deepo.tar.zst")})
    assert run.rc == 0, run.raw[-3000:]
    assert run.changed > 0
    ids = image_ids(host)
    for name in IMAGES:
        assert ids.get(name) == expected_id(name)
