# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT
"""Jupyter config of a gpulab notebook that keeps the token out of Jupyter's log and out of the student's workdir (role
notebook copies it, unchanged, next to the student's gpulab_jupyter_config.json, which holds the token and password
hash).

Jupyter reads this file with that one: traitlets loads <name>.py and <name>.json for the --config name, for every
flavour (Notebook 6, Jupyter Server 1 and 2). It does two things in the Jupyter server's process:
- Every log record hides what would let someone in: the token of the JSON file wherever it appears, any token=... in
  a URL (a wrong or old one too) and an Authorization header's token. Notebook 6 logs the browser's first request as
  `302 GET /?token=...`, and `docker logs` shows the log to everyone in the docker group.
- Jupyter's runtime folder (its server info file with the token, the kernels' connection files with their keys) is
  RUNTIME_DIR inside the container instead of ~/.local/share/jupyter/runtime in the workdir (HOME), which the student
  and every copy of the workdir see. Jupyter reads JUPYTER_RUNTIME_DIR after its config files, and kernels inherit
  it. (Set here, not in the container's environment: a new environment would recreate the container and lose what
  the student installed; a new config file only restarts it.)

It runs inside the container, with the image's Python, when Jupyter starts (exec'd by traitlets with __file__ set):
standard library only, and never an exception that would stop Jupyter.
"""

import json
import logging
import os
import re

HIDDEN = "(hidden)"
# Inside the container and not bind-mounted; under /tmp because any uid may create a folder there (Jupyter makes it
# mode 0700).
RUNTIME_DIR = "/tmp/jupyter-runtime"  # noqa: S108 (a folder of its own, in the container)
# token=<value> in a query string or a form; "Authorization": "token <value>" in a dump of the request's headers.
TOKEN_PATTERN = re.compile(
    r"(?i)(token=|authorization[\"']?\s*[:=]\s*[\"']?(?:token|bearer)\s+)(?!\(hidden\))[^&\s\"',;)]+"
)


def _secrets(config_path):
    """The non-empty token values of the JSON config beside this file (any flavour's section)."""
    try:
        with open(config_path, encoding="utf-8") as config_file:
            config = json.load(config_file)
    except (OSError, ValueError):
        return []
    found = []
    for section in config.values() if isinstance(config, dict) else []:
        value = section.get("token") if isinstance(section, dict) else None
        if isinstance(value, str) and value:
            found.append(value)
    return found


def scrub(text, secrets):
    """The text with every secret and every token in it replaced by (hidden)."""
    text = TOKEN_PATTERN.sub(lambda match: match.group(1) + HIDDEN, text)
    for secret in secrets:
        text = text.replace(secret, HIDDEN)
    return text


def install(config_path):
    """Wrap the logging record factory, so that every logger's records are scrubbed, whatever handler writes them."""
    secrets = _secrets(config_path)
    previous = logging.getLogRecordFactory()
    if getattr(previous, "gpulab_scrubs", False):
        return
    tokens_possible = re.compile(r"(?i)token")

    def scrubbed_record(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: logging itself reports it later
            return record
        if tokens_possible.search(text) or any(secret in text for secret in secrets):
            clean = scrub(text, secrets)
            if clean != text:
                record.msg, record.args = clean, ()
        return record

    scrubbed_record.gpulab_scrubs = True
    logging.setLogRecordFactory(scrubbed_record)


if "__file__" in globals():
    os.environ["JUPYTER_RUNTIME_DIR"] = RUNTIME_DIR
    install(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpulab_jupyter_config.json"))
