"""A restore without force and a container of the same name on the engine (issue 13: whatever the order of site.yml
and restore.yml after a reinstall, every student's files come back), against this machine's real Docker engine.

The student's notebook is a container of the tiny test image set up as role notebook sets one up (its labels, the work
directory bind-mounted read-write as HOME, the config folder read-only, init), changed by its student (a file
installed as root, a file in the work directory) and backed up. The reinstall wipes it; then "site.yml" makes a fresh
notebook of the same name: the same settings on the lab's image, an empty work directory, and what Jupyter's start
writes (its runtime folder /tmp/jupyter-runtime in the container, IPython's empty ~/.ipython in the work directory).
A restore without force replaces that fresh container. One that its student changed in any way, or that gpulab cannot
tell apart from a used one, is refused: the error names it, what it holds and how to force, and Docker is unchanged
(its event log silent). A container restored from the backup already, or the one the backup was taken from, is left
alone with no error. With keep_present_mounts (site.yml's restore of a missing notebook), a work directory that holds
files is kept as it is.
"""

import os
import subprocess
import time
import uuid

import pytest
from backup_harness import (
    engine_events,
    engine_state,
    inspect,
    needs_docker,
    remove_container,
    remove_images_of,
    run_container,
    run_module,
    sh,
    tiny_fixture,  # noqa: F401 (the fixture tiny)
)
from module_harness import ModuleFail

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import RESTORED_LABEL
from ansible_collections.gpulab.lab.plugins.modules import container_backup, container_restore

pytestmark = [needs_docker, pytest.mark.usefixtures("capture_exit")]


class Lab:
    """One student's notebook, its folders and its store; notebook() runs it as role notebook would."""

    def __init__(self, tiny, root):
        self.image = tiny
        self.name = f"gpulab-unittest-fresh-{uuid.uuid4().hex[:8]}"
        self.work = root / "srv" / self.name
        self.config = root / "etc" / self.name
        self.store = root / "store"

    def notebook(self, image=None, labels=()):
        """The container, its folders made first where missing (as role notebook makes them: owned by the student)."""
        for folder, mode in ((self.work, 0o750), (self.config, 0o500)):
            if not folder.exists():
                folder.mkdir(parents=True)
                os.chown(folder, 1234, 1234)
                folder.chmod(mode)
        label_args = [a for label in labels for a in ("--label", label)]
        return run_container(
            self.name,
            image or self.image,
            "--mount", f"type=bind,source={self.work},target=/work",
            "--mount", f"type=bind,source={self.config},target=/etc/gpulab,readonly",
            "--init",
            "--user", "1234:1234",
            "-e", "HOME=/work",
            "--label", "io.gpulab.notebook.user=alice",
            "--label", f"io.gpulab.notebook.image={self.image}",
            *label_args,
        )  # fmt: skip

    def jupyter_starts(self):
        """What Jupyter's start writes: its runtime folder in the container, IPython's empty folder in HOME."""
        runtime = self.work.parent / f"{self.name}-runtime"
        runtime.mkdir()
        (runtime / "nbserver-7.json").write_text('{"port": 8888}\n')
        sh("docker", "cp", runtime, f"{self.name}:/tmp/jupyter-runtime")
        (self.work / ".ipython").mkdir(exist_ok=True)
        os.chown(self.work / ".ipython", 1234, 1234)

    def restore(self, check_mode=False, **options):
        args = {"container": self.name, "store": str(self.store), **options}
        return run_module(container_restore, args, check_mode=check_mode)

    def reinstall(self):
        """What a reinstall does: the container, its image, the work directory and the config are gone."""
        remove_container(self.name)
        remove_images_of(self.name)
        subprocess.run(["rm", "-rf", str(self.work), str(self.config)], check=True)

    def work_files(self):
        return {str(p.relative_to(self.work)): p.read_bytes() if p.is_file() else None for p in self.work.rglob("*")}


@pytest.fixture
def lab(tiny, tmp_path):
    """A student's notebook, changed by its student and backed up once, then wiped by a reinstall."""
    lab = Lab(tiny, tmp_path)
    lab.notebook()
    sh("docker", "exec", "-u", "0", lab.name, "sh", "-c", "echo torch > /root/installed.txt")
    sh("docker", "exec", lab.name, "sh", "-c", "echo 'the thesis' > /work/thesis.txt")  # as the student
    lab.backup = run_module(container_backup, {"container": lab.name, "store": str(lab.store)})
    lab.reinstall()
    yield lab
    remove_container(lab.name)
    remove_images_of(lab.name)


def fresh(lab):
    """site.yml on the reinstalled server: a fresh notebook on the lab's image, Jupyter started in it."""
    lab.notebook()
    lab.jupyter_starts()
    return inspect(lab.name)["Id"]


def test_a_fresh_notebook_is_replaced_by_the_backup_without_force(lab):
    fresh_id = fresh(lab)
    would = lab.restore(check_mode=True)
    assert "replace the existing container (fresh)" in would["msg"]
    assert inspect(lab.name)["Id"] == fresh_id  # check mode changed nothing
    result = lab.restore()
    assert result["changed"] is True
    assert result["replaced_fresh"] is True and result["replaced_container"] is True
    assert "replacing the fresh container gpulab had created, which held no change of its student's" in result["msg"]
    after = inspect(lab.name)
    assert after["Id"] != fresh_id
    assert after["Config"]["Labels"][RESTORED_LABEL] == lab.backup["backup_id"]
    assert sh("docker", "exec", lab.name, "cat", "/root/installed.txt") == "torch"
    assert (lab.work / "thesis.txt").read_text() == "the thesis\n"
    # The restore is exact: IPython's empty folder, which the backup lacks, was moved aside, not deleted.
    assert [m["paths"] for m in result["workdir_moved_aside"]] == [[".ipython"]]


def student_changes(lab, change):
    if change == "a file installed in the container":
        sh("docker", "exec", "-u", "0", lab.name, "sh", "-c", "echo numpy > /root/pip-installed.txt")
    elif change == "a file of the image deleted":
        sh("docker", "exec", "-u", "0", lab.name, "rm", "/opt/data.txt")
    elif change == "a file in Jupyter's runtime folder's parent":
        sh("docker", "exec", lab.name, "sh", "-c", "echo draft > /tmp/draft.txt")
    elif change == "a file in the work directory":
        sh("docker", "exec", lab.name, "sh", "-c", "echo 'new notes' > /work/notes.txt")
    elif change == "a file in IPython's folder":
        sh("docker", "exec", lab.name, "sh", "-c", "echo 'c = 1' > /work/.ipython/config.py")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("a file installed in the container", "added /root/pip-installed.txt"),
        ("a file of the image deleted", "deleted /opt/data.txt"),
        ("a file in Jupyter's runtime folder's parent", "added /tmp/draft.txt"),
        ("a file in the work directory", "holds notes.txt"),
        ("a file in IPython's folder", "holds .ipython/"),
    ],
)
def test_a_fresh_notebook_its_student_changed_is_refused_with_docker_unchanged(lab, change, named):
    fresh(lab)
    student_changes(lab, change)
    state, files = engine_state(lab.name), lab.work_files()
    since = time.time()
    with pytest.raises(ModuleFail) as info:
        lab.restore()
    time.sleep(1.1)
    msg = info.value.result["msg"]
    assert f"container {lab.name} exists and may hold its student's work" in msg
    assert named in msg
    assert "It was left alone and nothing was changed" in msg
    assert "force: true" in msg and "-e backup_restore_force=true" in msg and f'["{lab.name}"]' in msg
    assert engine_state(lab.name) == state
    assert engine_events(since, time.time(), lab.name) == []  # (its restored image would be gpulab-backup/<name>)
    assert lab.work_files() == files


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("not gpulab's", "it is not a notebook gpulab created"),
        ("restored from another backup", "it was restored from backup 20250101T000000.000Z-abcdef"),
        ("on another image than the lab's", "does not run on the plain image the lab configured for it"),
    ],
)
def test_a_container_gpulab_cannot_tell_from_a_used_one_is_refused(lab, kind, named):
    if kind == "not gpulab's":
        sh("docker", "run", "-d", "--name", lab.name, "--label", "io.gpulab.harness=1", lab.image)
    elif kind == "restored from another backup":
        lab.notebook(labels=[f"{RESTORED_LABEL}=20250101T000000.000Z-abcdef"])
    else:  # what a carry-over or an older restore runs on: the lab's image with a student's layer on top
        lab.notebook()
        sh("docker", "commit", lab.name, f"gpulab-backup/{lab.name}:carried")
        lab.notebook(image=f"gpulab-backup/{lab.name}:carried")
    state = engine_state(lab.name)
    with pytest.raises(ModuleFail, match=named):
        lab.restore()
    assert engine_state(lab.name) == state


def test_a_container_restored_from_the_backup_or_its_source_is_left_alone(lab):
    restored = lab.restore()
    again = lab.restore()
    assert again["changed"] is False and again["container_exists"] is True
    assert f"was restored from backup {lab.backup['backup_id']} already and was left alone" in again["msg"]
    assert inspect(lab.name)["Id"] == restored["container_id"]
    # The container a backup was taken from (it existed, on that image, when the backup was made) is left alone too.
    newer = run_module(container_backup, {"container": lab.name, "store": str(lab.store)})
    source = lab.restore()
    assert source["backup_id"] == newer["backup_id"] and source["changed"] is False
    assert f"is the one backup {newer['backup_id']} was taken from" in source["msg"]
    assert inspect(lab.name)["Id"] == restored["container_id"]
    # Asked for by its id, going back to that backup is the point: refused without force, naming why.
    with pytest.raises(ModuleFail, match="it is the container the backup was taken from, with what its student did"):
        lab.restore(backup=newer["backup_id"])
    assert inspect(lab.name)["Id"] == restored["container_id"]


def test_keep_present_mounts_keeps_a_work_directory_that_holds_files(lab):
    """site.yml's restore of a missing notebook: the container is gone, its work directory (on a disk the reinstall
    kept) holds the student's newer files, its config folder is gone."""
    lab.work.mkdir(parents=True)
    (lab.work / "thesis.txt").write_text("the thesis, newer\n")
    result = lab.restore(keep_present_mounts=True)
    assert result["workdir_kept"] == [str(lab.work)]
    assert result["workdir_restored"] == [str(lab.config)]
    assert f"kept {lab.work} as the server has it" in result["msg"]
    assert (lab.work / "thesis.txt").read_text() == "the thesis, newer\n"
    assert sh("docker", "exec", lab.name, "cat", "/root/installed.txt") == "torch"
    # An empty work directory (only IPython's empty folder) holds nothing of the student's: restored.
    remove_container(lab.name)
    subprocess.run(["rm", "-rf", str(lab.work)], check=True)
    (lab.work / ".ipython").mkdir(parents=True)
    again = lab.restore(keep_present_mounts=True)
    assert again["workdir_kept"] == []
    assert (lab.work / "thesis.txt").read_text() == "the thesis\n"
