#!/usr/bin/env python3
"""Benchmark (a script, not a timed test): back up and restore a deep-learning-sized notebook container through
gpulab's modules container_backup / container_restore and the plain way, in one run, and print a table.

The container runs gpulab-test/dl-notebook:latest (tests/harness/build-dl-image.sh: Jupyter and the CPU build of
PyTorch, about 1.8 GB) with a work directory bind-mounted, on the machine's own engine. Rows:
  - plain `docker commit -p` + `docker save -o`, then container_backup (first backup into an empty store);
  - a change of about 50 MB inside the container (a copy of the numpy package, as a pip install would write, and a
    5 MB incompressible "checkpoint") and a new notebook in the work directory; then the plain way again and
    container_backup's second backup;
  - `docker load -i` of the plain tar and container_restore of the second backup, (a) into the machine's engine, which
    has the image the container was created from (the case of restore.yml after a reinstall: site.yml has loaded
    the deep-learning image), and (b) into an empty engine: a dockerd of the benchmark's own (own data root, socket
    and bridge interface, no iptables rules), so that every layer must really be written.
  - issue 7's figures: the second backup takes the fast path (the writable layer read from its overlay2 upper
    directory, in content-defined chunks): its wall time against the plain way's, and its bytes written against the
    compressed size of what changed (the changed files inside the container, tar + zstd at the backup's level, and
    the work directory's archive); then a container whose writable layer holds about 500 MB gets a 1 MB change, and
    the backup after it must write at most 5 MB.
Each pair runs in the same conditions, one after the other; the first `docker save` is preceded by a warm-up save to
/dev/null (so the plain way does not pay for cold caches alone). The modules run as Ansible runs them on a server
(the RUN_MODULE trick of bench_deepo_load.py).

It touches nothing of the engine's but what it creates (container gpulab-bench-backup, images gpulab-bench/*, the
restored images gpulab-backup/gpulab-bench-backup:*, all labelled io.gpulab.harness=1 or removed at the end), and
removes --workdir unless --keep. NEVER start a dockerd with `--bridge none` (it deletes the machine's docker0).
Usage: tests/bench/bench_backup.py [--image NAME] [--workdir DIR] [--keep] [--no-empty-engine] (as root, venv python).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deepo_load import MODULES, RUN_MODULE, Engine  # the benchmark engine: own data root and bridge

ROOT = Path(__file__).resolve().parents[2]
NAME = "gpulab-bench-backup"
LABEL = "io.gpulab.harness=1"
MB = 1e6


def sh(*argv, **kw):
    return subprocess.run(list(argv), check=True, text=True, capture_output=True, **kw).stdout


def timed(argv):
    os.sync()  # what an earlier step left to write back does not slow this one down
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed: {proc.stdout[-3000:]} {proc.stderr[-3000:]}")
    return seconds, proc.stdout


def disk_usage(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def module(name, args, workdir):
    """Run the collection's module <name> as Ansible would; returns (wall seconds, result)."""
    args_file = workdir / f"{name}-args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    argv = [
        sys.executable,
        "-c",
        RUN_MODULE,
        str(ROOT),
        str(MODULES / f"{name}.py"),
    ]
    seconds, out = timed([*argv, str(args_file)])
    result = json.loads(out[out.index("{") :])
    if result.get("failed"):
        raise SystemExit(f"{name} failed: {result.get('msg')}")
    return seconds, result


def plain_backup(tag, tar):
    """docker commit -p + docker save -o: the way the issue describes people doing it by hand."""
    os.sync()
    started = time.monotonic()
    sh("docker", "commit", "-p", NAME, tag)
    sh("docker", "save", "-o", str(tar), tag)
    seconds = time.monotonic() - started
    sh("docker", "rmi", tag)
    return seconds


def change_container(workdir):
    """About 50 MB written inside the container, and a new notebook in the work directory."""
    script = (
        "set -e; mkdir -p /root/.local/lib/python3.11/site-packages; "
        "cp -a /usr/local/lib/python3.11/dist-packages/numpy /root/.local/lib/python3.11/site-packages/numpy; "
        "head -c 5000000 /dev/urandom > /root/checkpoint.pt; sync"
    )
    sh("docker", "exec", NAME, "sh", "-c", script)
    changed = sh("docker", "exec", NAME, "du", "-sb", "/root/.local", "/root/checkpoint.pt")
    (workdir / "second.ipynb").write_text(json.dumps({"cells": [{"source": "x" * 200_000}]}))
    return sum(int(line.split()[0]) for line in changed.splitlines())


def compressed_size(container, paths, level):
    """Bytes of `tar -c paths | zstd <level>` of paths inside the container: what the change costs compressed."""
    tar = subprocess.Popen(["docker", "exec", container, "tar", "-cf", "-", *paths], stdout=subprocess.PIPE)
    level_arg = f"--fast={-level}" if level < 0 else f"-{level}"
    out = subprocess.run(["zstd", "-q", "-c", level_arg], stdin=tar.stdout, capture_output=True, check=True).stdout
    tar.stdout.close()
    if tar.wait() != 0:
        raise SystemExit(f"tar of {paths} in {container} failed")
    return len(out)


def mount_bytes(result):
    """Bytes the backup wrote for the bind-mount archives (those not reused)."""
    manifest = json.loads(Path(result["manifest"]).read_text())
    return sum(b["stored_size"] for m in manifest["mounts"] if not m.get("reused") for b in m.get("blobs", []))


def large_layer(opts, work, backup_args):
    """A container whose writable layer holds about 500 MB (2000 small files and 300 large ones, incompressible), a
    backup, then a 1 MB change (a new 1 MB file) and the backup after it. Returns (rows, checks, notes)."""
    name = f"{NAME}-large"
    sh("docker", "run", "-d", "--name", name, "--label", LABEL, opts.image, "sleep", "infinity")
    try:
        fill = (
            "import os\n"
            "for i in range(2000):\n"
            "    d = f'/opt/data/small/{i % 40}'; os.makedirs(d, exist_ok=True)\n"
            "    open(f'{d}/f{i}.bin', 'wb').write(os.urandom(20_000))\n"
            "for i in range(300):\n"
            "    d = f'/opt/data/large/{i % 10}'; os.makedirs(d, exist_ok=True)\n"
            "    open(f'{d}/g{i}.bin', 'wb').write(os.urandom(1_000_000 + (i * 7919) % 2_000_000))\n"
        )
        sh("docker", "exec", name, "python3", "-c", fill)
        args = {**backup_args, "container": name, "include_workdir": False}
        base_s, base = module("container_backup", args, work)
        layer = json.loads(Path(base["manifest"]).read_text())["layers"][-1]
        sh("docker", "exec", name, "python3", "-c",
           "import os; open('/opt/data/small/7/new-1mb.bin', 'wb').write(os.urandom(1_000_000))")  # fmt: skip
        small_s, small = module("container_backup", args, work)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    rows = [
        row(f"fast backup of a {layer['size'] / MB:.0f} MB writable layer", base_s, written=base["bytes_written"]),
        row("fast backup after a 1 MB change to it", small_s, written=small["bytes_written"]),
    ]
    checks = [
        ("after a 1 MB change to a 500 MB writable layer, MB written (at most 5)", small["bytes_written"] / MB, 5)
    ]
    notes = [
        f"500 MB layer: {base['path_taken']}, {base['chunks_new']} chunks written; after the 1 MB change: "
        f"{small['path_taken']}, {small['chunks_new']} chunks written, {small['chunks_reused']} reused, paused "
        f"{small['paused_seconds']:.2f} s"
    ]
    return rows, checks, notes


def start_container(image, workdir, port):
    workdir.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        (workdir / f"notebook-{i}.ipynb").write_text(json.dumps({"cells": [{"source": f"print({i})\n" * 20_000}]}))
    os.chown(workdir, 1000, 1000)
    sh(
        "docker", "run", "-d", "--name", NAME, "--label", LABEL, "--ipc=host", "--restart", "unless-stopped",
        "-p", f"127.0.0.1:{port}:8888", "-v", f"{workdir}:/workspace", "-e", "GPULAB_BENCH=1", image,
    )  # fmt: skip
    time.sleep(5)  # Jupyter writes its runtime files


def row(label, seconds, *, written=None, disk=None, base=None, base_bytes=None):
    ratio = f"{seconds / base:6.2f}" if base else " " * 6
    share = f"{written / base_bytes * 100:7.1f}%" if base_bytes and written is not None else " " * 8
    written_s = f"{written / MB:10.1f}" if written is not None else " " * 10
    disk_s = f"{disk / MB:10.1f}" if disk is not None else " " * 10
    return f"  {label:<46} {seconds:8.1f} {written_s} {disk_s}   {ratio} {share}"


def phases(result):
    return ", ".join(f"{k} {v:.1f}" for k, v in result.get("timings", {}).items() if v >= 0.05)


def first_backups(opts, work, backup_args):
    """The plain way and container_backup's first backup (into an empty store), opts.repeat times each, alternating
    which goes first. Returns (plain seconds, tar bytes, backup seconds, result, store size, notes); times: minimum."""
    plains, firsts = [], []
    for i in range(opts.repeat):
        store = work / f"store-{i}"
        for step in ("plain", "module") if i % 2 == 0 else ("module", "plain"):
            if step == "plain":
                plains.append(plain_backup("gpulab-bench/plain:1", work / "plain1.tar"))
            else:
                seconds, result = module("container_backup", {**backup_args, "store": str(store)}, work)
                firsts.append((seconds, result, disk_usage(store)))
        if i < opts.repeat - 1:
            shutil.rmtree(store)
    store_final = work / f"store-{opts.repeat - 1}"
    store_final.rename(work / "store")
    best = min(firsts, key=lambda x: x[0])
    result = best[1]  # (its store may be gone: only its figures are used)
    notes = [
        "plain commit + save, each run (s): " + ", ".join(f"{x:.1f}" for x in plains),
        "first backup, each run (s): " + ", ".join(f"{x[0]:.1f}" for x in firsts),
        f"first backup phases (s): {phases(best[1])}",
    ]
    return min(plains), (work / "plain1.tar").stat().st_size, best[0], result, best[2], notes


def empty_engine_restores(opts, work, restore_args):
    """docker load -i and container_restore into an empty engine of the benchmark's own, opts.repeat times each,
    alternating which goes first. Returns (load seconds, restore seconds, notes, engine); times: minimum."""
    engine = Engine(work)
    engine.start()
    loads, restores = [], []
    for i in range(opts.repeat):
        for step in ("load", "restore") if i % 2 == 0 else ("restore", "load"):
            if step == "load":
                loads.append(timed(engine.cli("load", "-i", str(work / "plain2.tar")))[0])
            else:
                args = {**restore_args, "docker_host": f"unix://{engine.sock}", "force": True}
                restores.append(module("container_restore", args, work))
                subprocess.run(engine.cli("rm", "-f", NAME), capture_output=True, check=False)
            engine.remove_all()
    best = min(restores, key=lambda x: x[0])
    notes = [
        "docker load -i into the empty engine, each run (s): " + ", ".join(f"{x:.1f}" for x in loads),
        "container_restore into the empty engine, each run (s): " + ", ".join(f"{x[0]:.1f}" for x in restores),
        f"restore (empty engine) phases (s): {phases(best[1])}",
    ]
    return min(loads), best[0], notes, engine


def main():  # one measured sequence, step by step
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="gpulab-test/dl-notebook:latest")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/gpulab-bench-backup"))
    parser.add_argument("--keep", action="store_true", help="keep the workdir (tars and store) afterwards")
    parser.add_argument("--no-empty-engine", action="store_true", help="skip the restore into an empty engine")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--repeat", type=int, default=2, help="runs of the first-backup and empty-engine pairs")
    parser.add_argument("--compression-level", type=int, help="container_backup's compression_level (its default)")
    opts = parser.parse_args()
    work = opts.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    store, notebook_dir = work / "store", work / "notebooks" / "alice"
    port = free_port()
    rows, checks, notes = [], [], []
    engine = None
    try:
        if not opts.no_warmup:
            print("warm-up: docker save of the image to /dev/null", flush=True)
            subprocess.run(f"docker save {opts.image} > /dev/null", shell=True, check=True)  # noqa: S602
        start_container(opts.image, notebook_dir, port)
        backup_args = {"container": NAME, "store": str(store), "keep_last": 3}
        if opts.compression_level is not None:
            backup_args["compression_level"] = opts.compression_level

        print(f"first backup: plain commit -p + save -o, and container_backup ({opts.repeat} x each)", flush=True)
        plain1, tar1, first_s, first, store1, more = first_backups(opts, work, backup_args)
        notes.extend(more)
        rows.append(row("plain: docker commit -p + docker save -o", plain1, written=tar1, disk=tar1))
        rows.append(
            row("container_backup, first backup", first_s, written=first["bytes_written"], disk=store1, base=plain1,
                base_bytes=tar1)
        )  # fmt: skip

        changed = change_container(notebook_dir)
        level = backup_args.get("compression_level", -1)
        change_z = compressed_size(NAME, ["/root/.local", "/root/checkpoint.pt"], level)
        print(f"changed {changed / MB:.1f} MB inside the container; second backup", flush=True)
        plain2 = plain_backup("gpulab-bench/plain:2", work / "plain2.tar")
        tar2 = (work / "plain2.tar").stat().st_size
        second_s, second = module("container_backup", backup_args, work)
        store2 = disk_usage(store)
        rows.append(row("plain: commit -p + save -o after the change", plain2, written=tar2, disk=tar2))
        rows.append(
            row("container_backup, second backup", second_s, written=second["bytes_written"], disk=store2 - store1,
                base=plain2, base_bytes=tar2)
        )  # fmt: skip
        notes.append(f"second backup phases (s): {phases(second)}")
        notes.append(
            f"second backup: {second['path_taken']} ({second['path_reason'] or 'fast path'}), chunks "
            f"{second['chunks_new']} new, {second['chunks_reused']} reused, paused {second['paused_seconds']:.2f} s; "
            f"first backup: {first['path_taken']}, image layers stored first: {first['base_image_stored']}"
        )
        second_mounts = mount_bytes(second)
        second_layer = second["bytes_written"] - second_mounts
        rows.append(row("  the change, tar + zstd (same level)", 0.0, written=change_z))
        checks.append(("fast (second) backup wall time at most 0.1 x plain commit + save", second_s / plain2, 0.1))
        checks.append(
            (
                f"second backup's bytes for the container ({second_layer / MB:.1f} MB; work directory archive "
                f"{second_mounts / MB:.1f} MB more) at most 1.2 x the compressed change ({change_z / MB:.1f} MB)",
                second_layer / change_z,
                1.2,
            )
        )

        # (a) the machine's engine, which has the image the container was created from
        print("restore into the machine's engine (it has the container's base image)", flush=True)
        sh("docker", "rm", "-f", NAME)
        load_a, _ = timed(["docker", "load", "-i", str(work / "plain2.tar")])
        sh("docker", "rmi", "gpulab-bench/plain:2")
        restore_args = {"store": str(store), "container": NAME, "backup": second["backup_id"]}
        restore_a_s, restore_a = module("container_restore", restore_args, work)
        rows.append(row("docker load -i (engine has the base image)", load_a))
        rows.append(row("container_restore (engine has the base image)", restore_a_s, base=load_a))
        notes.append(f"restore (engine has the base image) phases (s): {phases(restore_a)}")
        ok_a = sh("docker", "exec", NAME, "ls", "/root/checkpoint.pt").strip() == "/root/checkpoint.pt"
        sh("docker", "rm", "-f", NAME)
        sh("docker", "rmi", restore_a["image"])

        print("a 500 MB writable layer, then a 1 MB change to it", flush=True)
        more_rows, more_checks, more = large_layer(opts, work, {**backup_args, "keep_last": 1})
        rows.extend(more_rows)
        checks.extend(more_checks)
        notes.extend(more)

        if not opts.no_empty_engine:
            print(f"restore into an empty engine of the benchmark's own ({opts.repeat} x each)", flush=True)
            load_b, restore_b_s, more, engine = empty_engine_restores(opts, work, restore_args)
            notes.extend(more)
            rows.append(row("docker load -i (empty engine)", load_b))
            rows.append(row("container_restore (empty engine)", restore_b_s, base=load_b))
            checks.append(("restore into the empty engine at most 1.3 x docker load -i", restore_b_s / load_b, 1.3))

        print()
        print(
            f"image {opts.image} ({tar1 / MB:.0f} MB as a tar), change inside the container {changed / MB:.1f} MB, "
            f"work directory included, compression_level {level}; times: best of {opts.repeat} where repeated"
        )
        print(f"  {'':<46} {'wall s':>8} {'written MB':>10} {'on disk MB':>10}   {'time x':>6} {'bytes %':>8}")
        print("\n".join(rows))
        checks[:0] = [
            ("first backup wall time at most 1.2 x plain", first_s / plain1, 1.2),
            ("first backup size on disk at most 60 % of the plain tar", store1 / tar1, 0.6),
            ("second backup writes at most 5 % of the plain tar", second["bytes_written"] / tar2, 0.05),
        ]
        print()
        for what, value, limit in checks:
            print(f"  {'ok  ' if value <= limit else 'MISS'} {what}: {value:.3f}")
        print(
            f"  second backup: {second['layers_new']} new layer(s), {second['layers_reused']} reused; restore sent "
            f"{restore_a['layers_sent']} layer(s) to the machine's engine; files back: {ok_a}"
        )
        for note in notes:
            print(f"  {note}")
        missed = [what for what, value, limit in checks if value > limit]
        if missed:
            raise SystemExit(f"missed: {'; '.join(missed)}")
    finally:
        subprocess.run(["docker", "rm", "-f", NAME], capture_output=True, check=False)
        for ref in sh("docker", "images", "--format", "{{.Repository}}:{{.Tag}}").split():
            if ref.startswith(("gpulab-bench/", f"gpulab-backup/{NAME}:")):
                subprocess.run(["docker", "rmi", ref], capture_output=True, check=False)
        if engine:
            engine.stop()
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root (it reads the engine's socket and may start a dockerd of its own)")
    main()
