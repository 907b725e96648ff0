#!/usr/bin/python
# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Verify gpulab's backup store on the server now: every blob read back and checked (the scrub), a corrupt one moved to
quarantine, and the store's damaged backups named. The playbook gpulab.lab.verify runs it; the verify timer of role
backup runs the same code through the package's command line (module_utils/backup/cli.py scrub).

Why gpulab writes its own module: the store's format (content-addressed zstd blobs, manifests, the scrub's record of
what was verified when) is gpulab's own; no module of ansible.builtin or community.* reads it. The work is
module_utils/backup/scrub.py's.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: backup_scrub
short_description: Verify gpulab's backup store - read back every blob, quarantine the corrupt ones
version_added: "0.1.0"
description:
  - Reads back the blobs of the backup store that module M(gpulab.lab.container_backup) writes and checks each one
    (what its file decompresses to, by sha256 and size). With O(full) (the default) every blob is verified; otherwise
    the blobs whose turn it is, as the verify timer of role backup does - those not verified within O(period_days),
    and the run's share of the store.
  - When each blob was verified is recorded in the store (C(<store>/scrub/state.json)) as the run goes, so that a run
    that is stopped or killed goes on where it was at the next run; each of RV(backups) has its C(last_verified)
    time from it.
  - A corrupt blob is moved to the store's quarantine (C(<store>/quarantine/)) and never used again. Every backup that
    needs it is then damaged (RV(damaged) names each and what it lacks); the next backup of its container stores the
    content again from its source when the source still has it, and says so.
author:
  - gpulab developers (!UNKNOWN)
options:
  store:
    description: The backup store, a folder on the server.
    type: path
    required: true
  full:
    description: Verify every blob now; V(false) only the blobs due (as the timer does).
    type: bool
    default: true
  period_days:
    description: Days within which every blob is verified (what makes a blob due with O(full=false)).
    type: int
    default: 30
  progress_file:
    description: File the progress is written to as JSON (phase, verified_bytes, due_bytes), for async callers.
    type: path
extends_documentation_fragment: [gpulab.lab.attributes, gpulab.lab.attributes.idempotent]
attributes:
  check_mode:
    support: full
    details: Reads and checks the blobs due, and reports what it finds; moves nothing and records nothing.
  diff_mode:
    support: none
  idempotent:
    support: none
    details: Each run records what it verified; changed only when it moved a blob to quarantine.
notes:
  - Reads without the store's lock (blobs never change in place); it takes the lock shared only to quarantine, so a
    backup that runs meanwhile waits only for that moment.
"""

EXAMPLES = r"""
---
- name: Verify the whole backup store now
  gpulab.lab.backup_scrub:
    store: /var/backups/gpulab

- name: What a daily timer with a 30-day period would verify today
  gpulab.lab.backup_scrub:
    store: /var/backups/gpulab
    full: false
    period_days: 30
"""

RETURN = r"""
---
blobs_checked:
  description: Blobs verified good by this run.
  type: int
  returned: always
stored_bytes:
  description: Bytes of their stored (compressed) files read.
  type: int
  returned: always
content_bytes:
  description: Bytes of their content checked.
  type: int
  returned: always
seconds:
  description: Duration of the run.
  type: float
  returned: always
mb_per_s:
  description: Stored bytes read per second, in MB (10^6 bytes).
  type: float
  returned: always
due_blobs:
  description: Blobs that were due in this run (all with O(full)).
  type: int
  returned: always
finished:
  description: Whether the run verified every blob that was due.
  type: bool
  returned: always
resumed:
  description: Whether the run went on with a full run that had stopped before its end.
  type: bool
  returned: always
verified_within_period:
  description: Share (0 to 1) of the store's bytes verified within the last O(period_days) days.
  type: float
  returned: always
quarantined:
  description: The corrupt blobs found (digest, why, quarantined - false in check mode).
  type: list
  elements: dict
  returned: always
damaged:
  description: The store's damaged backups (container, backup_id, lacks - what each lacks and why), from any cause.
  type: list
  elements: dict
  returned: always
backups:
  description: Every backup of the store (container, backup_id, complete, damaged, lacks, last_verified in UTC).
  type: list
  elements: dict
  returned: always
msg:
  description: One line saying what the run did and naming the damaged backups.
  type: str
  returned: always
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils.backup import scrub
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import BackupError, Progress, os_error_text
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store


def main():
    module = AnsibleModule(
        argument_spec={
            "store": {"type": "path", "required": True},
            "full": {"type": "bool", "default": True},
            "period_days": {"type": "int", "default": 30},
            "progress_file": {"type": "path"},
        },
        supports_check_mode=True,
    )
    p = module.params
    progress = Progress(p["progress_file"])
    try:
        report = scrub.scrub(
            p["store"], period_days=p["period_days"], full=p["full"], check_mode=module.check_mode, progress=progress
        )
        backups = scrub.listing(Store(p["store"]))
    except BackupError as e:
        module.fail_json(msg=str(e))
    except OSError as e:
        module.fail_json(msg=f"Error verifying the store {p['store']}: {os_error_text(e)}")
    progress.remove()
    for damaged in report.damaged:
        lacks = "; ".join(damaged["lacks"])
        module.warn(f"backup {damaged['backup_id']} of {damaged['container']} is damaged: {lacks}")
    changed = any(q["quarantined"] for q in report.quarantined)
    module.exit_json(changed=changed, backups=backups, **report.as_dict())


if __name__ == "__main__":
    main()
