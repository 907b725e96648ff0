# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The options of container_backup and container_restore, declared once.

The modules' argument_spec (argument_spec()), the command line's parser of the systemd timer (add_options(), with
--<option-name> flags), and the settings file the role writes for the timer (settings_argv(): its keys are the
options' names, read through the same parser) are all made from the tables here, so the modules, the timer and the
role cannot drift apart. BackupJob and RestoreJob take the options by these names. Each module's DOCUMENTATION
describes them for ansible-doc; tests/unit/test_backup_options.py and ansible-test sanity (validate-modules) check it
against the argument_spec made here.

Declarations only: nothing here runs a backup, and nothing imports Ansible (the timer's python3 has none).
"""

from __future__ import annotations

import json
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import (
    DEFAULT_FLATTEN_THRESHOLD,
    DEFAULT_LEVEL,
    VERIFY_MODES,
    BackupError,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.settings import DEFAULT_SECRET_ENV

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


class Option(NamedTuple):
    """One option: its Ansible type, default, choices, required; help for the command line; more flags (older
    spellings: a --no-... flag sets a bool false); repeat: the command line takes it several times (one run each)."""

    name: str
    type: str
    default: object = None
    choices: tuple | None = None
    required: bool = False
    elements: str | None = None
    no_log: bool | None = None
    help: str = ""
    flags: tuple = ()
    repeat: bool = False


ENGINE = (
    Option("docker_host", "str", DEFAULT_DOCKER_HOST, help="the engine's socket"),
    Option("timeout", "int", 0, help="seconds per read from the engine; 0: no limit"),
    Option("progress_file", "path", help="file the progress is written to (JSON)"),
)

BACKUP = (
    Option("container", "str", required=True, repeat=True, help="container to back up (repeat for several)"),
    Option("store", "path", help="the store's folder on the server (format store)"),
    Option("keep_last", "int", 3, help="backups kept per container"),
    Option("include_workdir", "bool", True, flags=("--no-workdir",), help="archive the bind-mount sources"),
    Option("pause", "bool", True, help="pause the container while it is read"),
    Option("format", "str", "store", choices=("store", "docker-archive")),
    Option("archive_path", "path", help="the tar written with format docker-archive"),
    Option("flatten_threshold", "int", DEFAULT_FLATTEN_THRESHOLD, help="layer count that flattens; 0: never"),
    # Name patterns, not secrets (the no_log that validate-modules asks of a name with "secret" in it is false).
    Option("secret_env", "list", list(DEFAULT_SECRET_ENV), elements="str", no_log=False, help="secret names' pattern"),
    Option("compression_level", "int", DEFAULT_LEVEL, help="zstd level: 1 to 19, or -1 to -7 (--fast=N)"),
    *ENGINE,
    Option("fast_path", "bool", True, help="read the overlay2 upper directory when the engine allows it"),
    Option("full_read_days", "int", 7, help="read every file again after so many days (metadata may lie); 0: never"),
)
BACKUP_REQUIRED_IF = (("format", "store", ("store",)), ("format", "docker-archive", ("archive_path",)))

RESTORE = (
    Option("store", "path", required=True, help="the store's folder on the server"),
    Option("container", "str", required=True, help="the backed-up container"),
    Option("backup", "str", help="the backup's id; the newest complete one when omitted"),
    Option("force", "bool", False, help="replace an existing container of that name"),
    Option("restore_workdir", "bool", True, flags=("--no-workdir",), help="unpack the bind-mount sources"),
    Option("keep_present_mounts", "bool", False, help="keep a bind-mount source that holds files as it is"),
    Option("verify_only", "bool", False, help="only verify the backup (in full); do not talk to Docker"),
    Option("verify", "str", "content", choices=VERIFY_MODES),
    Option("env", "dict", no_log=True, help="NAME=VALUE set on the restored container (repeat)"),
    Option("start", "bool", help="start the container after creating it (default: as it was at the backup)"),
    *ENGINE,
)


def argument_spec(options):
    """The AnsibleModule argument_spec of a table of options."""
    spec = {}
    for option in options:
        entry = {"type": option.type}
        if option.default is not None:
            entry["default"] = list(option.default) if isinstance(option.default, list) else option.default
        for key in ("choices", "elements"):
            if getattr(option, key) is not None:
                entry[key] = list(getattr(option, key)) if key == "choices" else getattr(option, key)
        if option.required:
            entry["required"] = True
        if option.no_log is not None:
            entry["no_log"] = option.no_log
        spec[option.name] = entry
    return spec


def values(options, given):
    """The options' values for a job: those given, by name, the defaults for the others; an unknown name or a missing
    required option is refused, as the module would."""
    known = {option.name: option for option in options}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise BackupError(f"unknown options: {', '.join(unknown)}")
    out = {}
    for name, option in known.items():
        value = given.get(name)
        if value is None and option.required:
            raise BackupError(f"missing required option: {name}")
        if value is None:
            value = list(option.default) if isinstance(option.default, list) else option.default
        out[name] = value
    return out


def flag(name):
    return "--" + name.replace("_", "-")


def add_options(parser, options, optional=()):
    """Add the flags of a table of options to an argparse parser: --<name> each; a bool also --no-<name>; a list
    or a repeated option may be given several times; a dict as NAME=VALUE, several times. optional: names of required
    options the caller checks itself (the timer's --notebooks stands for the containers)."""
    for option in options:
        dest, main = option.name, flag(option.name)
        if option.type == "bool":
            false = [f"--no-{main[2:]}", *(f for f in option.flags if f.startswith("--no-"))]
            parser.add_argument(main, dest=dest, action="store_true", help=option.help)
            parser.add_argument(*false, dest=dest, action="store_false", help=f"not {main}")
            parser.set_defaults(**{dest: option.default})
            continue
        kwargs = {"dest": dest, "help": option.help}
        if option.type in ("list", "dict") or option.repeat:
            kwargs["action"] = "append"
        if option.type == "int":
            kwargs["type"] = int
        if option.choices:
            kwargs["choices"] = list(option.choices)
        if option.required and option.name not in optional:
            kwargs["required"] = True
        parser.add_argument(main, *option.flags, **kwargs)


def params_of(args, options, *, required_if=()):
    """The options' values from parsed arguments, by their names, with the defaults filled in (a list or dict given
    on the command line replaces the default); raises BackupError as the module's required_if would."""
    params = {}
    for option in options:
        value = getattr(args, option.name)
        if option.type == "dict":
            value = None if value is None else dict(v.split("=", 1) for v in value if "=" in v)
        elif value is None and option.default is not None:
            value = list(option.default) if isinstance(option.default, list) else option.default
        params[option.name] = value
    for key, value, needed in required_if:
        missing = [n for n in needed if params.get(n) in (None, "")]
        if params.get(key) == value and missing:
            raise BackupError(f"{key} is {value} but the following are missing: {', '.join(missing)}")
    return params


def settings_argv(path, options):
    """The command-line flags of a settings file: a JSON object whose keys are option names (what the role writes
    for the timer). An unknown key is an error; the values go through the parser like any flag."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        raise BackupError(f"the settings file {path} cannot be read: {e}") from e
    if not isinstance(settings, dict):
        raise BackupError(f"the settings file {path} is not a JSON object of option names")
    known = {option.name: option for option in options}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise BackupError(f"the settings file {path} has unknown options: {', '.join(unknown)}")
    argv = []
    for name, value in settings.items():
        option, main = known[name], flag(name)
        if value is None:
            continue
        if option.type == "bool":
            argv.append(main if value else f"--no-{main[2:]}")
        elif option.type == "dict":
            argv += [arg for key, item in value.items() for arg in (main, f"{key}={item}")]
        elif isinstance(value, list):
            argv += [arg for item in value for arg in (main, str(item))]
        else:
            argv += [main, str(value)]
    return argv
