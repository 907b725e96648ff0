# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The backup's command line, which the systemd timer of role backup runs without Ansible:

    python3 -m ansible_collections.gpulab.lab.plugins.module_utils.backup.cli backup --settings FILE [--notebooks]
    ... backup --store DIR --container NAME [--container NAME...] [--keep-last N] [--no-include-workdir] ...
    ... thaw --settings FILE     (the unit's ExecStopPost: what a killed backup left paused, and its partial files)
    ... restore --store DIR --container NAME [--backup ID] [--verify-only] ...
    ... list --store DIR [--container NAME]
    ... scrub --store DIR [--period-days N] [--all] [--check]   (the verify timer: blobs read back and checked)

Its flags are the options of container_backup and container_restore (options.py), and a settings file holds them by
their names. --notebooks: also every notebook container role notebook made (label io.gpulab.notebook.user), asked of
the engine when the command runs. A backup prints one JSON result per container and line; errors go to stderr as one
line each (never a traceback), every container is attempted, and the exit status is 1 when any container was not
backed up (the last line names them); a line names the store's damaged backups, if any. scrub verifies its share of
the store (scrub.py), prints its result as one JSON line, and exits 1 when the store holds damaged backups (the verify
timer's unit fails and its journal names them). SIGTERM and SIGINT (`systemctl stop`) stop it cleanly: what it paused
is thawed and its partial files removed (a scrub keeps what it verified), and it exits with 128 + the signal's number.
Parses and prints only: the work is BackupJob's, RestoreJob's and scrub.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import sys

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils.backup import options, scrub, sources
from ansible_collections.gpulab.lab.plugins.module_utils.backup.backup import BackupJob
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import (
    NOTEBOOK_USER_LABEL,
    BackupError,
    Stopped,
    check_name,
    os_error_text,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.restore import RestoreJob
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store

PROG = "python3 -m ansible_collections.gpulab.lab.plugins.module_utils.backup.cli"
# thaw reads the backup's flags and settings file (it needs the store and the engine of the timer's backup).
COMMANDS = {"backup": options.BACKUP, "thaw": options.BACKUP, "restore": options.RESTORE}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def out(line, stream=None):
    """One line to stdout (or stream), at once: the timer's journal shows each container's result as it ends."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def err(line):
    out(f"gpulab_backup: {line}", sys.stderr)


def list_store(store_path, container=None):
    """The store's backups (scrub.listing: complete or damaged and what each lacks, when each was last verified)."""
    store = Store(store_path)
    if container:
        check_name(container, "container name")
    backups = scrub.listing(store, container)
    return {
        "store": store.path,
        "backups": backups,
        "damaged": [b["backup_id"] for b in backups if b["damaged"]],
        "store_bytes": store.disk_usage(),
    }


def tell_damage(store_path):
    """A line naming the store's damaged backups (the journal of the timer shows it), if there are any."""
    with contextlib.suppress(BackupError, OSError):
        damaged = [b for b in scrub.listing(Store(store_path)) if b["damaged"]]
        if damaged:
            err(f"damaged backups in {store_path}: {scrub.damaged_text(damaged)}")


def run_scrub(args):
    """scrub: one run (scrub.scrub), its result as one JSON line; 1 when the store holds damaged backups."""
    try:
        report = scrub.scrub(args.store, period_days=args.period_days, full=args.all, check_mode=args.check)
    except Stopped as e:
        err(f"scrub of {args.store} stopped ({e.signame}): what it verified is kept, its next run goes on from there")
        e.told = True
        raise
    out(json.dumps(report.as_dict(), sort_keys=True))
    err(report.msg)
    return 1 if report.damaged or report.quarantined else 0


def notebooks(engine):
    """The names of the notebook containers role notebook made (running or not), as the engine has them now."""
    path = api.query("/containers/json", all="1", filters=json.dumps({"label": [NOTEBOOK_USER_LABEL]}))
    return sorted(c["Names"][0].lstrip("/") for c in engine.json("GET", path) or [] if c.get("Names"))


def thaw(store_path, engine):
    """What backups that are gone (killed) left in the store: the containers they paused are unpaused (their markers)
    and their temporary files removed. A backup holding the store's lock has thawed them at its start (it is left
    alone); under restores (a shared lock) the containers are thawed and tmp/ is left to the next backup."""
    if not os.path.isdir(os.path.join(store_path, "tmp")):
        return {"store": store_path, "thawed": [], "removed": [], "msg": "the store has no tmp/: nothing to thaw"}
    store = Store(store_path)
    fd = os.open(store.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for mode in (fcntl.LOCK_EX, fcntl.LOCK_SH):
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                thawed = sources.thaw_marked(engine, store)
                removed = store.clean_tmp() if mode == fcntl.LOCK_EX else []
                return {"store": store.path, "thawed": thawed, "removed": removed}
        return {"store": store.path, "thawed": [], "removed": [], "msg": "a backup holds the store: it thawed it"}
    finally:
        os.close(fd)  # releases the lock


class StopSignals:
    """While in the with block, SIGTERM and SIGINT raise Stopped in the main thread, once: a second signal, during
    the cleanup the first one started, is noted and ignored. received: the first signal's number."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def _handler(self, signum, _frame):
        if self.received is None:
            self.received = signum
            raise Stopped(signal.Signals(signum).name)

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def parser():
    top = argparse.ArgumentParser(prog=PROG, description="gpulab's container backups (container_backup/restore)")
    sub = top.add_subparsers(dest="command", required=True)
    helps = {
        "backup": "back up containers into the store (one JSON result per line)",
        "thaw": "thaw what a killed backup left paused and remove its partial files (the unit's ExecStopPost)",
        "restore": "restore a container",
    }
    for command, table in COMMANDS.items():
        p = sub.add_parser(command, help=helps[command])
        options.add_options(p, table, optional=("container",) if table is options.BACKUP else ())
        if command == "backup":
            p.add_argument(
                "--notebooks",
                action="store_true",
                help=f"also back up every notebook container (label {NOTEBOOK_USER_LABEL}), as the engine has them now",
            )
    listing = sub.add_parser("list", help="list the backups in the store")
    listing.add_argument("--store", required=True)
    listing.add_argument("--container")
    check = sub.add_parser("scrub", help="read back and check the store's blobs that are due (the verify timer)")
    check.add_argument("--store", required=True)
    check.add_argument("--period-days", type=int, default=30, help="days within which every blob is verified")
    check.add_argument("--all", action="store_true", help="verify every blob now (resumes a full run that stopped)")
    check.add_argument("--check", action="store_true", help="find, quarantine nothing, write nothing")
    return top


def parse(argv):
    """Arguments of argv; a --settings FILE after the command is read as flags put before the others."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 3 and argv[0] in COMMANDS and argv[1] == "--settings":
        argv = [argv[0], *options.settings_argv(argv[2], COMMANDS[argv[0]]), *argv[3:]]
    return parser().parse_args(argv)


def unexpected(e):
    """An error gpulab did not foresee, in one line (the admin gets no traceback): its type and words."""
    if isinstance(e, OSError):
        return os_error_text(e)
    return f"unexpected error ({type(e).__name__}: {e}); please report it to gpulab's developers"


def backup_all(args, params):
    """Each container backed up in turn, every one attempted; returns the exit status."""
    names = list(params.pop("container") or [])
    if args.notebooks:
        engine = api.Engine(params["docker_host"], params["timeout"] or None)
        names += [n for n in notebooks(engine) if n not in names]
    if not names:
        if args.notebooks:
            err(f"no notebook container (label {NOTEBOOK_USER_LABEL}) on the engine: nothing to back up")
            return 0
        raise BackupError("no container to back up: give --container NAME (several times) or --notebooks")
    failed = []
    for number, container in enumerate(names):
        try:
            result = BackupJob(container=container, **params).run()
            out(json.dumps(result, sort_keys=True))
        except (BackupError, api.DockerApiError) as e:
            err(f"backup of {container} failed: {e}")
            failed.append(container)
        except Stopped as e:
            err(
                f"backup of {container} failed: stopped ({e.signame}); what it paused was thawed and its partial "
                "files removed, its earlier backups are intact"
            )
            failed += names[number:]
            err(f"{len(failed)} of {len(names)} container(s) not backed up: {', '.join(failed)}")
            e.told = True
            raise
        except Exception as e:  # any other container is still attempted
            err(f"backup of {container} failed: {unexpected(e)}")
            failed.append(container)
    if failed:
        err(f"{len(failed)} of {len(names)} container(s) not backed up: {', '.join(failed)}")
    if params.get("store"):
        tell_damage(params["store"])
    return 1 if failed else 0


def run(args):
    if args.command == "list":
        out(json.dumps(list_store(args.store, args.container), indent=1))
        return 0
    if args.command == "scrub":
        return run_scrub(args)
    if args.command == "restore":
        params = options.params_of(args, options.RESTORE)
        out(json.dumps(RestoreJob(**params).run(), indent=1))
        return 0
    params = options.params_of(args, options.BACKUP, required_if=options.BACKUP_REQUIRED_IF)
    if args.command == "thaw":
        engine = api.Engine(params["docker_host"], params["timeout"] or None)
        out(json.dumps(thaw(params["store"], engine), sort_keys=True))
        return 0
    return backup_all(args, params)


def main(argv=None):
    with StopSignals() as signals:
        try:
            return run(parse(argv))
        except (BackupError, api.DockerApiError) as e:
            err(str(e))
        except Stopped as e:
            if not e.told:
                err(f"stopped ({e.signame}) before it finished")
            return 128 + signals.received
        except Exception as e:
            err(unexpected(e))
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
