"""The collection as a lab receives it: `ansible-galaxy collection build` of ansible_collections/gpulab/lab, the
tarball installed into an empty folder, then every playbook syntax-checked and every module's documentation read from
that folder alone.

The installed copy is run from a folder outside the clone, with no ANSIBLE_* variable but ANSIBLE_COLLECTIONS_PATH: the
clone's ansible.cfg (collections_path = .) and its own collection are not used, and each test asserts the path Ansible
resolved lies inside the installed folder. The install is offline (--offline): no Galaxy server is asked, and the
dependencies (community.docker, community.general, ansible.posix) must already be installed, as the `ansible` package
of the virtual environment brings them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COLLECTION = ROOT / "ansible_collections" / "gpulab" / "lab"
# ansible-galaxy, ansible-playbook and ansible-doc of the Python running the tests (the project's virtual environment).
BIN = Path(sys.executable).parent
PLAYBOOKS = sorted(path.stem for path in (COLLECTION / "playbooks").glob("*.yml"))
MODULES = sorted(path.stem for path in (COLLECTION / "plugins" / "modules").glob("*.py") if path.stem != "__init__")
# Written by ansible-galaxy in place of galaxy.yml.
BUILD_METADATA = {"MANIFEST.json", "FILES.json"}


class Built(NamedTuple):
    tarball: Path
    members: dict[str, tarfile.TarInfo]  # by path inside the tarball


class Installed(NamedTuple):
    collections_path: Path  # what ANSIBLE_COLLECTIONS_PATH names
    collection: Path  # collections_path/ansible_collections/gpulab/lab
    outside: Path  # an empty folder outside the clone, the commands' working directory
    install_output: str


def ansible_env(collections_path: Path | None = None) -> dict[str, str]:
    """This process's environment without any ANSIBLE_* setting (a molecule run or a developer's shell may set some)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env["ANSIBLE_NOCOLOR"] = "1"
    if collections_path is not None:
        env["ANSIBLE_COLLECTIONS_PATH"] = str(collections_path)
    return env


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (
        f"{' '.join(command)} (in {cwd}) exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def collection_files_in_git() -> set[str]:
    """The collection's files as git sees them: tracked or untracked, not ignored, present in the work tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "."],
        cwd=COLLECTION,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {path for path in listed.split("\0") if path and (COLLECTION / path).is_file()}


@pytest.fixture(scope="module")
def galaxy() -> dict:
    return yaml.safe_load((COLLECTION / "galaxy.yml").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory, galaxy) -> Built:
    output = tmp_path_factory.mktemp("dist")
    run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(output)], COLLECTION, ansible_env())
    tarball = output / f"{galaxy['namespace']}-{galaxy['name']}-{galaxy['version']}.tar.gz"
    assert [path.name for path in output.iterdir()] == [tarball.name]
    with tarfile.open(tarball) as archive:
        members = {member.name: member for member in archive.getmembers()}
    return Built(tarball, members)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, built) -> Installed:
    collections_path = tmp_path_factory.mktemp("collections")
    outside = tmp_path_factory.mktemp("outside")
    assert ROOT not in outside.parents, f"the temporary folder {outside} lies inside the clone"
    result = run(
        [
            str(BIN / "ansible-galaxy"),
            "collection",
            "install",
            "--offline",
            str(built.tarball),
            "-p",
            str(collections_path),
        ],
        outside,
        ansible_env(),
    )
    return Installed(
        collections_path,
        collections_path / "ansible_collections" / "gpulab" / "lab",
        outside,
        result.stdout + result.stderr,
    )


def read_member(built: Built, name: str) -> bytes:
    with tarfile.open(built.tarball) as archive:
        member = archive.extractfile(built.members[name])
        assert member is not None, f"{name} is not a file in {built.tarball.name}"
        return member.read()


def test_the_tarball_holds_the_collections_files_as_git_lists_them_and_nothing_else(built):
    files = {name for name, member in built.members.items() if member.isfile()}

    assert files == (collection_files_in_git() - {"galaxy.yml"}) | BUILD_METADATA
    assert {"README.md", "meta/runtime.yml", "playbooks/site.yml", "playbooks/backup.yml"} <= files
    assert {f"plugins/modules/{module}.py" for module in MODULES} <= files


def test_the_tarball_holds_no_build_outputs_of_the_work_tree(built):
    leftovers = [
        name
        for name in built.members
        if "__pycache__" in name.split("/")
        or name.endswith((".pyc", ".tar.gz"))
        or name == "tests/output"
        or name.startswith("tests/output/")
    ]

    assert leftovers == []


# What a developer's work tree may hold beside the collection's files: caches, ansible-test's results, an earlier
# build, editor and patch leftovers. None of it may reach the tarball.
WORK_TREE_LEFTOVERS = [
    "plugins/modules/__pycache__/gpu_facts.cpython-311.pyc",
    "plugins/filter/stale.pyc",
    "tests/output/data/result.json",
    "gpulab-lab-0.1.0.tar.gz",
    "roles/backup/files/old-build.tar.gz",
    "plugins/modules/gpu_facts.py.orig",
    "plugins/modules/gpu_facts.py.rej",
    "roles/docker/tasks/main.yml~",
    "roles/docker/tasks/.main.yml.swp",
]


def test_build_leaves_out_caches_results_old_builds_and_editor_files(tmp_path):
    source = tmp_path / "lab"
    for path in collection_files_in_git():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(COLLECTION / path, source / path)
    for path in WORK_TREE_LEFTOVERS:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text("left over\n")
    output = tmp_path / "dist"

    run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(output)], source, ansible_env())

    (tarball,) = output.iterdir()
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
    assert [path for path in WORK_TREE_LEFTOVERS if path in names] == []
    assert [name for name in names if "__pycache__" in name.split("/") or name.startswith("tests/output")] == []
    assert "plugins/modules/gpu_facts.py" in names


def test_files_json_lists_every_file_of_the_tarball(built):
    listed = json.loads(read_member(built, "FILES.json"))["files"]
    files = {entry["name"] for entry in listed if entry["ftype"] == "file"}

    assert files == {name for name, member in built.members.items() if member.isfile()} - BUILD_METADATA


def test_manifest_carries_galaxy_yml_name_version_and_dependencies(built, galaxy):
    info = json.loads(read_member(built, "MANIFEST.json"))["collection_info"]

    assert (info["namespace"], info["name"], info["version"]) == (
        galaxy["namespace"],
        galaxy["name"],
        galaxy["version"],
    )
    assert info["dependencies"] == galaxy["dependencies"]


def test_offline_install_puts_only_gpulab_lab_in_the_empty_folder(installed, galaxy):
    manifest = json.loads((installed.collection / "MANIFEST.json").read_text())

    assert manifest["collection_info"]["version"] == galaxy["version"]
    # The dependencies were found installed (the `ansible` package), so nothing else was written there.
    assert sorted(path.name for path in (installed.collections_path / "ansible_collections").iterdir()) == ["gpulab"]
    for dependency in galaxy["dependencies"]:
        assert f"'{dependency}:" in installed.install_output, installed.install_output


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_installed_playbook_passes_syntax_check_from_outside_the_clone(installed, playbook):
    result = run(
        [str(BIN / "ansible-playbook"), f"gpulab.lab.{playbook}", "--syntax-check"],
        installed.outside,
        ansible_env(installed.collections_path),
    )

    assert f"playbook: {installed.collection / 'playbooks' / f'{playbook}.yml'}" in result.stdout.splitlines()


@pytest.mark.parametrize("module", MODULES)
def test_installed_module_documentation_reads_with_ansible_doc(installed, module):
    result = run(
        [str(BIN / "ansible-doc"), f"gpulab.lab.{module}"],
        installed.outside,
        ansible_env(installed.collections_path),
    )

    header = result.stdout.splitlines()[0]
    assert header == f"> MODULE gpulab.lab.{module} ({installed.collection / 'plugins' / 'modules' / f'{module}.py'})"
    assert "EXAMPLES:" in result.stdout
    assert result.stderr == ""
