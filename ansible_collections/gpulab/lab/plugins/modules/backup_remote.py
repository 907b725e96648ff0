#!/usr/bin/python
# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The copy of gpulab's backup store on the lab's own storage, through rclone: write the root-only configuration,
upload after a backup, retention there, fetch what a restore needs, scrub.

Why gpulab writes its own module: no Ansible module speaks rclone, and the store's rules (blobs before manifests,
blobs shared by servers, retention that spares what another server's manifests or upload need, every fetched blob
checked before it enters the store) are gpulab's own. The code lives in module_utils/backup/remote.py, which the
backup timer also runs as a command line.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: backup_remote
short_description: Copy gpulab's backup store to an rclone remote, and back for a restore
version_added: "0.1.0"
description:
  - O(action=config) writes the rclone configuration O(config) to O(config_file), root only (mode 0600); with
    O(crypt_password) it adds a crypt remote (C([gpulab-crypt])) over O(remote), so that the remote holds only
    encrypted file names and contents. The file is rewritten only when its content changes.
  - O(action=upload) copies the blobs of the store's manifests that the remote lacks (or holds with another size,
    as a killed upload leaves them) to C(blobs/sha256/) on the remote, shared by all servers, then the manifests to
    C(servers/<server>/backups/). A manifest is uploaded only when the remote holds all its blobs. Fails, saying the
    copy is incomplete, when rclone does; the local store is never changed.
  - O(action=prune) applies O(keep_last) to this server's backups on the remote (the newest one whose blobs are all
    there is always kept) and removes the blobs that no manifest of any server names; while an upload of any server
    runs (its lock file in C(locks/)) no blob is removed.
  - O(action=fetch) brings into the store, for each of O(containers) (all this server has on the remote when
    empty), the manifest of O(backup_id) or of the newest backup, and the blobs of it the store lacks; each blob's
    size and sha256 are checked before it is put into the store, and a damaged one is refused by its name. A
    container the remote has no backup of is named in RV(absent) and left to the restore.
  - O(action=verify) downloads every blob a manifest on the remote names and checks its sha256; fails naming each
    damaged or missing blob and the backups that need it. A damaged blob is moved to C(quarantine/sha256/) on the
    remote (not in check mode), so that the next upload of a server that still has it sends it again.
author:
  - gpulab developers (!UNKNOWN)
options:
  action:
    description: What to do.
    type: str
    required: true
    choices: [config, upload, prune, fetch, verify]
  remote:
    description: The rclone remote and path, for example V(nas:gpulab).
    type: str
    required: true
  config_file:
    description: The rclone configuration file on the server.
    type: path
    default: /etc/gpulab/rclone.conf
  config:
    description: The rclone configuration (the text of an rclone.conf), for O(action=config).
    type: str
    default: ""
  crypt_password:
    description:
      - With O(action=config), a crypt remote with this password over O(remote). With the other actions, any
        non-empty value means the remote is encrypted (the crypt remote is used).
    type: str
    default: ""
  crypt_salt:
    description: The crypt remote's second password (salt), for O(action=config).
    type: str
    default: ""
  server:
    description: This server's folder on the remote (C(servers/<server>/)).
    type: str
    default: ""
  store:
    description: The server's backup store.
    type: path
    default: /var/backups/gpulab
  keep_last:
    description: Backups kept per container on the remote (O(action=prune)).
    type: int
    default: 3
  containers:
    description: The containers to fetch (O(action=fetch)); empty - all this server has on the remote.
    type: list
    elements: str
    default: []
  backup_id:
    description: The backup to fetch (with one container in O(containers)); empty - the newest.
    type: str
    default: ""
extends_documentation_fragment:
  - gpulab.lab.attributes
  - gpulab.lab.attributes.idempotent
attributes:
  check_mode:
    support: full
    details:
      - Lists the remote and says what would be uploaded, removed or fetched; writes nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
    details:
      - A second upload, prune or fetch finds nothing to do.
requirements:
  - rclone on the server (Debian's and Ubuntu's package rclone).
notes:
  - The configuration holds the remote's credentials; the task that passes it needs C(no_log), and the options
    O(config), O(crypt_password) and O(crypt_salt) are never logged.
  - If the crypt password (and salt) is lost, everything on the remote is unreadable; keep it apart from the servers.
"""

EXAMPLES = r"""
- name: Write the remote's configuration
  gpulab.lab.backup_remote:
    action: config
    remote: nas:gpulab
    config: "{{ vault_rclone_conf }}"
  no_log: true

- name: Upload the store
  gpulab.lab.backup_remote:
    action: upload
    remote: nas:gpulab
    server: "{{ inventory_hostname }}"
"""

RETURN = r"""
blobs_uploaded:
  description: Blobs sent (O(action=upload)).
  type: int
  returned: upload
bytes_uploaded:
  description: Bytes sent (O(action=upload)).
  type: int
  returned: upload
blobs_there:
  description: Blobs the remote already had (O(action=upload)).
  type: int
  returned: upload
manifests_uploaded:
  description: Manifests sent (O(action=upload)).
  type: int
  returned: upload
manifests_there:
  description: Manifests the remote already had (O(action=upload)).
  type: int
  returned: upload
seconds:
  description: Duration of the upload or the scrub.
  type: float
  returned: upload, verify
target:
  description: The rclone path the other actions use (the crypt remote's with a crypt password) (O(action=config)).
  type: str
  returned: config
removed_backups:
  description: Backups removed from the remote, as C(<container>/<id>) (O(action=prune)).
  type: list
  elements: str
  returned: prune
blobs_removed:
  description: Blobs removed from the remote (O(action=prune)).
  type: int
  returned: prune
bytes_freed:
  description: Bytes removed from the remote (O(action=prune)).
  type: int
  returned: prune
fetched:
  description: For each container, the backup fetched, the blobs and bytes fetched and the blobs the store had.
  type: list
  elements: dict
  returned: fetch
containers:
  description: The containers fetched (O(action=fetch)).
  type: list
  elements: str
  returned: fetch
absent:
  description: The containers asked for that this server has no backup of on the remote (O(action=fetch)).
  type: list
  elements: str
  returned: fetch
blobs_checked:
  description: Blobs downloaded and checked (O(action=verify)).
  type: int
  returned: verify
bytes_checked:
  description: Bytes of the blobs downloaded and checked (O(action=verify)).
  type: int
  returned: verify
unreferenced:
  description: Blobs on the remote that no manifest names (retention removes them) (O(action=verify)).
  type: int
  returned: verify
problems:
  description: Each damaged or missing blob on the remote, with the backups that need it (O(action=verify)).
  type: list
  elements: str
  returned: verify
notices:
  description: Things the user should know.
  type: list
  elements: str
  returned: always
"""

import os
import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils.backup import remote
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import BackupError, os_error_text


def settings_of(params):
    crypt = bool(params["crypt_password"])
    return remote.Settings(
        remote=remote.CRYPT_SECTION + ":" if crypt else params["remote"],
        config=params["config_file"],
        server=params["server"],
        store=params["store"],
        keep_last=params["keep_last"],
        shown=params["remote"] + (" (encrypted)" if crypt else ""),
    )


def run(module):
    p, check = module.params, module.check_mode
    if p["action"] == "config":
        current = remote.read_text(p["config_file"])
        text, target = remote.config_text(
            p["config"], p["remote"], crypt_password=p["crypt_password"], crypt_salt=p["crypt_salt"], current=current
        )
        return {"changed": remote.write_config(p["config_file"], text, check), "target": target, "notices": []}
    if not p["server"]:
        raise BackupError("server is required: the remote's folder of this server (servers/<server>/)")
    settings = settings_of(p)
    if p["action"] == "upload":
        up = remote.upload(settings, check_mode=check)
        return {
            "changed": bool(up.blobs or up.manifests),
            "blobs_uploaded": up.blobs,
            "bytes_uploaded": up.bytes,
            "blobs_there": up.blobs_there,
            "manifests_uploaded": up.manifests,
            "manifests_there": up.manifests_there,
            "seconds": up.seconds,
            "notices": up.warnings,
        }
    if p["action"] == "prune":
        pruned = remote.prune(settings, check_mode=check)
        return {
            "changed": bool(pruned.manifests or pruned.blobs),
            "removed_backups": pruned.manifests,
            "blobs_removed": pruned.blobs,
            "bytes_freed": pruned.bytes,
            "notices": pruned.warnings,
        }
    if p["action"] == "fetch":
        if p["backup_id"] and len(p["containers"]) != 1:
            raise BackupError("backup_id names one backup of one container: give that one container in containers")
        found = remote.fetch(settings, p["containers"], p["backup_id"], check_mode=check)
        return {
            "changed": any(f.new for f in found.fetched),
            "fetched": [f._asdict() for f in found.fetched],
            "containers": [f.container for f in found.fetched],
            "absent": found.absent,
            "notices": [n for f in found.fetched for n in f.notices],
        }
    scrubbed = remote.scrub(settings, check_mode=check)
    if scrubbed.problems:
        module.fail_json(
            msg=f"the copy on {settings.name} is damaged: " + "; ".join(scrubbed.problems),
            problems=scrubbed.problems,
            blobs_checked=scrubbed.blobs,
        )
    return {
        "changed": False,
        "blobs_checked": scrubbed.blobs,
        "bytes_checked": scrubbed.bytes,
        "unreferenced": scrubbed.unreferenced,
        "seconds": scrubbed.seconds,
        "problems": [],
        "notices": [],
    }


def main():
    module = AnsibleModule(
        argument_spec={
            "action": {"type": "str", "required": True, "choices": ["config", "upload", "prune", "fetch", "verify"]},
            "remote": {"type": "str", "required": True},
            "config_file": {"type": "path", "default": "/etc/gpulab/rclone.conf"},
            "config": {"type": "str", "default": "", "no_log": True},
            "crypt_password": {"type": "str", "default": "", "no_log": True},
            "crypt_salt": {"type": "str", "default": "", "no_log": True},
            "server": {"type": "str", "default": ""},
            "store": {"type": "path", "default": "/var/backups/gpulab"},
            "keep_last": {"type": "int", "default": 3},
            "containers": {"type": "list", "elements": "str", "default": []},
            "backup_id": {"type": "str", "default": ""},
        },
        supports_check_mode=True,
    )
    try:
        result = run(module)
    except BackupError as e:
        module.fail_json(msg=str(e))
    except OSError as e:
        module.fail_json(msg=f"backup_remote {module.params['action']}: {os_error_text(e)}")
    except Exception as e:
        module.fail_json(msg=f"Unexpected error in backup_remote: {e}", exception=traceback.format_exc())
    for notice in result["notices"]:
        module.warn(notice)
    module.exit_json(**result)


if __name__ == "__main__":
    os.umask(0o077)
    main()
