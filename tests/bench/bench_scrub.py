#!/usr/bin/env python3
"""Benchmark (a script, not a timed test): the scrub's read rate on a deep-learning-sized store, against a plain
`zstd -t` of the same blobs in the same run, and the time it takes to verify a 2 GB store.

The store is made the way bench_backup.py makes it: a container of gpulab-test/dl-notebook:latest
(tests/harness/build-dl-image.sh: Jupyter and the CPU build of PyTorch, about 1.7 GB) with a work directory of
notebooks, about 50 MB written inside it (a copy of the numpy package and a 5 MB incompressible checkpoint), backed up
twice through container_backup's code (BackupJob): the image's layers as one blob each, the writable layer as
content-defined chunks, the work directory's archive. Then, one after the other, --repeat times each:
  - the alternative an admin has: `zstd -t` of every blob file of the store (in batches of 512 files, one process at a
    time), which checks zstd's own frame checksum only;
  - the scrub as the verify timer and the playbook run it (`cli scrub --all`, a subprocess): the sha256 of every
    blob's stored file checked against the one its manifest recorded (its content decompressed and checked only where
    that differs), two blobs at a time, its progress recorded in the store.
Before each timed run the blob files are evicted from the page cache (posix_fadvise DONTNEED on each file, which
leaves the machine's other cached files alone), so both read from the disk. The fastest run of each counts.

Target: the scrub's rate (stored bytes read per second) is at least --target-ratio (default 1.0) times the plain
`zstd -t` rate measured in the same run (the disk and zstd's rate: what reading the blobs back costs an admin without
gpulab), while checking a sha256 rather than zstd's 64-bit checksum; exit 1 when missed. The time for a 2 GB store
is 2 GB / the scrub's rate (the store here holds what one notebook's backups hold).
It touches nothing of the engine's but what it creates (container gpulab-bench-scrub, labelled io.gpulab.harness=1),
and removes --workdir unless --keep. Usage: tests/bench/bench_scrub.py [--image NAME] [--workdir DIR] [--store DIR]
[--repeat N] [--target-ratio R] [--keep] (as root, venv python).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from ansible_collections.gpulab.lab.plugins.module_utils.backup.backup import BackupJob  # noqa: E402
from ansible_collections.gpulab.lab.plugins.module_utils.backup.scrub import store_blobs  # noqa: E402
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store  # noqa: E402

NAME = "gpulab-bench-scrub"
LABEL = "io.gpulab.harness=1"
MB = 1e6
TWO_GB = 2e9


def sh(*argv):
    return subprocess.run(list(argv), check=True, text=True, capture_output=True).stdout


def uptime():
    return sh("uptime").strip()


def make_store(image, work):
    """A container of image with a work directory and about 50 MB changed inside, backed up twice into work/store."""
    notebooks = work / "notebooks" / "alice"
    notebooks.mkdir(parents=True)
    for i in range(8):
        (notebooks / f"notebook-{i}.ipynb").write_text(json.dumps({"cells": [{"source": f"print({i})\n" * 20_000}]}))
    subprocess.run(["docker", "rm", "-f", NAME], capture_output=True, check=False)
    sh("docker", "run", "-d", "--name", NAME, "--label", LABEL, "-v", f"{notebooks}:/workspace", image)
    time.sleep(3)
    store = work / "store"
    started = time.monotonic()
    BackupJob(container=NAME, store=str(store)).run()
    script = (
        "set -e; mkdir -p /root/.local/lib/python3.11/site-packages; "
        "cp -a /usr/local/lib/python3.11/dist-packages/numpy /root/.local/lib/python3.11/site-packages/numpy; "
        "head -c 5000000 /dev/urandom > /root/checkpoint.pt; sync"
    )
    sh("docker", "exec", NAME, "sh", "-c", script)
    BackupJob(container=NAME, store=str(store)).run()
    print(f"store made in {time.monotonic() - started:.0f} s (two backups)", flush=True)
    return store


def evict(paths):
    """Drop the files' pages from the page cache, so that the next read comes from the disk (written back first:
    DONTNEED leaves dirty pages, and this machine holds a freshly written store's pages dirty for a long time)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def zstd_t(paths):
    """Seconds for `zstd -t` of every file, 512 to a process, one process at a time."""
    started = time.monotonic()
    for i in range(0, len(paths), 512):
        subprocess.run(["zstd", "-tq", "--", *paths[i : i + 512]], check=True)
    return time.monotonic() - started


def scrub_all(store):
    """Seconds for the scrub of the whole store as the timer's command line runs it (a fresh state: every blob)."""
    shutil.rmtree(Path(store) / "scrub", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "ansible_collections.gpulab.lab.plugins.module_utils.backup.cli", "scrub"]
    started = time.monotonic()
    proc = subprocess.run([*argv, "--store", str(store), "--all"], env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"the scrub failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="gpulab-test/dl-notebook:latest")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/gpulab-bench-scrub"))
    parser.add_argument("--store", type=Path, help="an existing store to measure (none is made)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--target-ratio", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true", help="keep the workdir (the store) afterwards")
    opts = parser.parse_args()
    made = opts.store is None
    try:
        if made:
            if opts.workdir.exists():
                shutil.rmtree(opts.workdir)
            opts.workdir.mkdir(parents=True)
            print(f"making the store: {opts.image} ({uptime()})", flush=True)
            store = make_store(opts.image, opts.workdir)
        else:
            store = opts.store
        blobs = store_blobs(Store(str(store)))
        paths = sorted(Store(str(store)).blob_path(d) for d in blobs)
        stored = sum(b["stored_size"] for b, _what in blobs.values())
        content = sum(b["size"] for b, _what in blobs.values())
        print(f"store: {len(paths)} blobs, {stored / MB:.0f} MB stored, {content / MB:.0f} MB of content", flush=True)
        plain, ours, report = [], [], None
        for i in range(opts.repeat):
            evict(paths)
            load = uptime()
            plain.append(zstd_t(paths))
            print(f"  run {i + 1}: zstd -t        {plain[-1]:6.1f} s   ({load})", flush=True)
            evict(paths)
            load = uptime()
            seconds, report = scrub_all(store)
            ours.append(seconds)
            print(f"  run {i + 1}: scrub --all    {ours[-1]:6.1f} s   ({load})", flush=True)
        plain_rate, our_rate = stored / min(plain) / MB, stored / min(ours) / MB
        ratio = our_rate / plain_rate
        print()
        print(f"  {'':34} {'seconds':>8} {'MB/s stored':>12} {'MB/s content':>13}")
        print(f"  {'zstd -t of every blob':34} {min(plain):8.1f} {plain_rate:12.1f} {content / min(plain) / MB:13.1f}")
        label = "scrub --all (sha256 of each file)"
        print(f"  {label:34} {min(ours):8.1f} {our_rate:12.1f} {content / min(ours) / MB:13.1f}")
        print()
        print(f"  scrub's own figure: {report['mb_per_s']} MB/s over {report['blobs_checked']} blobs")
        print(f"  scrub / zstd -t: {ratio:.2f} (target: at least {opts.target_ratio})")
        print(f"  a 2 GB store: {TWO_GB / MB / our_rate:.0f} s to verify in full; with a 30-day period, "
              f"{TWO_GB / 30 / MB / our_rate:.1f} s a day")  # fmt: skip
        print(f"  load after: {uptime()}")
        if ratio < opts.target_ratio:
            print(f"MISSED: the scrub reads at {ratio:.2f} x the rate of zstd -t, below {opts.target_ratio}")
            return 1
        return 0
    finally:
        if made:
            subprocess.run(["docker", "rm", "-f", NAME], capture_output=True, check=False)
            if not opts.keep:
                shutil.rmtree(opts.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
