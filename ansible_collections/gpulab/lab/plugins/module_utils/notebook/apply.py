# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Every student's notebook of one server in one run (module notebook_containers): per student, what changes and
why, then the change itself.

  - files: the workdir and the Jupyter config files (folders.py); a changed config restarts a running notebook;
  - a container that is missing is created on the lab image;
  - one whose settings changed (the hash label of desired.py) is recreated with its environment carried over: a
    safety backup first (when the backup store is there), the container stopped, its writable layer committed
    (images.carry_over), a new container on that image with the new settings; the old one is only renamed aside
    until the new one is created and started, and comes back when that fails;
  - a new lab image (another image ID than the environment was made from) follows the student's image policy: keep
    (the container stays; the update is reported as pending, with how to take it), rebase (the student's layers from
    the safety backup on the new image, images.rebase) or replace (a fresh container on the new image; the safety
    backup holds the old environment, restore.yml brings it back). rebase and replace need a safety backup;
  - state absent: a safety backup, then the container removed (the workdir stays);
  - the wait for Jupyter's /api/status, of the containers this run started, all at once at the end.
A student whose change fails (a safety backup that cannot be written, an engine that refuses) keeps the container as
it was; the others go on and the run reports every failure at the end. Check mode changes nothing and says per
student what would change. Each student's report is an Outcome; nothing here knows about Ansible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import re
import struct
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils.backup.backup import BackupJob
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import DEFAULT_FLATTEN_THRESHOLD, BackupError
from ansible_collections.gpulab.lab.plugins.module_utils.notebook import folders, images
from ansible_collections.gpulab.lab.plugins.module_utils.notebook.desired import (
    LABEL_BASE,
    LABEL_IMAGE,
    LABEL_SETTINGS,
    Desired,
    changed_keys,
    summary_of,
    summary_text,
)

POLICIES = ("keep", "rebase", "replace")
TOKEN_IN_LOG = re.compile(r"(token=)[^&\s]+")
STOP_SECONDS = 10


class Options(NamedTuple):
    """The module's options that are the same for every student."""

    configs: dict  # name -> the JSON config with the token or password hash (a secret)
    log_filter: str  # files/gpulab_jupyter_config.py of the role
    config_dir: str
    restart_policy: str = "unless-stopped"
    image_policy: str = "keep"
    safety_backup: bool = True
    safety_backup_store: str = "/var/backups/gpulab"
    safety_backup_keep_last: int = 3
    flatten_threshold: int = DEFAULT_FLATTEN_THRESHOLD
    wait_timeout: int = 120
    check_mode: bool = False


@dataclass
class Outcome:
    """One student's part of the run: what changed (or would), why, and what the student should be told."""

    name: str
    container: str
    action: str = "unchanged"  # created, recreated, rebased, replaced, started, restarted, stopped, removed, ...
    changed: bool = False
    settings_changed: list = field(default_factory=list)
    files: list = field(default_factory=list)
    kernels_restarted: bool = False
    carried_over: bool = False
    image: str | None = None
    safety_backup: dict | None = None
    pending_update: str | None = None
    messages: list = field(default_factory=list)
    error: str | None = None
    before: str | None = None
    after: str | None = None

    def say(self, text):
        self.messages.append(f"{self.name}: {text}")

    def as_dict(self):
        return dataclasses.asdict(self)


class Wait(NamedTuple):
    outcome: Outcome
    user: dict
    container: str


def _change_words(before, after, keys):
    words = []
    for key in keys:
        if key == "env":
            old, new = before.get("env") or {}, after.get("env") or {}
            names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            words.append("environment (" + ", ".join(names) + ")")
        elif key in ("mounts", "command", "user"):
            words.append(key)
        else:
            words.append(f"{key.replace('_', ' ')} {before.get(key)} -> {after.get(key)}")
    return words


class Run:
    """One run over a server's students."""

    def __init__(self, engine, options):
        self.engine = engine
        self.o = options
        self.check = options.check_mode
        self._images = {}
        self.waits = []

    # what there is

    def image(self, ref):
        if ref not in self._images:
            self._images[ref] = self.engine.image(ref)
        return self._images[ref]

    def store_ready(self):
        return bool(self.o.safety_backup and self.o.safety_backup_store and os.path.isdir(self.o.safety_backup_store))

    def apply(self, users):
        containers = {}
        for c in self.engine.json("GET", api.query("/containers/json", all="1")) or []:
            for name in c.get("Names") or []:
                containers[name.lstrip("/")] = c
        if any(u["state"] != "absent" for u in users):
            self._config_root()
        outcomes = []
        for user in users:
            out = Outcome(user["name"], user["container"])
            try:
                self._one(user, containers.get(user["container"]), out)
            except (api.DockerApiError, BackupError, OSError, ValueError) as e:
                out.error = f"{user['name']}: {e}"
            outcomes.append(out)
        self._wait()
        return outcomes

    def _config_root(self):
        root = self.o.config_dir
        if not os.path.isdir(os.path.dirname(root)) and not self.check:
            os.makedirs(os.path.dirname(root), 0o755, exist_ok=True)
        folders.ensure_folder(root, 0, 0, 0o700, self.check)

    # one student

    def _one(self, user, listed, out):
        if user["state"] == "absent":
            self._absent(user, listed, out)
            return
        d = Desired.of(user, self.o.restart_policy, self.o.image_policy)
        if d.policy not in POLICIES:
            raise ValueError(f"image_policy must be one of {', '.join(POLICIES)}, not {d.policy!r}")
        config = (self.o.configs or {}).get(d.name)
        if config is None:
            raise ValueError(f"no Jupyter config was given for {d.name}")
        out.files, config_changed = folders.student_files(user, config, self.o.log_filter, self.check)
        if out.files:
            out.changed = True
            out.say(("would write " if self.check else "wrote ") + ", ".join(out.files))
        lab = self.image(d.image)
        if lab is None:
            raise ValueError(f"the image {d.image} is not on the server (role deepo puts it there)")
        if listed is None:
            self._create(d, user, lab, out)
            return
        info = self.engine.container(listed["Id"])
        labels = (info.get("Config") or {}).get("Labels") or {}
        env_image = self.image(info["Image"]) or {}
        base_id = labels.get(LABEL_BASE) or (lab["Id"] if images.based_on(env_image, lab) else info["Image"])
        update = base_id != lab["Id"]
        settings_changed = labels.get(LABEL_SETTINGS) != d.digest
        before = summary_of(labels)
        keys = changed_keys(before, d.summary)
        if settings_changed:
            out.settings_changed = keys if keys is not None else ["made by an older gpulab"]
        if update and d.policy != "keep" and not self.store_ready():
            out.say(
                f"the lab image {d.image} is new, but image_policy {d.policy} needs a safety backup first and "
                f"{self._no_store()}: the container stays on its image"
            )
            self._pending(d, labels, out)
        elif update and d.policy != "keep":
            self._recreate(d, user, info=info, lab=lab, base_id=base_id, mode=d.policy, out=out, before=before)
            return
        elif update:
            self._pending(d, labels, out)
        if settings_changed:
            self._recreate(d, user, info=info, lab=lab, base_id=base_id, mode="carry", out=out, before=before)
        else:
            self._state(d, user, info, config_changed, out)

    def _no_store(self):
        if not self.o.safety_backup:
            return "notebook_safety_backup is off"
        return f"there is no backup store at {self.o.safety_backup_store} (role backup makes it)"

    def _pending(self, d, labels, out):
        old = labels.get(LABEL_IMAGE) or "its image"
        new_id = (self.image(d.image) or {}).get("Id", "")[:19]
        how = (
            "to take it, set image_policy: rebase (keeps what the student installed; packages built against the old "
            "image may need reinstalling) or replace (a fresh container; restore.yml brings the old one back from the "
            "safety backup) in the student's notebook_users entry, or notebook_image_policy, and run the play again"
        )
        out.pending_update = (
            f"image update pending: the notebook runs on {old} as it was, the lab's image is now {d.image} ({new_id}); "
            + how
        )
        out.say(out.pending_update)

    # the changes

    def _create(self, d, user, lab, out):
        out.action, out.changed, out.image = "created", True, d.image
        out.after = summary_text(d.summary)
        if self.check:
            out.say(f"would be created ({d.container}, image {d.image})")
            return
        body = d.body(d.image, d.labels(d.image, lab["Id"]))
        created = self.engine.json("POST", api.query("/containers/create", name=d.container), body)
        if d.state == "started":
            self.engine.json("POST", f"/containers/{created['Id']}/start", ok=(204, 304))
            self.waits.append(Wait(out, user, created["Id"]))
        out.say(f"created ({d.container}, image {d.image}){', started' if d.state == 'started' else ''}")

    def _state(self, d, user, info, config_changed, out):
        state = info.get("State") or {}
        running = bool(state.get("Running")) and not state.get("Paused")
        if d.state == "started" and not state.get("Running"):
            out.action, out.changed = "started", True
            out.say("would be started" if self.check else "started")
            if not self.check:
                self.engine.json("POST", f"/containers/{info['Id']}/start", ok=(204, 304))
                self.waits.append(Wait(out, user, info["Id"]))
        elif d.state == "started" and running and config_changed:
            out.action, out.changed, out.kernels_restarted = "restarted", True, True
            out.say(
                ("would be restarted" if self.check else "restarted")
                + " so that Jupyter reads its new config (token, password or log filter); its running kernels stop"
            )
            if not self.check:
                self.engine.json("POST", api.query(f"/containers/{info['Id']}/restart", t=STOP_SECONDS))
                self.waits.append(Wait(out, user, info["Id"]))
        elif d.state == "stopped" and state.get("Running"):
            out.action, out.changed = "stopped", True
            out.say("would be stopped" if self.check else "stopped")
            if not self.check:
                self.engine.json("POST", api.query(f"/containers/{info['Id']}/stop", t=STOP_SECONDS), ok=(204, 304))

    def _recreate(self, d, user, *, info, lab, base_id, mode, out, before):
        """mode: carry (new settings, the environment carried over), rebase or replace (a new lab image)."""
        labels = (info.get("Config") or {}).get("Labels") or {}
        keep_image = mode == "carry" and base_id != lab["Id"]  # image policy keep: the old base stays
        out.action = {"carry": "recreated", "rebase": "rebased", "replace": "replaced"}[mode]
        out.changed, out.kernels_restarted = True, bool((info.get("State") or {}).get("Running"))
        out.carried_over = mode in ("carry", "rebase")
        out.before = summary_text(before) if before else "made by an older gpulab (no settings label)"
        out.after = summary_text(d.summary)
        why = (
            "settings changed: " + ", ".join(_change_words(before, d.summary, out.settings_changed))
            if before and out.settings_changed and mode == "carry"
            else "made by an older gpulab, recreated once"
            if mode == "carry"
            else f"new lab image {d.image}, image_policy {mode}"
        )
        safety = self.store_ready()
        if self.check:
            out.say(
                f"would be recreated ({why})"
                + (f", after a safety backup into {self.o.safety_backup_store}" if safety else "")
                + "; its running kernels would stop; "
                + self._environment_words(mode, would=True)
            )
            return
        running = bool((info.get("State") or {}).get("Running"))
        backup_id = None
        if safety and mode != "rebase":
            backup_id = self._backup(d.container, d.name, out)
            if backup_id is None:
                return
        if running:
            self.engine.json("POST", api.query(f"/containers/{info['Id']}/stop", t=STOP_SECONDS), ok=(204, 304))
        try:
            if mode == "rebase":  # the backup of the stopped container: nothing the student writes is missed
                backup_id = self._backup(d.container, d.name, out)
                if backup_id is None:
                    raise _LeftAsItWas
                image = images.rebase(
                    self.engine,
                    self.o.safety_backup_store,
                    d.container,
                    backup_id=backup_id,
                    old_base_info=self.image(base_id),
                    new_info=lab,
                )
            elif mode == "carry":
                image, flattened = images.carry_over(
                    self.engine, info["Id"], d.container, self.o.flatten_threshold, self.o.safety_backup_store
                )
                if flattened:
                    out.say(f"its image was flattened into one layer (flatten_threshold {self.o.flatten_threshold})")
            else:
                image = d.image
        except _LeftAsItWas:
            self._start_again(info, running)
            return
        except (api.DockerApiError, BackupError, OSError):
            self._start_again(info, running)
            raise
        new_base = base_id if keep_image else lab["Id"]
        image_name = (labels.get(LABEL_IMAGE) or d.image) if keep_image else d.image
        env_image = (self.engine.image(image) or {}).get("Config") or {}
        env_base = (self.image(new_base) or {}).get("Config") or {}
        body = d.body(image, d.labels(image_name, new_base), env_image.get("Env"), env_base.get("Env"))
        new_id = self._swap(d, info, body, running)
        if d.state == "started":
            self.waits.append(Wait(out, user, new_id))
        out.image = image
        images.forget_carry_images(self.engine, d.container, keep=image)
        out.say(
            f"{out.action} ({why}); "
            + ("its running kernels were stopped (a recreate restarts the notebook); " if running else "")
            + self._environment_words(mode, would=False, image=image, backup_id=backup_id)
        )

    def _environment_words(self, mode, would, image=None, backup_id=None):
        if mode == "carry":
            return ("its environment would be" if would else "its environment was") + (
                " carried over (what the student installed and changed inside the container"
                + (f": image {image})" if image else ")")
            )
        if mode == "rebase":
            return (
                ("the student's changes would be" if would else "the student's changes were")
                + " put on the new image"
                + (f" ({image})" if image else "")
                + "; packages built against the old image may need reinstalling"
            )
        where = f" (backup {backup_id} in {self.o.safety_backup_store})" if backup_id else ""
        return (
            ("it would start" if would else "it started")
            + " fresh on the new image: what the student installed inside the container is not carried over; "
            + f"restore.yml brings the old environment back from the safety backup{where}"
        )

    def _start_again(self, info, running):
        if running:
            with contextlib.suppress(api.DockerApiError):
                self.engine.json("POST", f"/containers/{info['Id']}/start", ok=(204, 304))

    def _swap(self, d, info, body, running):
        """The new container under the student's name; the old one aside until then, back when it fails."""
        aside = f"{d.container}-gpulab-old-{images.stamp()}"
        self.engine.json("POST", api.query(f"/containers/{info['Id']}/rename", name=aside))
        created = None
        try:
            created = self.engine.json("POST", api.query("/containers/create", name=d.container), body)
            if d.state == "started":
                self.engine.json("POST", f"/containers/{created['Id']}/start", ok=(204, 304))
        except api.DockerApiError as e:
            if created:
                self.engine.request("DELETE", api.query(f"/containers/{created['Id']}", force="1"))
            self.engine.json("POST", api.query(f"/containers/{info['Id']}/rename", name=d.container))
            self._start_again(info, running)
            raise api.DockerApiError(f"the new container could not be made ({e}); the old one runs as it was") from e
        self.engine.json("DELETE", api.query(f"/containers/{info['Id']}", force="1"))
        return created["Id"]

    def _absent(self, user, listed, out):
        container = user["container"]
        gone = folders.remove_folder(user["config_dir"], self.check)
        if gone:
            out.changed, out.files = True, gone
        if listed is None:
            return
        out.action, out.changed = "removed", True
        if self.check:
            safety = f", after a safety backup into {self.o.safety_backup_store}" if self.store_ready() else ""
            out.say(f"would be removed (container {container}{safety}; the workdir is kept)")
            return
        backup_id = self._backup(user["container"], user["name"], out) if self.store_ready() else None
        if self.store_ready() and backup_id is None:
            out.action = "unchanged"
            return
        self.engine.json("DELETE", api.query(f"/containers/{listed['Id']}", force="1"))
        images.forget_carry_images(self.engine, user["container"], keep=None)
        out.say(
            f"removed (container {container}; the workdir is kept"
            + (f"; restore.yml brings it back from backup {backup_id}" if backup_id else "")
            + ")"
        )

    def _backup(self, container, name, out):
        """The safety backup of the student's container into the store; its id, or None (out.error says why)."""
        try:
            report = BackupJob(
                container=container,
                store=self.o.safety_backup_store,
                keep_last=self.o.safety_backup_keep_last,
                flatten_threshold=self.o.flatten_threshold,
                docker_host=f"unix://{self.engine.socket}",
            ).run()
        except (BackupError, api.DockerApiError, OSError) as e:
            out.error = (
                f"{name}: the safety backup of {container} into {self.o.safety_backup_store} failed, so its "
                f"container was left as it is: {e}"
            )
            out.action, out.changed = "left as it was", bool(out.files)
            out.kernels_restarted = out.carried_over = False
            return None
        out.safety_backup = {
            "id": report["backup_id"],
            "store": self.o.safety_backup_store,
            "seconds": report["seconds"],
            "path_taken": report["path_taken"],
        }
        out.say(f"safety backup {report['backup_id']} into {self.o.safety_backup_store} ({report['seconds']} s)")
        return report["backup_id"]

    # the wait

    def _wait(self):
        if self.check or not self.waits or self.o.wait_timeout <= 0:
            return
        deadline = time.monotonic() + self.o.wait_timeout
        pending = list(self.waits)
        while pending:
            pending = [w for w in pending if not _answers(w.user)]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for w in pending:
            user = w.user
            w.outcome.error = (
                f"The notebook of {user['name']} ({user['container']}, image {user['image']}, "
                f"{user.get('flavour', '')}) did not answer on {_host(user)}:{user['port']} within "
                f"{self.o.wait_timeout} s. Its last log lines (tokens hidden): {self.log_tail(w.container)} The role "
                f"started {' '.join((user.get('command') or [])[:3])} for {user.get('flavour', '')}; where that is not "
                "the image's Jupyter, declare its flavour and Python in notebook_images."
            )

    def log_tail(self, container, lines=25):
        status, body = self.engine.request(
            "GET", api.query(f"/containers/{container}/logs", stdout="1", stderr="1", tail=str(lines))
        )
        if status != 200:
            return f"(no log: {api.error_of(body)})"
        text = _demultiplexed(body).decode(errors="replace")
        return " | ".join(TOKEN_IN_LOG.sub(r"\1(hidden)", line) for line in text.splitlines() if line.strip())


class _LeftAsItWas(Exception):
    """The safety backup failed (its Outcome says why): the container goes back to how it was."""


def _host(user):
    address = str(user.get("bind_address") or "127.0.0.1")
    return "127.0.0.1" if address in ("0.0.0.0", "::") else address  # noqa: S104 (the address listened on)


def _answers(user):
    """Whether Jupyter answers on the notebook's published port (200, or 403: it wants the token or password)."""
    conn = http.client.HTTPConnection(_host(user), int(user["port"]), timeout=3)
    try:
        conn.request("GET", "/api/status")
        return conn.getresponse().status in (200, 403)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _demultiplexed(body):
    """The text of a container's log as the engine sends it without a TTY: frames of an 8-byte header and data."""
    out, at = [], 0
    while at + 8 <= len(body) and body[at] in (0, 1, 2):
        (size,) = struct.unpack(">I", body[at + 4 : at + 8])
        out.append(body[at + 8 : at + 8 + size])
        at += 8 + size
    return b"".join(out) if out else body
