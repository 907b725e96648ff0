"""Tests of plugins/filter/status.py: the thresholds, the table and the HTML page of role status's report."""

import copy
import re

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.gpulab.lab.plugins.filter import status

HOUR = 3600


def notebook(user, idle, gpu_mib, **extra):
    found = {
        "user": user,
        "container": f"notebook-{user}",
        "state": "running",
        "running": True,
        "port": 7777,
        "image": "lab/dl:1",
        "image_update_pending": False,
        "image_update_reason": None,
        "gpus": ["0"] if gpu_mib else [],
        "memory_bytes": 512 * 1024**2,
        "gpu_memory_mib": gpu_mib,
        "gpu_pids": [4242] if gpu_mib else [],
        "jupyter": {"answered": idle is not None, "error": None if idle is not None else "password login only"},
        "last_activity": "2026-12-01T07:00:00.000000Z" if idle is not None else None,
        "idle_seconds": idle,
        "idle_gpu_memory_mib": gpu_mib if idle else 0,
    }
    found.update(extra)
    return found


def backup(user, age, failed_since=False):
    return {
        "container": f"notebook-{user}",
        "user": user,
        "count": 0 if age is None else 2,
        "last_success": None if age is None else "2026-11-30T03:30:00Z",
        "last_success_age_seconds": age,
        "last_success_bytes": None if age is None else 20 * 1024**2,
        "complete": None if age is None else True,
        "last_failure": "2026-12-01T03:30:00Z" if failed_since else None,
        "last_failure_reason": "the Docker engine does not answer" if failed_since else None,
        "failed_since_last_success": failed_since,
    }


def server_status():
    return {
        "collected_at": "2026-12-01T08:00:00Z",
        "engine": {
            "answered": True,
            "running": True,
            "version": "27.5.1",
            "api_version": "1.47",
            "storage_driver": "overlay2",
            "data_root": "/var/lib/docker",
            "data_root_free_bytes": 5 * 1024**3,
            "data_root_total_bytes": 100 * 1024**3,
        },
        "gpu": {
            "present": True,
            "error": None,
            "driver_version": "580.159.04",
            "cuda_version": "13.0",
            "gpus": [
                {
                    "index": 0,
                    "uuid": "GPU-0",
                    "name": "NVIDIA H200",
                    "memory_used_mib": 9000,
                    "memory_total_mib": 143771,
                    "utilization_pct": 0,
                    "holders": [{"pid": 4242, "used_memory_mib": 9000, "container": "notebook-ana", "user": "ana"}],
                }
            ],
        },
        "notebooks": [
            notebook("ana", 30 * HOUR, 9000),
            notebook("bo", 2 * HOUR, 0),
            notebook("cy", None, 0, image_update_pending=True, image_update_reason="the lab configures lab/dl:2"),
        ],
        "backups": {
            "store": "/var/backups/gpulab",
            "present": True,
            "error": None,
            "store_bytes": 10 * 1024**3,
            "store_free_bytes": 50 * 1024**3,
            "store_total_bytes": 100 * 1024**3,
            "containers": [backup("ana", 3 * HOUR), backup("bo", 80 * HOUR), backup("cy", None, failed_since=True)],
        },
    }


def make_report(**thresholds):
    results = [
        {"host": "gpu1", "status": server_status()},
        {"host": "gpu2", "status": None, "error": "unreachable"},
        {},
    ]
    return status.status_report(results, ["gpu1", "gpu2", "gpu3"], "2026-12-01T08:00:01Z", **thresholds)


def test_thresholds_pick_who_is_over():
    report = make_report(idle_hours=24, backup_max_age="2d")
    kinds = [(a["host"], a["kind"], a["who"]) for a in report["alerts"]]
    assert kinds == [
        ("gpu1", "disk", None),  # 5 % free under 10 %
        ("gpu1", "idle-gpu", "ana"),  # 30 h idle, 9000 MiB; bo idles 2 h without GPU memory
        ("gpu1", "backup-age", "bo"),  # 80 h > 2 d
        ("gpu1", "backup-age", "cy"),  # never
        ("gpu1", "backup-failed", "cy"),
        ("gpu2", "unanswered", None),
        ("gpu3", "unanswered", None),
    ]
    [server] = report["servers"]
    assert [nb["idle_alert"] for nb in server["notebooks"]] == [True, False, False]
    assert [b["age_alert"] for b in server["backups"]["containers"]] == [False, True, True]
    assert server["engine"]["data_root_free_pct"] == 5.0
    assert report["unanswered"] == [
        {"host": "gpu2", "reason": "unreachable"},
        {"host": "gpu3", "reason": "the play ended for this server before its status was read"},
    ]
    assert report["thresholds"] == {
        "idle_hours": 24.0,
        "backup_max_age": "2d",
        "backup_max_age_seconds": 172800.0,
        "disk_min_free_pct": 10.0,
    }


def test_longer_thresholds_highlight_nobody_idle():
    report = make_report(idle_hours=48, backup_max_age="4d", disk_min_free_pct=1)
    assert {(a["kind"], a["who"]) for a in report["alerts"] if a["host"] == "gpu1"} == {
        ("backup-age", "cy"),
        ("backup-failed", "cy"),
    }


def test_the_servers_results_are_not_changed():
    results = [{"host": "gpu1", "status": server_status()}]
    before = copy.deepcopy(results)
    status.status_report(results, ["gpu1"], "now")
    assert results == before


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("26h", 93600), ("2d", 172800), ("90m", 5400), ("3600s", 3600), ("1w", 604800), (12, 43200), ("1.5", 5400)],
)
def test_durations(value, seconds):
    assert status.duration_seconds(value) == seconds


@pytest.mark.parametrize("value", ["", "2 days", "-1h", "1y", None])
def test_bad_durations_are_clear_errors(value):
    with pytest.raises(AnsibleFilterError, match="status_backup_max_age must be a duration"):
        status.status_report([], [], "now", backup_max_age=value)


def test_human_figures():
    assert [status.human_duration(s) for s in (None, 5, 125, 3 * HOUR, 3 * HOUR + 600, 50 * HOUR)] == [
        "-",
        "5 s",
        "2 min",
        "3 h",
        "3 h 10 min",
        "2 d 2 h",
    ]
    assert [status.human_bytes(b) for b in (None, 12, 2048, 5 * 1024**3)] == ["-", "12 B", "2.0 KiB", "5.0 GiB"]


def test_configured_images_as_role_notebook_chooses_them():
    users = [
        {"name": "ana", "token": "secret-token-0123456789", "image": "lab/own:3"},
        {"name": "bo", "password": "pw"},
        {"name": "cy", "state": "absent"},
    ]
    assert status.status_configured_images(users, "", "ufoym/deepo", "all-jupyter") == {
        "ana": "lab/own:3",
        "bo": "ufoym/deepo:all-jupyter",
    }
    assert status.status_configured_images(users, "lab/default:1") == {"ana": "lab/own:3", "bo": "lab/default:1"}
    # deepo's tag auto is chosen in a run of site.yml only: unknown here
    assert status.status_configured_images(users, "", "ufoym/deepo", "auto") == {"ana": "lab/own:3"}
    assert "secret" not in str(status.status_configured_images(users))


def test_table_lines():
    lines = status.status_table(make_report())
    text = "\n".join(lines)
    assert re.search(r"gpu1\s+ana\s+7777\s+running\s+0\s+9000\s+512.0 MiB\s+30 h\s+no\s+IDLE, HOLDING GPU MEMORY", text)
    assert re.search(r"gpu1\s+cy\s+never\s+-\s+-\s+2026-12-01T03:30:00Z\s+NO BACKUP FAILED SINCE", text)
    assert re.search(r"gpu1\s+bo\s+2026-11-30T03:30:00Z\s+3 d 8 h\s+20.0 MiB\s+TOO OLD", text)
    assert "GPU0 9000/143771 MiB 0 %" in text
    assert "NOT ANSWERING: gpu2: unreachable" in lines
    assert "ALERT gpu1: ana idle 30 h holding 9000 MiB of GPU memory" in lines


def test_html_page_is_self_contained_and_highlights():
    page = status.status_html(make_report())
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    assert not re.search(r"(src|href)=", page)
    assert page.count("<svg") == 3
    assert page.count("<tr class='alert'>") == 5  # ana idle; bo and cy backups; gpu2 and gpu3 did not answer
    assert "IDLE, HOLDING GPU MEMORY" in page
    assert "pending: the lab configures lab/dl:2" in page
    assert "ana (PID 4242, 9000 MiB)" in page
    assert "unknown (password login only)" in page
    # the idle chart's bar of ana is red, and the threshold line is drawn
    assert re.search(r">ana @ gpu1</text><rect [^>]*fill='#d32f2f'", page)
    assert "limit 24 h" in page


def test_html_escapes_what_it_shows():
    report = make_report()
    report["servers"][0]["notebooks"][0]["user"] = "<b>x</b>"
    assert "<b>x</b>" not in status.status_html(report)
