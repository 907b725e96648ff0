#!/usr/bin/env python3
"""Benchmark (a script, not a timed test) of issue 15: backups at a real lab's sizes cost in proportion to the change.

One run, on the deep-learning-like image gpulab-test/dl-notebook:latest (tests/harness/build-dl-image.sh), of a
notebook container whose work directory (bind-mounted at /workspace) holds about 5 GB in about 20,000 files (small
notebooks and CSVs, and ten large "dataset" files) and whose writable layer holds about 2 GB (a second Python
environment, copied from the image's own packages as a pip install would write it, and two model files):
  - the plain way: `docker commit -p` + `docker save -o` (the image and the writable layer into one tar; the work
    directory is not in it), after a warm-up save to /dev/null;
  - gpulab's first backup of the container (container_backup into an empty store, include_workdir false: the
    image's layers and the writable layer, compressed) against the plain way: target at most 1.0 x;
  - gpulab's first backup of the work directory (informational: every file read, chunked and compressed once);
  - restic (Debian's package, installed with apt when missing) backing up the same upper directory and work
    directory to a local repository: a first snapshot, then, after the change, a second one;
  - 1 MB changed in each tree (a new 1,000,000-byte file of random bytes: a checkpoint, in the work directory and in
    the container), then gpulab's second backup (container and work directory) and restic's second snapshot: gpulab's
    wall time at most restic's, its bytes written (chunks, listing, manifest and stat cache) at most 1.2 x the
    change compressed at the backup's zstd level, and the container's pause at most 0.3 s;
  - the restore of the work directory (mounts.restore_mount of the second backup's entry, into an empty folder)
    against `tar -x` of an uncompressed tar of the same files into another, each reading from the disk (the tar's and
    the store's pages dropped from the page cache first, as after a reinstall): at most 1.3 x.
Each figure is printed with `uptime` (the machine is shared); exits 1 when a target is missed. The modules run as
Ansible runs them on a server (bench_deepo_load's RUN_MODULE). Touches only what it creates (container
gpulab-bench-inc, its committed image, --workdir), all removed at the end unless --keep.
Usage: tests/bench/bench_incremental.py [--image NAME] [--workdir DIR] [--keep] (as root, with the venv's python).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backup import disk_usage as du
from bench_backup import module, timed

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from ansible_collections.gpulab.lab.plugins.module_utils.backup import mounts as backup_mounts  # noqa: E402
from ansible_collections.gpulab.lab.plugins.module_utils.backup import store as backup_store  # noqa: E402

NAME = "gpulab-bench-inc"
LABEL = "io.gpulab.harness=1"
MB = 1e6
LEVEL = -1  # container_backup's default compression_level (zstd --fast=1)
PASSWORD = "gpulab-bench"  # noqa: S105 (the local test repository's password)


def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, text=True, capture_output=True, **kw).stdout


def load():
    return sh("uptime").strip()


def random_file(path, size):
    """size bytes that no compressor or chunk store can shrink (AES-CTR of zeros: fast, and different per file)."""
    key = os.urandom(16).hex()
    with open(path, "wb") as f:
        head = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        subprocess.run(
            ["openssl", "enc", "-aes-128-ctr", "-K", key, "-iv", "0" * 32, "-nosalt"],
            stdin=head.stdout,
            stdout=f,
            check=True,
        )
        head.stdout.close()
        head.wait()


def make_workdir(work, scale):
    """About 5 GB in 20,000 files: 19,990 small text-like files (1 to 50 kB, in 200 folders) and 10 of 450 MB."""
    rng = random.Random(15)  # noqa: S311 (test data, the same each run)
    words = [os.urandom(rng.randint(2, 8)).hex() for _ in range(5000)]
    for i in range(int(19_990 * scale)):
        folder = work / "projects" / f"p{i % 200:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1_000, 50_000)
        text = " ".join(rng.choices(words, k=size // 8))[:size]
        (folder / f"cell-{i:05d}.{'ipynb' if i % 3 else 'csv'}").write_text(text)
    (work / "datasets").mkdir()
    for i in range(10):
        random_file(work / "datasets" / f"shard-{i}.bin", int(450_000_000 * scale))


def fill_layer(scale):
    """About 2 GB in the writable layer: a second Python environment and two model files."""
    size = int(500_000_000 * scale)
    packages = "/usr/local/lib/python3.11/dist-packages" + ("" if scale >= 1 else "/numpy")
    script = (
        "set -e; mkdir -p /opt/env2 /root/.cache/models; "
        f"cp -a {packages} /opt/env2/; "
        f"head -c {size} /dev/urandom > /root/.cache/models/a.bin; "
        f"head -c {size} /dev/urandom > /root/.cache/models/b.bin; sync"
    )
    sh("docker", "exec", NAME, "sh", "-c", script)
    return sum(
        int(line.split()[0])
        for line in sh("docker", "exec", NAME, "du", "-sb", "/opt/env2", "/root/.cache").splitlines()
    )


def restic(repo, *paths):
    seconds, _out = timed(["restic", "-r", str(repo), "backup", "--quiet", *map(str, paths)])
    return seconds


def evict(path):
    """Drop a file's (or a folder's files') pages from the page cache, so that the next read comes from the disk:
    both restores start cold, as a restore after a reinstall does (only these files: the machine is shared)."""
    os.sync()
    path = Path(path)
    for p in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def compressed(data):
    return len(subprocess.run(["zstd", f"--fast={-LEVEL}", "-c"], input=data, capture_output=True, check=True).stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default="gpulab-test/dl-notebook:latest")
    parser.add_argument("--workdir", default="/var/tmp/gpulab-bench-inc")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--scale", type=float, default=1.0, help="sizes and file counts times this (a quick check)")
    args = parser.parse_args()
    if not shutil.which("restic"):
        subprocess.run(["apt-get", "install", "-y", "-q", "restic"], check=True, capture_output=True)
    top = Path(args.workdir)
    if top.exists():
        shutil.rmtree(top)
    top.mkdir(parents=True)
    work, store, repo = top / "work", top / "store", top / "restic"
    os.environ.update(RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=str(top / "restic-cache"))  # restic's, below
    misses, rows = [], []

    def row(what, value, target=None, ok=None):
        line = f"{what:<78} {value:>22}" + (f"   target {target}: {'met' if ok else 'MISSED'}" if target else "")
        print(line, flush=True)
        rows.append(line)
        if target and not ok:
            misses.append(what)

    try:
        print(f"load at the start: {load()}", flush=True)
        make_workdir(work, args.scale)
        files = sum(1 for p in work.rglob("*") if p.is_file())
        sh("docker", "run", "-d", "--name", NAME, "--label", LABEL, "-v", f"{work}:/workspace", args.image)
        layer = fill_layer(args.scale)
        upper = json.loads(sh("docker", "inspect", NAME))[0]["GraphDriver"]["Data"]["UpperDir"]
        row("work directory: bytes / files", f"{du(work) / MB:.0f} MB / {files}")
        row("writable layer (upper directory)", f"{layer / MB:.0f} MB")

        # the plain way, and gpulab's first backup of the container
        subprocess.run(f"docker save {args.image} > /dev/null", shell=True, check=True)  # noqa: S602 (warm-up)
        os.sync()
        started = time.monotonic()
        sh("docker", "commit", "-p", NAME, "gpulab-bench/inc:plain")
        sh("docker", "save", "-o", top / "plain.tar", "gpulab-bench/inc:plain")
        plain = time.monotonic() - started
        plain_bytes = (top / "plain.tar").stat().st_size
        (top / "plain.tar").unlink()
        sh("docker", "rmi", "gpulab-bench/inc:plain")
        row(
            "plain docker commit -p + docker save -o (image + writable layer, tar)",
            f"{plain:.1f} s, {plain_bytes / MB:.0f} MB",
        )
        base = {"container": NAME, "store": str(store), "keep_last": 5}
        first, result = module("container_backup", {**base, "include_workdir": False}, top)
        row(
            "gpulab first backup (image layers + writable layer, zstd, new store)",
            f"{first:.1f} s, {result['bytes_written'] / MB:.0f} MB",
            "<= 1.0 x plain",
            first <= plain,
        )
        row("  ratio to the plain way; pause", f"{first / plain:.2f} x; {result['paused_seconds']:.2f} s")
        row("  its phases", json.dumps(result.get("timings")))
        print(f"  load: {load()}", flush=True)
        full, result = module("container_backup", base, top)
        row(
            "gpulab first backup of the work directory (every file read)",
            f"{full:.1f} s, {result['bytes_written'] / MB:.0f} MB",
        )

        timed(["restic", "-r", str(repo), "init"])
        restic_first = restic(repo, upper, work)
        row("restic first snapshot (upper dir + work dir)", f"{restic_first:.1f} s, {du(repo) / MB:.0f} MB")
        print(f"  load: {load()}", flush=True)

        # 1 MB changed in each tree
        change = os.urandom(1_000_000)
        (work / "projects" / "p007" / "checkpoint-2.bin").write_bytes(change)
        layer_change = os.urandom(1_000_000)
        subprocess.run(["docker", "exec", "-i", NAME, "sh", "-c", "cat > /root/.cache/models/step-2.bin"],
                       input=layer_change, check=True)  # fmt: skip
        change_z = compressed(change) + compressed(layer_change)
        time.sleep(0.2)  # the changes are a moment old, as a timer's backup finds them
        store_before = du(store)
        seconds, result = module("container_backup", base, top)
        written = result["bytes_written"]
        repo_before = du(repo)
        restic_second = restic(repo, upper, work)
        restic_written = du(repo) - repo_before
        row(
            "restic second snapshot (1 MB changed in each tree)", f"{restic_second:.2f} s, {restic_written / MB:.2f} MB"
        )
        row(
            "gpulab second backup (1 MB changed in each tree; container_backup as Ansible runs it)",
            f"{seconds:.2f} s",
            "<= restic",
            seconds <= restic_second,
        )
        row("  of which the backup job itself (no interpreter, Ansible or listing)", f"{result['seconds']:.2f} s")
        row("  its phases", json.dumps(result.get("timings")))
        row(
            "  bytes read (files read) / store grew by (du)",
            f"{result['bytes_read'] / MB:.2f} MB / {(du(store) - store_before) / MB:.2f} MB",
        )
        row(
            f"  bytes written (the change compressed: {change_z / MB:.2f} MB)",
            f"{written / MB:.2f} MB = {written / change_z:.2f} x",
            "<= 1.2 x",
            written <= 1.2 * change_z,
        )
        row("  container paused", f"{result['paused_seconds']:.2f} s", "<= 0.3 s", result["paused_seconds"] <= 0.3)
        print(f"  load: {load()}", flush=True)

        # the restore of the work directory against tar -x
        shutil.rmtree(repo)  # room for the restore's copies
        manifest = json.loads(Path(result["manifest"]).read_text())
        entry = next(m for m in manifest["mounts"] if m["destination"] == "/workspace")
        subprocess.run(["tar", "-cf", top / "work.tar", "-C", work, "."], check=True)
        (top / "by-tar").mkdir()
        evict(top / "work.tar")
        tar_seconds, _ = timed(["tar", "-xf", str(top / "work.tar"), "-C", str(top / "by-tar")])
        (top / "work.tar").unlink()
        # by-tar is removed after both restores: files deleted just before make the next restore's file creation
        # slower (ext4 skips recently deleted inodes, one inode-table lookup each), which would burden one side only
        target = top / "by-gpulab"
        evict(store)
        started = time.monotonic()
        backup_mounts.restore_mount(backup_store.Store(str(store)), dict(entry, source=str(target), parents=[]))
        restore_seconds = time.monotonic() - started
        diff = subprocess.run(["diff", "-r", "--no-dereference", work, target], check=False, capture_output=True)
        same = diff.returncode == 0
        shutil.rmtree(top / "by-tar")
        row("tar -xf of the work directory (uncompressed tar, read from the disk)", f"{tar_seconds:.1f} s")
        row(
            f"gpulab restore of the work directory (store read from the disk; identical: {'yes' if same else 'NO'})",
            f"{restore_seconds:.1f} s = {restore_seconds / tar_seconds:.2f} x",
            "<= 1.3 x tar -x",
            same and restore_seconds <= 1.3 * tar_seconds,
        )
        print(f"load at the end: {load()}", flush=True)
    finally:
        subprocess.run(["docker", "rm", "-f", NAME], capture_output=True, check=False)
        subprocess.run(["docker", "rmi", "-f", "gpulab-bench/inc:plain"], capture_output=True, check=False)
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    if misses:
        print(f"MISSED: {'; '.join(misses)}")
        return 1
    print("every target met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
