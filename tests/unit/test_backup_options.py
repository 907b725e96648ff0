"""The options of container_backup and container_restore are declared once (module_utils/backup/options.py): the
modules' DOCUMENTATION (with its doc fragments), the argument_spec, the command line's flags and the role's settings
all name the same options, with the same types, defaults and choices."""

from pathlib import Path

import pytest
import yaml

from ansible_collections.gpulab.lab.plugins.doc_fragments.docker import ModuleDocFragment as DockerFragment
from ansible_collections.gpulab.lab.plugins.module_utils.backup import cli, options
from ansible_collections.gpulab.lab.plugins.modules import container_backup, container_restore

ROLE = Path(__file__).resolve().parents[2] / "ansible_collections" / "gpulab" / "lab" / "roles" / "backup"
KEYS = ("type", "default", "choices", "required", "elements")


def documented(module):
    doc = yaml.safe_load(module.DOCUMENTATION)
    assert "gpulab.lab.docker" in doc["extends_documentation_fragment"]
    return {**yaml.safe_load(DockerFragment.DOCUMENTATION)["options"], **doc["options"]}


@pytest.mark.parametrize(
    ("module", "table"), [(container_backup, options.BACKUP), (container_restore, options.RESTORE)]
)
def test_the_documentation_describes_the_argument_spec(module, table):
    docs, spec = documented(module), options.argument_spec(table)
    assert sorted(docs) == sorted(spec)
    for name, entry in spec.items():
        doc = {k: docs[name][k] for k in KEYS if k in docs[name]}
        assert doc == {k: entry[k] for k in KEYS if k in entry}, name


@pytest.mark.parametrize(("command", "table"), [("backup", options.BACKUP), ("restore", options.RESTORE)])
def test_the_command_line_takes_every_option_with_the_modules_defaults(command, table):
    required = ["--store", "/s", "--container", "c"]
    params = options.params_of(cli.parse([command, *required]), table)
    assert sorted(params) == sorted(o.name for o in table)
    for option in table:
        if option.name not in ("store", "container"):
            assert params[option.name] == option.default, option.name


def test_the_roles_settings_are_container_backups_options_by_name():
    settings = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["__backup_settings"]
    names = {o.name for o in options.BACKUP}
    assert set(settings) <= names
    task = next(
        t for t in yaml.safe_load((ROLE / "tasks" / "main.yml").read_text()) if "gpulab.lab.container_backup" in t
    )
    args = task["gpulab.lab.container_backup"]
    assert set(args) == set(settings) | {"container"}
    assert all(args[k] == f"{{{{ __backup_settings.{k} }}}}" for k in settings)


def test_a_settings_file_is_read_through_the_same_parser(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"container": ["a", "b"], "store": "/s", "keep_last": 2, "include_workdir": false}')
    params = options.params_of(cli.parse(["backup", "--settings", str(path)]), options.BACKUP)
    assert params["container"] == ["a", "b"] and params["keep_last"] == 2 and params["include_workdir"] is False
    path.write_text('{"container": ["a"], "keep_lats": 2}')
    with pytest.raises(options.BackupError, match="unknown options: keep_lats"):
        cli.parse(["backup", "--settings", str(path)])
    path.write_text('{"container": ["a"], "format": "zip"}')
    with pytest.raises(SystemExit):  # argparse refuses a choice the module refuses
        cli.parse(["backup", "--settings", str(path)])
