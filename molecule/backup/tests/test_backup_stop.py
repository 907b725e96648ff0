"""`systemctl stop` of the timer's service while its backup holds a notebook paused (issue 14): the backup thaws the
notebook and removes its partial files before it exits (SIGTERM, KillMode=mixed), and the unit's ExecStopPost (cli
thaw) runs after it. Runs after test_backup_cycle.py, on the restored notebooks; the file it adds is removed again.
"""

import time

STORE = "/var/backups/gpulab"
NOTEBOOK = "notebook-student1"  # backed up first (the timer takes the notebooks by name)
BIG = "/root/gpulab-stop-test.bin"


def paused(host):
    return host.check_output(f"docker inspect -f '{{{{.State.Paused}}}}' {NOTEBOOK}") == "true"


def test_systemctl_stop_while_a_notebook_is_paused_thaws_it_and_leaves_no_partial_file(host):
    # 200 MB of random bytes in the writable layer: the fast path reads them, paused, for seconds.
    host.check_output(f"docker exec -u 0 {NOTEBOOK} sh -c 'head -c 200000000 /dev/urandom > {BIG}'")
    try:
        host.check_output("systemctl reset-failed gpulab-backup.service || true")
        since = host.check_output("date +%s")
        host.check_output("systemctl start --no-block gpulab-backup.service")
        deadline = time.monotonic() + 300
        while not (host.run(f"ls {STORE}/tmp/paused-*").rc == 0 and paused(host)):
            assert time.monotonic() < deadline, "the timer's backup never paused the notebook"
            time.sleep(0.05)
        started = time.monotonic()
        host.check_output("systemctl stop gpulab-backup.service")
        stopped_in = time.monotonic() - started
        assert not paused(host)
        assert stopped_in < 30, stopped_in
        assert host.check_output(f"ls -A {STORE}/tmp") == ""
        journal = host.check_output(f"journalctl -u gpulab-backup.service --since @{since} --no-pager -o cat")
        assert f"backup of {NOTEBOOK} failed: stopped (SIGTERM); what it paused was thawed" in journal
        assert "Traceback" not in journal
        assert '"thawed": []' in journal  # ExecStopPost ran after it, and found nothing left to thaw
        listing = host.check_output(
            "PYTHONPATH=/usr/local/lib/gpulab python3 -m "
            "ansible_collections.gpulab.lab.plugins.module_utils.backup.cli "
            f"list --store {STORE} --container {NOTEBOOK}"
        )
        assert '"complete": true' in listing and '"complete": false' not in listing
    finally:
        host.run(f"docker exec -u 0 {NOTEBOOK} rm -f {BIG}")
        host.run("systemctl reset-failed gpulab-backup.service")
