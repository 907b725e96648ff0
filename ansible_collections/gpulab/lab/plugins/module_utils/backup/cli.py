# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The backup's command line, which the systemd timer of role backup runs without Ansible:

    python3 -m ansible_collections.gpulab.lab.plugins.module_utils.backup.cli backup --settings FILE
    ... backup --store DIR --container NAME [--container NAME...] [--keep-last N] [--no-include-workdir] ...
    ... restore --store DIR --container NAME [--backup ID] [--verify-only] ...
    ... list --store DIR [--container NAME]

Its flags are the options of container_backup and container_restore (options.py), and a settings file holds them by
their names. A backup prints one JSON result per container and line; errors go to stderr, and the exit status is 1
when any container failed. Parses and prints only: the work is BackupJob's and RestoreJob's.
"""

from __future__ import annotations

import argparse
import json
import sys

from ansible_collections.gpulab.lab.plugins.module_utils.backup import options
from ansible_collections.gpulab.lab.plugins.module_utils.backup.backup import BackupJob
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import BackupError, check_name
from ansible_collections.gpulab.lab.plugins.module_utils.backup.restore import RestoreJob
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store, manifest_blobs
from ansible_collections.gpulab.lab.plugins.module_utils.docker_api import DockerApiError

PROG = "python3 -m ansible_collections.gpulab.lab.plugins.module_utils.backup.cli"
COMMANDS = {"backup": options.BACKUP, "restore": options.RESTORE}


def out(line, stream=None):
    """One line to stdout (or stream), at once: the timer's journal shows each container's result as it ends."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def list_store(store_path, container=None):
    store = Store(store_path)
    out = []
    for name in [check_name(container, "container name")] if container else store.containers():
        for manifest in store.backups_of(name):
            blobs = {b["digest"]: b for b, _what in manifest_blobs(manifest)}
            out.append(
                {
                    "container": name,
                    "backup_id": manifest["id"],
                    "created": manifest.get("created_utc"),
                    "layers": len(manifest.get("layers") or []),
                    "mounts": [m["source"] for m in manifest.get("mounts") or []],
                    "stored_bytes": sum(b["stored_size"] for b in blobs.values()),
                    "complete": not store.missing_blobs(manifest),
                }
            )
    return {"store": store.path, "backups": out, "store_bytes": store.disk_usage()}


def parser():
    top = argparse.ArgumentParser(prog=PROG, description="gpulab's container backups (container_backup/restore)")
    sub = top.add_subparsers(dest="command", required=True)
    helps = {"backup": "back up containers into the store (one JSON result per line)", "restore": "restore a container"}
    for command, table in COMMANDS.items():
        p = sub.add_parser(command, help=helps[command])
        options.add_options(p, table)
    listing = sub.add_parser("list", help="list the backups in the store")
    listing.add_argument("--store", required=True)
    listing.add_argument("--container")
    return top


def parse(argv):
    """Arguments of argv; a --settings FILE after the command is read as flags put before the others."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 3 and argv[0] in COMMANDS and argv[1] == "--settings":
        argv = [argv[0], *options.settings_argv(argv[2], COMMANDS[argv[0]]), *argv[3:]]
    return parser().parse_args(argv)


def main(argv=None):
    try:
        args = parse(argv)
        if args.command == "list":
            out(json.dumps(list_store(args.store, args.container), indent=1))
            return 0
        if args.command == "restore":
            params = options.params_of(args, options.RESTORE)
            out(json.dumps(RestoreJob(**params).run(), indent=1))
            return 0
        params = options.params_of(args, options.BACKUP, required_if=options.BACKUP_REQUIRED_IF)
    except (BackupError, DockerApiError) as e:
        out(f"gpulab_backup: {e}", sys.stderr)
        return 1
    failed = 0
    for container in params.pop("container"):
        try:
            result = BackupJob(container=container, **params).run()
            out(json.dumps(result, sort_keys=True))
        except (BackupError, DockerApiError) as e:
            out(f"gpulab_backup: backup of {container} failed: {e}", sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
