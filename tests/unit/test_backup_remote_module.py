"""Module backup_remote in-process (its actions over remote.py, with a real rclone and its local backend): the
configuration written root-only and only when it changes, no secret in its result, check mode, upload figures, and
a scrub that fails naming the damaged blob."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess

import pytest
from backup_harness import run_module
from module_harness import ModuleFail
from test_backup_remote import add_backup

from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store
from ansible_collections.gpulab.lab.plugins.modules import backup_remote

pytestmark = [
    pytest.mark.skipif(not shutil.which("rclone"), reason="rclone is not installed (apt-get install rclone)"),
    pytest.mark.usefixtures("capture_exit"),
]


@pytest.fixture
def lab(tmp_path):
    nas = tmp_path / "nas"
    nas.mkdir()
    args = {
        "remote": f"nas:{nas}",
        "config_file": str(tmp_path / "etc" / "rclone.conf"),
        "crypt_password": secrets.token_hex(12),
        "server": "gpu1",
        "store": str(tmp_path / "store"),
    }
    return tmp_path, nas, args


def test_the_configuration_is_written_root_only_once_and_its_secrets_never_come_back(lab):
    tmp_path, _nas, args = lab
    config = {**args, "action": "config", "config": "[nas]\ntype = local\n", "crypt_salt": secrets.token_hex(6)}
    predicted = run_module(backup_remote, config, check_mode=True)
    assert predicted["changed"] and not (tmp_path / "etc" / "rclone.conf").exists()
    written = run_module(backup_remote, config)
    assert written["changed"]
    path = tmp_path / "etc" / "rclone.conf"
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "[gpulab-crypt]" in text and config["crypt_password"] not in text and config["crypt_salt"] not in text
    assert run_module(backup_remote, config)["changed"] is False
    for result in (predicted, written):
        assert config["crypt_password"] not in json.dumps(result) and config["crypt_salt"] not in json.dumps(result)


def test_upload_reports_its_figures_check_mode_sends_nothing_and_a_damaged_blob_fails_the_scrub(lab):
    _tmp, nas, args = lab
    run_module(backup_remote, {**args, "action": "config", "config": "[nas]\ntype = local\n"})
    manifest = add_backup(Store(args["store"], create=True), "nb", "20260101T000000.000Z-aaaaaa", b"z" * 300)
    plan = run_module(backup_remote, {**args, "action": "upload"}, check_mode=True)
    assert (plan["changed"], plan["blobs_uploaded"], plan["bytes_uploaded"]) == (True, 1, 300)
    assert not list(nas.iterdir())
    done = run_module(backup_remote, {**args, "action": "upload"})
    assert (done["blobs_uploaded"], done["manifests_uploaded"]) == (1, 1)
    assert run_module(backup_remote, {**args, "action": "upload"})["changed"] is False
    assert run_module(backup_remote, {**args, "action": "verify"})["blobs_checked"] == 1
    digest = manifest["layers"][0]["blobs"][0]["digest"]
    name = f"blobs/sha256/{digest[7:]}"
    reverse = subprocess.run(
        ["rclone", "--config", args["config_file"], "cryptdecode", "--reverse", "gpulab-crypt:", name],
        capture_output=True,
        text=True,
        check=True,
    )
    encrypted = nas / reverse.stdout.split()[-1]
    encrypted.write_bytes(b"x" * encrypted.stat().st_size)
    with pytest.raises(ModuleFail) as failed:
        run_module(backup_remote, {**args, "action": "verify"}, check_mode=True)
    assert f"blob {digest} cannot be read (damaged)" in failed.value.result["msg"]
    with pytest.raises(ModuleFail, match="backup_id names one backup of one container"):
        run_module(backup_remote, {**args, "action": "fetch", "backup_id": "20260101T000000.000Z-aaaaaa"})
