# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The scrub: every blob of the store read back and checked, spread over time, so that the whole store is verified
within a period the admin sets; and what the store knows of each backup (listing): complete or damaged and what it
lacks, and when it was last verified.

A blob is checked by the sha256 of its stored file against the one recorded when it was written: any changed byte
changes it, and it costs a read and a hash of the compressed bytes only (about half of the content of a deep-learning
image), no decompression. A file whose sha256 is not the recorded one is judged by its content (decompressed, its
sha256 and size), since a blob stored again from its source may have been compressed otherwise; only then is it
corrupt.

Each run verifies the blobs whose turn it is: those not verified for a period (or written longer ago and never
verified), and then, oldest verification first, its share of the store (the store's size x the time since the last
run / the period), so a timer that runs daily with a period of 30 days reads about a thirtieth of the store each day.
A full run (scrub --all, the playbook) verifies every blob once. What was verified, and when, is written to
<store>/scrub/state.json as the run goes (atomically, every few seconds and at the end, also when it is stopped), so
a run that is killed resumes: a killed full run goes on with the blobs it had not reached.

A blob found corrupt is moved to quarantine (Store.quarantine, with the store's lock held shared: no backup runs
then, and the blob is checked once more under it): no backup uses it again, every backup that needs it is damaged,
and the next backup whose source still has that content stores it again. Reading needs no lock: blobs are never
changed in place (a damaged one is replaced by a rename), and one that retention removes meanwhile is passed over.
Talks to no engine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import os
import time
from dataclasses import dataclass, field

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import BackupError, size_text
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store, manifest_blobs, write_json
from ansible_collections.gpulab.lab.plugins.module_utils.backup.verify import quarantine_corrupt, verify_blob

STATE_FORMAT = "gpulab-scrub"
DAY = 86400
SAVE_EVERY = 5.0  # seconds between two writes of the state while a run goes on
HISTORY = 20  # runs kept in the state


def utc(seconds):
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass
class ScrubReport:
    """What a scrub run did: the blobs and bytes it verified, how fast, what it quarantined, the damaged backups of the
    store (from any cause), and how much of the store was verified within the period."""

    store: str
    full: bool
    period_days: int
    check_mode: bool = False
    resumed: bool = False
    finished: bool = False
    blobs_checked: int = 0
    stored_bytes: int = 0
    content_bytes: int = 0
    seconds: float = 0.0
    mb_per_s: float = 0.0
    due_blobs: int = 0
    due_bytes: int = 0
    store_blobs: int = 0
    store_bytes: int = 0
    verified_within_period: float = 0.0
    quarantined: list = field(default_factory=list)
    damaged: list = field(default_factory=list)
    msg: str = ""

    def as_dict(self):
        return dataclasses.asdict(self)


class ScrubState:
    """<store>/scrub/state.json: when each blob was last verified (digest -> unix time), the start of a full run in
    progress, and the last runs' summaries."""

    def __init__(self, store):
        self.folder = os.path.join(store.path, "scrub")
        self.path = os.path.join(self.folder, "state.json")
        self.verified = {}
        self.full_started = None
        self.runs = []
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:  # a damaged state costs verifications again, never a backup
            self.problem = f"the scrub's state {self.path} could not be read ({e}): every blob counts as not verified"
            return
        if isinstance(data, dict) and data.get("format") == STATE_FORMAT:
            self.verified = {k: float(v) for k, v in (data.get("verified") or {}).items()}
            self.full_started = data.get("full_started")
            self.runs = list(data.get("runs") or [])[-HISTORY:]

    problem = None

    def last_run(self):
        return self.runs[-1] if self.runs else None

    def save(self):
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        data = {
            "format": STATE_FORMAT,
            "version": 1,
            "verified": self.verified,
            "full_started": self.full_started,
            "runs": self.runs[-HISTORY:],
        }
        write_json(self.path, data)


def store_blobs(store):
    """The blobs the store's readable manifests reference and that can be used (quarantined and missing ones are
    already known as damage): digest -> (blob entry, what)."""
    quarantined, out = store.quarantined(), {}
    for container in store.containers():
        for listed in store.listed(container):
            for blob, what in manifest_blobs(listed.manifest or {}):
                if blob["digest"] not in out and store.usable(blob, quarantined):
                    out[blob["digest"]] = (blob, f"{what} of backup {listed.id} of {container}")
    return out


def _written(store, digest):
    with contextlib.suppress(OSError):
        return os.stat(store.blob_path(digest)).st_mtime
    return 0.0


def due(store, state, blobs, *, period_days, full, now):
    """The digests this run verifies, in order: a full run every blob not verified since it started; otherwise the
    overdue ones (verified, or else written, more than a period ago) and then, oldest first, the run's share of the
    store."""
    period = period_days * DAY
    if full:
        return sorted(d for d in blobs if state.verified.get(d, 0.0) < state.full_started)
    since = {d: state.verified.get(d) or _written(store, d) for d in blobs}
    order = sorted(blobs, key=lambda d: (since[d], d))
    total = sum(blobs[d][0]["stored_size"] for d in blobs)
    last = state.last_run()
    elapsed = now - last["started"] if last else DAY  # a first run takes a day's share, and what is overdue
    share = total * min(1.0, max(0.0, elapsed) / period)
    picked, size = [], 0
    for digest in order:
        if since[digest] >= now - period and size >= share:
            break
        picked.append(digest)
        size += blobs[digest][0]["stored_size"]
    return picked


def listing(store, container=None, state=None):
    """Every backup of the store (or of one container), oldest first: id, creation, size, and what the store knows of
    it: complete, or damaged and what it lacks; when it was last verified (its blobs' oldest verification; None: not
    every blob has been verified yet)."""
    state = state or ScrubState(store)
    quarantined = store.quarantined()
    out = []
    for name in [container] if container else store.containers():
        for listed in store.listed(name):
            entry = {"container": name, "backup_id": listed.id}
            if listed.manifest is None:
                entry.update(complete=False, damaged=True, lacks=[listed.problem], last_verified=None)
                out.append(entry)
                continue
            manifest = listed.manifest
            blobs = {b["digest"]: b for b, _what in manifest_blobs(manifest)}
            lacks = [what for _digest, what in store.missing_blobs(manifest, quarantined)]
            times = [state.verified.get(d) for d in blobs]
            entry.update(
                created=manifest.get("created_utc"),
                layers=len(manifest.get("layers") or []),
                mounts=[m["source"] for m in manifest.get("mounts") or []],
                stored_bytes=sum(b["stored_size"] for b in blobs.values()),
                complete=not lacks,
                damaged=bool(lacks),
                lacks=lacks,
                last_verified=utc(min(times)) if times and None not in times else None,
            )
            out.append(entry)
    return out


def damaged_text(damaged):
    """One line naming the damaged backups and what they lack."""
    return "; ".join(f"{d['container']} {d['backup_id']} lacks {', '.join(d['lacks'])}" for d in damaged)


@contextlib.contextmanager
def _scrub_lock(store):
    """One scrub at a time on a store (a second one is refused at once, saying so)."""
    os.makedirs(os.path.join(store.path, "scrub"), mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(store.path, "scrub", "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"another scrub of {store.path} runs: it is left to finish") from None
        yield
    finally:
        os.close(fd)


def scrub(store_path, *, period_days=30, full=False, check_mode=False, workers=2, progress=None, now=None):
    """One scrub run of the store at store_path (see the module's text). check_mode: what is due and what would be
    found, with nothing written or moved. Returns a ScrubReport."""
    if int(period_days) < 1:
        raise BackupError(f"period_days must be at least 1 day, not {period_days}")
    store = Store(store_path)
    if not os.path.isdir(store.blobs):
        raise BackupError(f"{store.path} is not a backup store (it has no blobs/ folder)")
    lock = contextlib.nullcontext() if check_mode else _scrub_lock(store)
    with lock:
        return _scrub(
            store,
            period_days=int(period_days),
            full=full,
            check_mode=check_mode,
            workers=workers,
            progress=progress,
            now=now or time.time(),
        )


def _scrub(store, *, period_days, full, check_mode, workers, progress, now):
    started = time.monotonic()
    state = ScrubState(store)
    report = ScrubReport(store=store.path, full=full, period_days=period_days, check_mode=check_mode)
    if full:
        report.resumed = state.full_started is not None
        state.full_started = state.full_started or now
    blobs = store_blobs(store)
    todo = due(store, state, blobs, period_days=period_days, full=full, now=now)
    report.store_blobs = len(blobs)
    report.store_bytes = sum(b["stored_size"] for b, _what in blobs.values())
    report.due_blobs, report.due_bytes = len(todo), sum(blobs[d][0]["stored_size"] for d in todo)
    found, saved = [], [time.monotonic()]

    def done(items):
        at = now + time.monotonic() - started  # the run's clock (now may be given: a test's days)
        for blob, _what, _content in items:
            state.verified[blob["digest"]] = at
            report.blobs_checked += 1
            report.stored_bytes += blob["stored_size"]
            report.content_bytes += blob["size"]
        if progress:
            progress.update(verified_bytes=report.stored_bytes, due_bytes=report.due_bytes)
        if not check_mode and time.monotonic() - saved[0] >= SAVE_EVERY:
            state.save()
            saved[0] = time.monotonic()

    if progress:
        progress.set("scrub", due_bytes=report.due_bytes, due_blobs=report.due_blobs)
    try:
        problems = _check(store, [blobs[d] for d in todo], workers, done)
        if problems and not check_mode:
            found += _quarantine(store, problems, blobs, state)
        else:
            found += [{"digest": p.digest, "why": p.text, "quarantined": False} for p in problems]
        report.finished = True
        if full:
            state.full_started = None
    finally:
        report.seconds = round(time.monotonic() - started, 2)
        report.mb_per_s = round(report.stored_bytes / 1e6 / report.seconds, 1) if report.seconds else 0.0
        report.quarantined = found
        summary = {
            "started": now,
            "started_utc": utc(now),
            "ended_utc": utc(now + time.monotonic() - started),
            "full": full,
            "finished": report.finished,
            "blobs": report.blobs_checked,
            "stored_bytes": report.stored_bytes,
            "seconds": report.seconds,
            "quarantined": [q["digest"] for q in found],
        }
        if not check_mode:
            state.runs.append(summary)
            state.verified = {d: t for d, t in state.verified.items() if d in blobs}
            state.save()
    window = now - period_days * DAY
    report.verified_within_period = round(
        sum(b["stored_size"] for d, (b, _w) in blobs.items() if state.verified.get(d, 0.0) >= window)
        / max(1, report.store_bytes),
        4,
    )
    report.damaged = [
        {k: e[k] for k in ("container", "backup_id", "lacks")} for e in listing(store, state=state) if e["damaged"]
    ]
    report.msg = _message(report)
    return report


def _check(store, todo, workers, done):
    """Check each (blob entry, what) of todo in a pool of workers (the stored file's sha256, its content only when that
    differs), biggest first, so that the big image layers are read side by side; done([item]) in this thread as each
    one is found good. A stop (Stopped, in this thread) cancels what has not started and waits for the blobs being
    read. Returns the Problems of the corrupt ones."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    problems = []
    try:
        futures = {
            pool.submit(verify_blob, store, blob, what, False): (blob, what, False)
            for blob, what in sorted(todo, key=lambda item: -item[0]["stored_size"])
        }
        for future in concurrent.futures.as_completed(futures):
            problem = future.result()
            if problem is None:
                done([futures[future]])
            elif problem.corrupt:  # a missing one was removed by retention meanwhile: no blob, no damage of its own
                problems.append(problem)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return problems


def _quarantine(store, problems, blobs, state):
    """Quarantine the corrupt blobs found, with the store's lock held shared (no backup can reference them meanwhile),
    each checked once more under it: one that a backup replaced meanwhile may be good now."""
    out = []
    with store.lock(exclusive=False):
        checked = [verify_blob(store, *blobs[problem.digest], False) for problem in problems]
        again = [problem for problem in checked if problem and problem.corrupt]
        for problem, text in zip(again, quarantine_corrupt(store, again, "scrub")):
            state.verified.pop(problem.digest, None)
            out.append({"digest": problem.digest, "why": text, "quarantined": True})
    return out


def _message(report):
    done = f"verified {report.blobs_checked} blob(s), {size_text(report.stored_bytes)}, in {report.seconds} s"
    if report.seconds:
        done += f" ({report.mb_per_s} MB/s)"
    if not report.finished:
        done += f", {report.due_blobs - report.blobs_checked} due blob(s) left for the next run"
    within = f"{report.verified_within_period * 100:.1f} % of the store verified in the last {report.period_days} days"
    text = f"scrub of {report.store}: {done}; {within}"
    if report.quarantined:
        text += f"; {len(report.quarantined)} corrupt blob(s) " + (
            "quarantined" if not report.check_mode else "found (check mode: not moved)"
        )
    if report.damaged:
        text += (
            f"; DAMAGED backups: {damaged_text(report.damaged)}. The next backup of each container stores the "
            "content again from its source where the source still has it"
        )
    return text
