#!/usr/bin/env python3
"""Benchmark (a script, not a timed test): load a deep-learning-sized docker save archive through gpulab's module
docker_image_archive (the role deepo's archive path) and through plain `docker load -i`, in one run, and print both
times and their ratio.

The archive is `docker save` of gpulab-test/dl-notebook:latest (tests/harness/build-dl-image.sh: Jupyter and the CPU
build of PyTorch, about 1.8 GB). Each load goes into an empty engine: the script starts a second dockerd of its own
(its own data root, socket, pid file and bridge interface, no iptables rules), so the image must really be written,
and the machine's own engine and its images are not touched (it only reads gpulab-test/dl-notebook for docker save).
Between loads the image is removed from the benchmark engine. At the end the engine is stopped and --workdir removed
(unless --keep).

Rows: plain `docker load -i x.tar`; the module on x.tar (its time includes the full check pass it makes before it
loads); the module on x.tar.zst (what Docker 20.10 cannot load itself; compression time not counted).
The rounds alternate the three ways; the best time of each is compared.
Usage: tests/bench/bench_deepo_load.py [--image NAME] [--workdir DIR] [--rounds N] [--keep] (as root, with the venv's
python).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = ROOT / "ansible_collections" / "gpulab" / "lab" / "plugins" / "modules"
MODULE = MODULES / "docker_image_archive.py"
# Runs a module file as Ansible would on the server, with the collection (ansible_collections/ in argv[1]) importable.
RUN_MODULE = (
    "import runpy, sys; sys.path.insert(0, sys.argv[1]); "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
BRIDGE = "gpulab-bench0"  # the benchmark engine's own bridge interface
BRIDGE_ADDR = "198.18.213.1/24"  # from 198.18.0.0/15, the range reserved for benchmarks (RFC 2544)


def sh(*argv, **kw):
    return subprocess.run(list(argv), check=True, text=True, capture_output=True, **kw).stdout


class Engine:
    """A dockerd of the benchmark's own, with an empty data root."""

    def __init__(self, workdir):
        self.dir = workdir / "engine"
        self.sock = self.dir / "docker.sock"
        self.proc = None

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        # A bridge of its own. NEVER --bridge none: dockerd then deletes the interface docker0, which belongs to the
        # machine's own engine (its containers lose their network, new ones fail: "could not find bridge docker0").
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True, check=False).returncode != 0:
            sh("ip", "link", "add", "name", BRIDGE, "type", "bridge")
            sh("ip", "addr", "add", BRIDGE_ADDR, "dev", BRIDGE)
        log = os.open(self.dir / "dockerd.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.proc = subprocess.Popen(
            [
                "dockerd",
                "--data-root", str(self.dir / "data"),
                "--exec-root", str(self.dir / "exec"),
                "--pidfile", str(self.dir / "docker.pid"),
                "--host", f"unix://{self.sock}",
                "--bridge", BRIDGE, "--iptables=false", "--ip-masq=false", "--ip-forward=false",
                "--storage-driver", "overlay2",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        os.close(log)
        for _ in range(120):
            if self.docker_ok():
                return
            time.sleep(0.5)
        raise SystemExit(f"the benchmark's dockerd did not start: see {self.dir / 'dockerd.log'}")

    def docker_ok(self):
        return subprocess.run(self.cli("info"), capture_output=True, check=False).returncode == 0

    def cli(self, *args):
        return ["docker", "-H", f"unix://{self.sock}", *args]

    def remove_all(self):
        ids = sh(*self.cli("images", "-q")).split()
        if ids:
            sh(*self.cli("rmi", "-f", *sorted(set(ids))))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)


def timed(label, argv, progress_file=None):
    """Run argv, print progress lines from progress_file every 5 s, return seconds."""
    stop = threading.Event()

    def report():
        while not stop.wait(5):
            if progress_file and progress_file.exists():
                try:
                    p = json.loads(progress_file.read_text())
                except ValueError:
                    continue
                total = f" of {p['bytes_total'] >> 20}" if p["bytes_total"] else ""
                elapsed = time.monotonic() - started
                print(f"    {label}: {p['phase']} {p['bytes_done'] >> 20}{total} MiB, {elapsed:.0f} s", flush=True)

    started = time.monotonic()
    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    stop.set()
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def module_load(engine, archive, workdir):
    progress = workdir / "progress.json"
    args = workdir / "args.json"
    args.write_text(
        json.dumps(
            {
                "ANSIBLE_MODULE_ARGS": {
                    "path": str(archive),
                    "docker_host": f"unix://{engine.sock}",
                    "progress_file": str(progress),
                }
            }
        )
    )
    argv = [sys.executable, "-c", RUN_MODULE, str(ROOT), str(MODULE), str(args)]
    seconds, out = timed(f"module {archive.name}", argv, progress)
    result = json.loads(out[out.index("{") :])
    assert result.get("changed") is True, result
    return seconds, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="gpulab-test/dl-notebook:latest")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/gpulab-bench-deepo"))
    parser.add_argument("--keep", action="store_true", help="keep the workdir (archives) afterwards")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three loads (best time of each counts)")
    opts = parser.parse_args()
    workdir = opts.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    tar = workdir / "dl.tar"
    zst = workdir / "dl.tar.zst"

    print(f"docker save {opts.image} -> {tar}", flush=True)
    sh("docker", "save", "-o", str(tar), opts.image)
    sh("zstd", "-q", "-f", "-3", "-T0", str(tar), "-o", str(zst))
    print(f"archive: {tar.stat().st_size / 1e9:.2f} GB tar, {zst.stat().st_size / 1e9:.2f} GB tar.zst", flush=True)

    engine = Engine(workdir)
    engine.start()
    times = {"plain": [], "tar": [], "zst": []}
    try:
        # Rounds alternate the three ways, so that a busy moment of the machine does not fall on one way only; the
        # best time of each way over the rounds is compared.
        for rnd in range(1, opts.rounds + 1):
            plain, _ = timed("docker load -i", engine.cli("load", "-i", str(tar)))
            times["plain"].append(plain)
            print(f"  round {rnd}: docker load -i dl.tar   {plain:7.1f} s", flush=True)
            engine.remove_all()
            for key, archive in (("tar", tar), ("zst", zst)):
                seconds, result = module_load(engine, archive, workdir)
                times[key].append(seconds)
                print(
                    f"  round {rnd}: module, {archive.name:14} {seconds:7.1f} s (load part {result['seconds']} s)",
                    flush=True,
                )
                engine.remove_all()
        best = {k: min(v) for k, v in times.items()}
        print(
            f"best of {opts.rounds}: docker load -i {best['plain']:.1f} s, module .tar {best['tar']:.1f} s, "
            f"module .tar.zst {best['zst']:.1f} s"
        )
        print(
            f"ratio module/docker load -i: {best['tar'] / best['plain']:.2f} (tar), "
            f"{best['zst'] / best['plain']:.2f} (tar.zst)"
        )
    finally:
        engine.stop()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root (it starts a dockerd of its own)")
    main()
