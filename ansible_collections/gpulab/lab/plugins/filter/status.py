# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Role status's report on the control node: the servers' lab_status results joined into one report, with the
thresholds applied (status_idle_hours, status_backup_max_age, status_disk_min_free_pct), and that report as a text
table for the end of the play and as one self-contained HTML page (inline CSS and SVG charts, no script, nothing
fetched: it opens from a file on a laptop with no network).

What it must not do: read anything but its arguments. The facts are module lab_status's (on each server); this file
only judges and presents them.
"""

from __future__ import annotations

import copy
import dataclasses
import html
import re

from ansible.errors import AnsibleFilterError

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "": 3600, "d": 86400, "w": 604800}
MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclasses.dataclass(frozen=True)
class Thresholds:
    idle_seconds: float
    backup_max_age_seconds: float
    disk_min_free_pct: float


@dataclasses.dataclass(frozen=True)
class Alert:
    host: str
    kind: str  # idle-gpu, backup-age, backup-failed, disk, engine, gpu, unanswered
    who: str | None
    text: str


def duration_seconds(value, name="status_backup_max_age"):
    """Seconds of a duration: a number of hours, or a number with s, m, h, d or w (26h, 2d, 90m)."""
    match = _DURATION_RE.match(str(value))
    if not match:
        raise AnsibleFilterError(f"{name} must be a duration such as 26h, 2d, 90m or a number of hours, not {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def human_duration(seconds):
    """3 min, 5 h 12 min, 2 d 4 h; '-' for None."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def human_bytes(count):
    if count is None:
        return "-"
    for unit, size in (("TiB", 1024 * GIB), ("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _free_pct(free, total):
    return None if not total or free is None else round(100.0 * free / total, 1)


def status_configured_images(users, notebook_image="", deepo_repository="ufoym/deepo", deepo_tag="auto"):
    """{student: the image the lab configures now} from notebook_users (names and images only, never a secret), as
    role notebook chooses it: the entry's image, else notebook_image, else role deepo's image (unknown while its
    tag is auto: the tag deepo picks is known only in a run of site.yml)."""
    default = notebook_image or (f"{deepo_repository}:{deepo_tag}" if deepo_tag and deepo_tag != "auto" else "")
    images = {}
    for entry in users or []:
        if not isinstance(entry, dict) or not entry.get("name") or entry.get("state") == "absent":
            continue
        image = entry.get("image") or default
        if image:
            images[str(entry["name"])] = str(image)
    return images


def _judge_server(host, status, limits):
    alerts = []
    engine = status.get("engine") or {}
    if not engine.get("answered"):
        alerts.append(Alert(host, "engine", None, f"the Docker engine does not answer: {engine.get('error')}"))
    else:
        pct = _free_pct(engine.get("data_root_free_bytes"), engine.get("data_root_total_bytes"))
        engine["data_root_free_pct"] = pct
        if pct is not None and pct < limits.disk_min_free_pct:
            alerts.append(Alert(host, "disk", None, f"Docker's data root {engine.get('data_root')} has {pct} % free"))
    gpu = status.get("gpu") or {}
    if gpu.get("error"):
        alerts.append(Alert(host, "gpu", None, f"nvidia-smi: {gpu['error']}"))
    for notebook in status.get("notebooks") or []:
        idle = notebook.get("idle_seconds")
        notebook["idle_alert"] = bool(
            idle is not None and notebook.get("idle_gpu_memory_mib") and idle > limits.idle_seconds
        )
        if notebook["idle_alert"]:
            alerts.append(
                Alert(
                    host,
                    "idle-gpu",
                    notebook["user"],
                    f"{notebook['user']} idle {human_duration(idle)} holding {notebook['idle_gpu_memory_mib']} MiB "
                    "of GPU memory",
                )
            )
    backups = status.get("backups") or {}
    pct = _free_pct(backups.get("store_free_bytes"), backups.get("store_total_bytes"))
    backups["store_free_pct"] = pct
    if backups.get("present") and pct is not None and pct < limits.disk_min_free_pct:
        alerts.append(Alert(host, "disk", None, f"the backup store's disk {backups.get('store')} has {pct} % free"))
    for entry in backups.get("containers") or []:
        age = entry.get("last_success_age_seconds")
        entry["age_alert"] = age is None or age > limits.backup_max_age_seconds
        who = entry.get("user") or entry["container"]
        if entry["age_alert"]:
            text = "never backed up" if age is None else f"last backup {human_duration(age)} ago"
            alerts.append(Alert(host, "backup-age", who, f"{who}: {text}"))
        entry["failure_alert"] = bool(entry.get("failed_since_last_success"))
        if entry["failure_alert"]:
            alerts.append(
                Alert(
                    host,
                    "backup-failed",
                    who,
                    f"{who}: backup failed {entry.get('last_failure')}: {entry.get('last_failure_reason')}",
                )
            )
    return alerts


def status_report(results, hosts, generated_at, idle_hours=24, backup_max_age="26h", *, disk_min_free_pct=10):
    """The lab's report from the servers' results ({host, status (lab_status's) or error}), one per name of hosts.

    A result without status is a server that did not answer (unreachable, or its modules failed), with the reason;
    an empty one ({}) a server the play lost before role status kept its result.
    """
    try:
        limits = Thresholds(float(idle_hours) * 3600, duration_seconds(backup_max_age), float(disk_min_free_pct))
    except ValueError as exc:
        raise AnsibleFilterError(f"status thresholds: {exc}") from exc
    servers, unanswered, alerts = [], [], []
    for name, result in zip(hosts or [], results or []):
        host = str(name)
        if not result.get("status"):
            reason = result.get("error") or "the play ended for this server before its status was read"
            unanswered.append({"host": host, "reason": reason})
            alerts.append(Alert(host, "unanswered", None, f"{host} did not answer: {reason}"))
            continue
        status = copy.deepcopy(result["status"])  # the judgements are added to the report's copy
        server_alerts = _judge_server(host, status, limits)
        status["host"] = host
        status["alerts"] = [alert.text for alert in server_alerts]
        servers.append(status)
        alerts.extend(server_alerts)
    return {
        "generated_at": generated_at,
        "thresholds": {
            "idle_hours": float(idle_hours),
            "backup_max_age": str(backup_max_age),
            "backup_max_age_seconds": limits.backup_max_age_seconds,
            "disk_min_free_pct": limits.disk_min_free_pct,
        },
        "servers": servers,
        "unanswered": unanswered,
        "alerts": [dataclasses.asdict(alert) for alert in alerts],
    }


# ---- the text table -------------------------------------------------------------------------------------------------


def _table(header, rows):
    rows = [[str("-" if cell is None else cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def _gpus_text(gpus):
    return "all" if gpus == "all" else ",".join(str(g) for g in gpus) if gpus else "none"


def _backup_flags(entry):
    """The highlights of one container's backups, in words."""
    flags = []
    if entry.get("age_alert"):
        flags.append("NO BACKUP" if entry.get("last_success_age_seconds") is None else "TOO OLD")
    if entry.get("failure_alert"):
        flags.append("FAILED SINCE")
    return flags


def status_table(report):
    """The report as lines of text: one table of notebooks, one of backups, and the alerts."""
    notebooks, backups, engines = [], [], []
    for server in report.get("servers") or []:
        host = server["host"]
        engine = server.get("engine") or {}
        engines.append(
            [
                host,
                engine.get("version") if engine.get("answered") else "NOT ANSWERING",
                engine.get("storage_driver"),
                f"{human_bytes(engine.get('data_root_free_bytes'))} ({engine.get('data_root_free_pct')} %)",
                " ".join(
                    f"GPU{gpu['index']} {gpu.get('memory_used_mib')}/{gpu.get('memory_total_mib')} MiB "
                    f"{gpu.get('utilization_pct')} %"
                    for gpu in (server.get("gpu") or {}).get("gpus") or []
                )
                or "no GPU",
            ]
        )
        for nb in server.get("notebooks") or []:
            notebooks.append(
                [
                    host,
                    nb["user"],
                    nb.get("port"),
                    nb.get("state"),
                    _gpus_text(nb.get("gpus")),
                    nb.get("gpu_memory_mib"),
                    human_bytes(nb.get("memory_bytes")),
                    human_duration(nb.get("idle_seconds")),
                    "yes" if nb.get("image_update_pending") else "no",
                    "IDLE, HOLDING GPU MEMORY" if nb.get("idle_alert") else "",
                ]
            )
        for entry in (server.get("backups") or {}).get("containers") or []:
            backups.append(
                [
                    host,
                    entry.get("user") or entry["container"],
                    entry.get("last_success") or "never",
                    human_duration(entry.get("last_success_age_seconds")),
                    human_bytes(entry.get("last_success_bytes")),
                    entry.get("last_failure") or "",
                    " ".join(_backup_flags(entry)),
                ]
            )
    lines = _table(["server", "engine", "storage", "data root free", "GPUs (used/total, util)"], engines)
    notebook_header = ["server", "student", "port", "state", "GPUs", "GPU MiB", "memory", "idle", "image update", ""]
    lines += ["", *_table(notebook_header, notebooks)]
    lines += ["", *_table(["server", "backup of", "last success", "age", "size", "last failure", ""], backups)]
    for entry in report.get("unanswered") or []:
        lines.append(f"NOT ANSWERING: {entry['host']}: {entry['reason']}")
    for alert in report.get("alerts") or []:
        if alert["kind"] != "unanswered":
            lines.append(f"ALERT {alert['host']}: {alert['text']}")
    return lines


# ---- the HTML page --------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1c1c1c; }
h1 { font-size: 1.5em; margin: 0 0 .2em; } h2 { font-size: 1.15em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; margin: .3em 0 1em; } th, td { padding: .25em .6em; border: 1px solid #ccc; }
th { background: #eef1f5; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.alert td { background: #ffd6d6; } .badge { background: #c62828; color: #fff; padding: 0 .4em; border-radius: 3px;
font-weight: bold; white-space: nowrap; }
.ok { color: #2e7d32; } .muted { color: #777; } ul.alerts li { color: #b71c1c; }
.charts { display: flex; flex-wrap: wrap; gap: 2em; } figure { margin: 0; } figcaption { font-weight: bold; }
@page { size: A3 landscape; margin: 1cm; } @media print { body { font-size: 11px; margin: 0; } }
"""


def _e(value):
    return html.escape("-" if value is None else str(value))


def _bar_chart(title, rows, unit, limit=None):
    """A horizontal bar chart as inline SVG; rows: (label, value, alert, text shown beside the bar). limit (in the
    values' unit) draws the threshold line."""
    if not rows:
        return f"<figure><figcaption>{_e(title)}</figcaption><p class='muted'>nothing to show</p></figure>"
    label_w, bar_w, row_h = 190, 320, 24
    top = max([row[1] for row in rows] + [limit or 0]) or 1
    height = row_h * len(rows) + 24
    parts = [
        f"<figure><figcaption>{_e(title)}</figcaption>"
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{label_w + bar_w + 110}' height='{height}' role='img'>"
    ]
    for i, (label, value, alert, text) in enumerate(rows):
        y = i * row_h + 4
        width = max(bar_w * value / top, 1)
        colour = "#d32f2f" if alert else "#1976d2"
        parts.append(
            f"<text x='{label_w - 6}' y='{y + 15}' text-anchor='end' font-size='12'>{_e(label)}</text>"
            f"<rect x='{label_w}' y='{y}' width='{width:.1f}' height='{row_h - 8}' fill='{colour}'/>"
            f"<text x='{label_w + width + 4:.1f}' y='{y + 15}' font-size='12'>{_e(text)}</text>"
        )
    if limit is not None:
        x = label_w + bar_w * limit / top
        parts.append(
            f"<line x1='{x:.1f}' y1='0' x2='{x:.1f}' y2='{height - 16}' stroke='#c62828' stroke-dasharray='4 3'/>"
            f"<text x='{x:.1f}' y='{height - 4}' font-size='11' fill='#c62828' text-anchor='middle'>"
            f"limit {limit:g} {unit}</text>"
        )
    parts.append("</svg></figure>")
    return "".join(parts)


def _row(cells, alert=False):
    klass = " class='alert'" if alert else ""
    return f"<tr{klass}>" + "".join(cells) + "</tr>"


def _td(value, number=False):
    return f"<td class='n'>{_e(value)}</td>" if number else f"<td>{_e(value)}</td>"


def _head(*names):
    return "<tr>" + "".join(f"<th>{_e(name)}</th>" for name in names) + "</tr>"


def _server_section(server):
    host = server["host"]
    engine = server.get("engine") or {}
    out = [f"<h2>{_e(host)}</h2>"]
    if engine.get("answered"):
        out.append(
            f"<p>Docker {_e(engine.get('version'))} (API {_e(engine.get('api_version'))}), running, storage driver "
            f"{_e(engine.get('storage_driver'))}; data root {_e(engine.get('data_root'))}: "
            f"{_e(human_bytes(engine.get('data_root_free_bytes')))} free of "
            f"{_e(human_bytes(engine.get('data_root_total_bytes')))} ({_e(engine.get('data_root_free_pct'))} %)</p>"
        )
    else:
        out.append(f"<p><span class='badge'>ENGINE NOT ANSWERING</span> {_e(engine.get('error'))}</p>")
    gpu = server.get("gpu") or {}
    if gpu.get("error"):
        out.append(f"<p><span class='badge'>GPU</span> {_e(gpu['error'])}</p>")
    if gpu.get("gpus"):
        rows = [_head("GPU", "model", "memory used", "total", "utilization", "held by")]
        for entry in gpu["gpus"]:
            holders = (
                ", ".join(
                    f"{h.get('user') or h.get('container') or 'host'} (PID {h['pid']}, {h.get('used_memory_mib')} MiB)"
                    for h in entry.get("holders") or []
                )
                or "nobody"
            )
            rows.append(
                _row(
                    [
                        _td(entry.get("index"), True),
                        _td(entry.get("name")),
                        _td(f"{entry.get('memory_used_mib')} MiB", True),
                        _td(f"{entry.get('memory_total_mib')} MiB", True),
                        _td(f"{entry.get('utilization_pct')} %", True),
                        _td(holders),
                    ]
                )
            )
        out.append(f"<p>Driver {_e(gpu.get('driver_version'))}, CUDA {_e(gpu.get('cuda_version'))}</p>")
        out.append("<table>" + "".join(rows) + "</table>")
    rows = [
        _head(
            "student",
            "port",
            "state",
            "image",
            "image update",
            "GPUs",
            "GPU memory",
            "memory",
            "last activity",
            "kernels",
            "connections",
            "idle",
        )
    ]
    for nb in server.get("notebooks") or []:
        jupyter = nb.get("jupyter") or {}
        flag = " <span class='badge'>IDLE, HOLDING GPU MEMORY</span>" if nb.get("idle_alert") else ""
        update = f"pending: {nb.get('image_update_reason')}" if nb.get("image_update_pending") else "no"
        activity = nb.get("last_activity") or f"unknown ({jupyter.get('error')})"
        rows.append(
            _row(
                [
                    f"<td><b>{_e(nb['user'])}</b>{flag}</td>",
                    _td(nb.get("port"), True),
                    _td(nb.get("state")),
                    _td(nb.get("image")),
                    _td(update),
                    _td(_gpus_text(nb.get("gpus"))),
                    _td(f"{nb.get('gpu_memory_mib')} MiB", True),
                    _td(human_bytes(nb.get("memory_bytes")), True),
                    _td(activity),
                    _td(jupyter.get("kernels"), True),
                    _td(jupyter.get("connections"), True),
                    _td(human_duration(nb.get("idle_seconds")), True),
                ],
                nb.get("idle_alert"),
            )
        )
    out.append("<h3>Notebooks</h3><table>" + "".join(rows) + "</table>")
    backups = server.get("backups") or {}
    out.append(
        f"<h3>Backups</h3><p>Store {_e(backups.get('store'))}: {_e(human_bytes(backups.get('store_bytes')))} used, "
        f"{_e(human_bytes(backups.get('store_free_bytes')))} free ({_e(backups.get('store_free_pct'))} %)"
        + (f" <span class='badge'>{_e(backups['error'])}</span>" if backups.get("error") else "")
        + "</p>"
    )
    rows = [_head("backup of", "container", "backups", "last success", "age", "size", "complete", "last failure")]
    for entry in backups.get("containers") or []:
        failure = (
            f"{entry['last_failure']}: {entry.get('last_failure_reason')}" if entry.get("last_failure") else "none"
        )
        flag = "".join(f" <span class='badge'>{text}</span>" for text in _backup_flags(entry))
        rows.append(
            _row(
                [
                    f"<td><b>{_e(entry.get('user'))}</b>{flag}</td>",
                    _td(entry["container"]),
                    _td(entry.get("count"), True),
                    _td(entry.get("last_success") or "never"),
                    _td(human_duration(entry.get("last_success_age_seconds")), True),
                    _td(human_bytes(entry.get("last_success_bytes")), True),
                    _td({True: "yes", False: "NO", None: "-"}[entry.get("complete")]),
                    _td(failure),
                ],
                entry.get("age_alert") or entry.get("failure_alert"),
            )
        )
    out.append("<table>" + "".join(rows) + "</table>")
    return "".join(out)


def status_html(report):
    """The report as one HTML page: inline CSS, inline SVG charts, no script and nothing to fetch."""
    limits = report.get("thresholds") or {}
    servers = report.get("servers") or []
    gpu_rows, idle_rows, age_rows = [], [], []
    for server in servers:
        for nb in server.get("notebooks") or []:
            label = f"{nb['user']} @ {server['host']}"
            if nb.get("gpu_memory_mib"):
                gpu_rows.append((label, nb["gpu_memory_mib"], nb.get("idle_alert"), f"{nb['gpu_memory_mib']} MiB"))
            if nb.get("idle_seconds") is not None:
                idle = nb["idle_seconds"]
                idle_rows.append((label, idle / 3600, nb.get("idle_alert"), human_duration(idle)))
        for entry in (server.get("backups") or {}).get("containers") or []:
            if entry.get("last_success_age_seconds") is not None:
                label = f"{entry.get('user') or entry['container']} @ {server['host']}"
                age = entry["last_success_age_seconds"]
                age_rows.append((label, age / 3600, entry.get("age_alert"), human_duration(age)))
    alerts = report.get("alerts") or []
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>gpulab status {_e(report.get('generated_at'))}</title><style>{_CSS}</style></head><body>",
        f"<h1>gpulab: the lab at a glance</h1><p class='muted'>{_e(report.get('generated_at'))}; "
        f"{len(servers)} server(s) answered, {len(report.get('unanswered') or [])} did not. Thresholds: idle with GPU "
        f"memory over {_e(limits.get('idle_hours'))} h, last backup older than {_e(limits.get('backup_max_age'))}, "
        f"disk free under {_e(limits.get('disk_min_free_pct'))} %.</p>",
    ]
    if alerts:
        parts.append("<h2>Over the thresholds</h2><ul class='alerts'>")
        parts += [f"<li><b>{_e(a['host'])}</b>: {_e(a['text'])}</li>" for a in alerts]
        parts.append("</ul>")
    else:
        parts.append("<p class='ok'>Nothing over the thresholds.</p>")
    parts.append("<div class='charts'>")
    parts.append(_bar_chart("GPU memory per student", gpu_rows, "MiB"))
    parts.append(_bar_chart("Idle time", idle_rows, "h", limits.get("idle_hours")))
    parts.append(
        _bar_chart("Age of the last backup", age_rows, "h", (limits.get("backup_max_age_seconds") or 0) / 3600)
    )
    parts.append("</div>")
    if report.get("unanswered"):
        parts.append("<h2>Servers that did not answer</h2><table>" + _head("server", "why"))
        parts += [_row([_td(u["host"]), _td(u["reason"])], True) for u in report["unanswered"]]
        parts.append("</table>")
    parts += [_server_section(server) for server in servers]
    parts.append("</body></html>\n")
    return "".join(parts)


class FilterModule:
    def filters(self):
        return {
            "status_configured_images": status_configured_images,
            "status_report": status_report,
            "status_table": status_table,
            "status_html": status_html,
        }
