"""Tests of module docker_daemon_config: the pure merge functions, the schema of Docker's keys, and main() run on real
files in tmp_path."""

import json
import os
import stat

import pytest
import yaml
from ansible.module_utils.testing import patch_module_args
from module_harness import ModuleExit, ModuleFail

from ansible_collections.gpulab.lab.plugins.modules import docker_daemon_config as ddc

OLD_MTIME_NS = 1_500_000_000 * 10**9


# Every test here may run main(): exit_json/fail_json raise ModuleExit/ModuleFail (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("capture_exit")


def run(args, check_mode=False, diff=False):
    """Run main() with ``args``; return the result dict of exit_json. ``validate`` is off unless given."""
    args = {"validate": False, **args, "_ansible_check_mode": check_mode, "_ansible_diff": diff}
    with patch_module_args(args), pytest.raises(ModuleExit) as info:
        ddc.main()
    if isinstance(info.value, ModuleFail):
        pytest.fail(f"module failed: {info.value.result}")
    return info.value.result


def run_failing(args, check_mode=False):
    """Run main() with ``args``; return the result dict of fail_json."""
    args = {"validate": False, **args, "_ansible_check_mode": check_mode}
    with patch_module_args(args), pytest.raises(ModuleFail) as info:
        ddc.main()
    return info.value.result


def write(path, text):
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o644)
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))


def snapshot(path):
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, stat.S_IMODE(st.st_mode)


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def backups(path):
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + ".") and p.name.endswith("~"))


def test_documentation_blocks_are_valid_yaml():
    doc = yaml.safe_load(ddc.DOCUMENTATION)
    assert doc["module"] == "docker_daemon_config"
    assert set(doc["options"]) == {"path", "config", "backup", "validate", "mode"}
    assert {k: v["support"] for k, v in doc["attributes"].items()} == {
        "check_mode": "full",
        "diff_mode": "full",
        "idempotent": "full",
    }
    assert isinstance(yaml.safe_load(ddc.EXAMPLES), list)
    assert set(yaml.safe_load(ddc.RETURN)) >= {"path", "config", "changed_keys", "backup_file", "validated"}


# --- pure functions ---------------------------------------------------------------------------------------------


def test_merge_config_adds_and_replaces_keeping_order():
    current = {"b": 1, "a": {"x": 1}, "c": [1, 2]}
    merged, keys = ddc.merge_config(current, {"c": [3], "new": "v", "b": 1})
    assert list(merged) == ["b", "a", "c", "new"]
    assert merged == {"b": 1, "a": {"x": 1}, "c": [3], "new": "v"}
    assert keys == ["c", "new"]
    assert current == {"b": 1, "a": {"x": 1}, "c": [1, 2]}, "input must not be modified"


def test_merge_config_nested_and_null():
    current = {"log-opts": {"max-size": "10m", "max-file": "3"}, "runtimes": {"other": {"path": "/bin/other"}}}
    changes = {
        "log-opts": {"max-size": "100m", "max-file": None},
        "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}},
        "absent": None,
    }
    merged, keys = ddc.merge_config(current, changes)
    assert merged == {
        "log-opts": {"max-size": "100m"},
        "runtimes": {"other": {"path": "/bin/other"}, "nvidia": {"path": "nvidia-container-runtime", "args": []}},
    }
    assert keys == ["log-opts", "runtimes"]


def test_merge_config_dict_over_scalar_and_only_nulls_on_absent_key():
    merged, keys = ddc.merge_config({"a": "scalar"}, {"a": {"x": 1, "y": None}, "b": {"z": None}})
    assert merged == {"a": {"x": 1}}
    assert keys == ["a"]


def test_merge_config_no_change():
    current = {"debug": True, "log-opts": {"max-size": "10m"}}
    merged, keys = ddc.merge_config(current, {"debug": True, "log-opts": {"max-size": "10m"}, "gone": None})
    assert merged == current
    assert keys == []


def test_merge_config_strict_types():
    # Python says True == 1; Docker does not, so this is a change.
    merged, keys = ddc.merge_config({"debug": 1}, {"debug": True})
    assert merged == {"debug": True}
    assert keys == ["debug"]
    assert not ddc.json_equal({"a": 1}, {"a": 1.0})
    assert ddc.json_equal({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]})


@pytest.mark.parametrize("text", ["", "  \n\t\n"])
def test_parse_config_empty(text):
    assert ddc.parse_config(text, "/x/daemon.json") == {}


def test_render_config():
    assert ddc.render_config({"a": "é", "b": [1]}) == '{\n  "a": "é",\n  "b": [\n    1\n  ]\n}\n'


# --- main() on real files ---------------------------------------------------------------------------------------


def test_merge_into_existing_file_preserves_foreign_keys(tmp_path):
    path = tmp_path / "daemon.json"
    foreign = {"registry-mirrors": ["https://mirror.example"], "data-root": "/srv/docker", "features": {"x": True}}
    write(path, json.dumps(foreign))
    result = run({"path": str(path), "config": {"live-restore": True}})
    assert result["changed"] is True
    assert result["changed_keys"] == ["live-restore"]
    data = load(path)
    assert data == {**foreign, "live-restore": True}
    assert list(data) == ["registry-mirrors", "data-root", "features", "live-restore"]
    assert result["config"] == data
    assert result["path"] == str(path)
    assert result["validated"] is False
    assert path.read_text(encoding="utf-8") == json.dumps(data, indent=2) + "\n"


def test_nested_keys_merged(tmp_path):
    path = tmp_path / "daemon.json"
    write(
        path,
        json.dumps({"log-opts": {"max-file": "3"}, "runtimes": {"other": {"path": "/usr/bin/other-runtime"}}}),
    )
    result = run(
        {
            "path": str(path),
            "config": {
                "log-opts": {"max-size": "100m"},
                "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}},
            },
        }
    )
    assert result["changed"] is True
    assert load(path) == {
        "log-opts": {"max-file": "3", "max-size": "100m"},
        "runtimes": {
            "other": {"path": "/usr/bin/other-runtime"},
            "nvidia": {"path": "nvidia-container-runtime", "args": []},
        },
    }


def test_lists_replaced(tmp_path):
    path = tmp_path / "daemon.json"
    write(path, json.dumps({"dns": ["1.1.1.1", "8.8.8.8"]}))
    run({"path": str(path), "config": {"dns": ["9.9.9.9"]}})
    assert load(path) == {"dns": ["9.9.9.9"]}


def test_null_removes_key(tmp_path):
    path = tmp_path / "daemon.json"
    write(path, json.dumps({"default-runtime": "nvidia", "debug": False}))
    result = run({"path": str(path), "config": {"default-runtime": None}})
    assert result["changed"] is True
    assert result["changed_keys"] == ["default-runtime"]
    assert load(path) == {"debug": False}


def test_no_change_when_values_equal_despite_formatting(tmp_path):
    path = tmp_path / "daemon.json"
    write(path, '{ "log-opts": {"max-size":"10m"},\n\n   "live-restore" : true }')
    before = snapshot(path)
    result = run({"path": str(path), "config": {"live-restore": True, "log-opts": {"max-size": "10m"}, "gone": None}})
    assert result["changed"] is False
    assert result["changed_keys"] == []
    assert "backup_file" not in result
    assert snapshot(path) == before
    assert backups(path) == []


def test_idempotent_second_run(tmp_path):
    path = tmp_path / "daemon.json"
    args = {"path": str(path), "config": {"default-runtime": "nvidia", "log-opts": {"max-size": "10m"}}}
    assert run(args)["changed"] is True
    before = snapshot(path)
    assert run(args)["changed"] is False
    assert snapshot(path) == before


def test_check_mode_writes_nothing(tmp_path):
    path = tmp_path / "daemon.json"
    write(path, json.dumps({"debug": True}))
    before = snapshot(path)
    result = run({"path": str(path), "config": {"debug": False, "live-restore": True}}, check_mode=True)
    assert result["changed"] is True
    assert result["changed_keys"] == ["debug", "live-restore"]
    assert result["config"] == {"debug": False, "live-restore": True}
    assert snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.json"]


def test_check_mode_missing_dir_creates_nothing(tmp_path):
    path = tmp_path / "docker" / "daemon.json"
    result = run({"path": str(path), "config": {"live-restore": True}}, check_mode=True, diff=True)
    assert result["changed"] is True
    assert result["diff"]["before"] == ""
    assert not (tmp_path / "docker").exists()


def test_invalid_json_fails_and_leaves_file_untouched(tmp_path):
    path = tmp_path / "daemon.json"
    write(path, '{\n  "debug": true,\n}\n')
    before = snapshot(path)
    result = run_failing({"path": str(path), "config": {"live-restore": True}})
    msg = result["msg"]
    assert str(path) in msg
    assert "not valid JSON" in msg
    assert "line 3 column 1" in msg
    assert "untouched" in msg
    assert "fix" in msg and "remove" in msg
    assert snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.json"]


@pytest.mark.parametrize("text", ["[]", '"text"', "42", "null"])
def test_non_object_json_fails(tmp_path, text):
    path = tmp_path / "daemon.json"
    write(path, text)
    before = snapshot(path)
    result = run_failing({"path": str(path), "config": {"live-restore": True}})
    assert str(path) in result["msg"]
    assert "must be a JSON object" in result["msg"]
    assert snapshot(path) == before


def test_missing_file_and_parent_dir_created(tmp_path):
    path = tmp_path / "etc" / "docker" / "daemon.json"
    result = run({"path": str(path), "config": {"live-restore": True}})
    assert result["changed"] is True
    assert "backup_file" not in result
    assert load(path) == {"live-restore": True}
    for d in (tmp_path / "etc", tmp_path / "etc" / "docker"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert sorted(p.name for p in path.parent.iterdir()) == ["daemon.json"], "no temporary file left behind"


def test_whitespace_only_file_is_empty_object(tmp_path):
    path = tmp_path / "daemon.json"
    write(path, "\n  \n")
    result = run({"path": str(path), "config": {"live-restore": True}})
    assert result["changed"] is True
    assert load(path) == {"live-restore": True}


def test_diff_output(tmp_path):
    path = tmp_path / "daemon.json"
    old = '{"debug": true}'
    write(path, old)
    result = run({"path": str(path), "config": {"live-restore": True}}, diff=True)
    diff = result["diff"]
    assert diff["before"] == old
    assert diff["after"] == '{\n  "debug": true,\n  "live-restore": true\n}\n'
    assert diff["before_header"] == str(path)
    assert diff["after_header"] == str(path)


def test_backup_holds_old_content(tmp_path):
    path = tmp_path / "daemon.json"
    write(path, '{"debug": true}')
    result = run({"path": str(path), "config": {"debug": False}})
    backup = result["backup_file"]
    assert os.path.dirname(backup) == str(tmp_path)
    with open(backup, encoding="utf-8") as f:
        assert f.read() == '{"debug": true}'
    assert backups(path) == [tmp_path / os.path.basename(backup)]


def test_no_backup_when_disabled(tmp_path):
    path = tmp_path / "daemon.json"
    write(path, '{"debug": true}')
    result = run({"path": str(path), "config": {"debug": False}, "backup": False})
    assert result["changed"] is True
    assert "backup_file" not in result
    assert backups(path) == []


def test_written_file_mode_0644(tmp_path):
    path = tmp_path / "daemon.json"
    old_umask = os.umask(0o077)
    try:
        run({"path": str(path), "config": {"live-restore": True}})
    finally:
        os.umask(old_umask)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o644
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, 0)


def test_mode_only_change_is_idempotent(tmp_path):
    path = tmp_path / "daemon.json"
    write(path, '{"live-restore": true}')
    args = {"path": str(path), "config": {"live-restore": True}, "mode": "0600"}
    result = run(args)
    assert result["changed"] is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text(encoding="utf-8") == '{"live-restore": true}', "content must not be rewritten"
    assert run(args)["changed"] is False


def test_unexpected_error_reports_traceback(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("", encoding="utf-8")
    result = run_failing({"path": str(blocker / "daemon.json"), "config": {"live-restore": True}})
    assert "Unexpected error" in result["msg"]
    assert "Traceback" in result["exception"]


# --- validation with dockerd --------------------------------------------------------------------------------------

# dockerd >= 23 (with --validate) is not installed on the test machine (Debian 12 ships docker.io 20.10), so these
# fake dockerd scripts are test stand-ins placed first on PATH. They log their arguments to calls.log.
FAKE_DOCKERD_WITH_VALIDATE = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls.log"
case "$1" in
  --version)
    echo "Docker version 27.5.1, build 4c9b3b0"
    exit 0 ;;
  --help)
    echo "Usage: dockerd [OPTIONS]"
    echo "      --validate      Validate daemon configuration and exit"
    exit 0 ;;
  --validate)
    if grep -q '"reject-me"' "$3"; then
      printf '%s %s\n' "unable to configure the Docker daemon with file $3:" \
        "invalid bip: reject-me" >&2
      exit 1
    fi
    echo "configuration OK"
    exit 0 ;;
esac
exit 2
"""

FAKE_DOCKERD_WITHOUT_VALIDATE = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls.log"
case "$1" in
  --version)
    echo "Docker version 20.10.24+dfsg1, build 297e128"
    exit 0 ;;
  --help)
    echo "Usage: dockerd [OPTIONS]"
    echo "      --config-file string    Daemon configuration file"
    exit 0 ;;
esac
echo "unknown flag: $1" >&2
exit 125
"""


def fake_dockerd(tmp_path, monkeypatch, script):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "dockerd"
    exe.write_text(script, encoding="utf-8")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bindir / "calls.log"


def test_validation_rejects_and_leaves_file_untouched(tmp_path, monkeypatch):
    calls = fake_dockerd(tmp_path, monkeypatch, FAKE_DOCKERD_WITH_VALIDATE)
    path = tmp_path / "daemon.json"
    write(path, '{"debug": true}')
    before = snapshot(path)
    result = run_failing({"path": str(path), "config": {"bip": "reject-me"}, "validate": True})
    assert "dockerd rejected" in result["msg"]
    assert "invalid bip: reject-me" in result["msg"]
    assert "untouched" in result["msg"]
    assert snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "daemon.json"], "no backup, no temporary file"
    assert "--validate --config-file" in calls.read_text(encoding="utf-8")


def test_validation_accepts(tmp_path, monkeypatch):
    calls = fake_dockerd(tmp_path, monkeypatch, FAKE_DOCKERD_WITH_VALIDATE)
    path = tmp_path / "daemon.json"
    result = run({"path": str(path), "config": {"live-restore": True}, "validate": True})
    assert result["changed"] is True
    assert result["validated"] is True
    assert load(path) == {"live-restore": True}
    validated_file = calls.read_text(encoding="utf-8").splitlines()[-1].split()[-1]
    assert validated_file != str(path), "validation must run on a temporary file"
    assert not os.path.exists(validated_file), "temporary file removed"


def test_validation_skipped_when_unchanged(tmp_path, monkeypatch):
    calls = fake_dockerd(tmp_path, monkeypatch, FAKE_DOCKERD_WITH_VALIDATE)
    path = tmp_path / "daemon.json"
    write(path, '{"live-restore": true}')
    result = run({"path": str(path), "config": {"live-restore": True}, "validate": True})
    assert result["changed"] is False
    assert result["validated"] is False
    assert not calls.exists()


def test_validation_skipped_without_validate_flag(tmp_path, monkeypatch):
    calls = fake_dockerd(tmp_path, monkeypatch, FAKE_DOCKERD_WITHOUT_VALIDATE)
    path = tmp_path / "daemon.json"
    result = run({"path": str(path), "config": {"bip": "10.20.0.1/24"}, "validate": True})
    assert result["changed"] is True
    assert result["validated"] is False
    assert result["engine_version"] == "20.10"  # gpulab's schema checked the key, for the installed engine
    assert load(path) == {"bip": "10.20.0.1/24"}
    assert calls.read_text(encoding="utf-8").splitlines() == ["--version", "--help"]


# --- gpulab's schema of Docker's keys: refused before anything is written, on every engine version ------------------


def refused(tmp_path, config, script=None, monkeypatch=None, check_mode=False):
    """Merge ``config`` with validation into a daemon.json holding the admin's keys; assert that nothing was written
    (no file changed, no backup, no temporary file) and return the failure."""
    if script:
        fake_dockerd(tmp_path, monkeypatch, script)
    path = tmp_path / "daemon.json"
    write(path, '{"labels": ["admin"], "admin-plugin-key": 1}')
    before = snapshot(path)
    listing = sorted(p.name for p in tmp_path.iterdir())
    result = run_failing({"path": str(path), "config": config, "validate": True}, check_mode=check_mode)
    assert snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert "so it was left untouched" in result["msg"]
    return result


def test_a_value_of_the_wrong_type_is_refused_before_writing(tmp_path):
    """The issue's case: live-restore "yes-please" on Debian 12's docker.io, which has no dockerd --validate."""
    result = refused(tmp_path, {"live-restore": "yes-please"})
    assert result["problems"] == ["'live-restore' must be true or false, not the string \"yes-please\""]


def test_every_problem_is_reported_at_once(tmp_path):
    result = refused(tmp_path, {"live-restore": 1, "log-opts": {"max-file": 3}, "max-concurrent-downloads": -1})
    assert result["problems"] == [
        "'live-restore' must be true or false, not the number 1",
        "'log-opts' must be an object of strings (every value quoted, e.g. \"3\" not 3), not the object"
        ' {"max-file": 3}',
        "'max-concurrent-downloads' must be 0 or more, not -1",
    ]


def test_an_unknown_key_is_refused_with_the_nearest_known_key(tmp_path):
    result = refused(tmp_path, {"live-restor": True, "registry-mirror": ["https://m.example.edu"]})
    assert "'live-restor' is not a key Docker knows (did you mean 'live-restore'?)" in result["msg"]
    assert "'registry-mirror' is not a key Docker knows (did you mean 'registry-mirrors'?)" in result["msg"]


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"log-level": "verbose"}, "'log-level' must be one of debug, info, warn, error, fatal, not the string"),
        ({"default-cgroupns-mode": "shared"}, "'default-cgroupns-mode' must be one of private, host"),
        ({"registry-mirrors": ["mirror.example.edu"]}, "must be a URL starting with http:// or https://"),
        ({"data-root": "data/docker"}, "'data-root' must be an absolute path, not the string \"data/docker\""),
        ({"runtimes": {"nvidia": {"path": 7}}}, "'runtimes' must be an object of runtimes"),
        ({"default-address-pools": [{"base": "10.10.0.0/16", "size": "24"}]}, "'default-address-pools' must be"),
        ({"features": {"buildkit": "yes"}}, "'features' must be an object of true/false values"),
        ({"dns": "1.1.1.1"}, "'dns' must be a list of strings, not the string"),
    ],
    ids=["choice", "cgroupns", "mirror-url", "relative-path", "runtime-path", "pool-size", "features", "dns-string"],
)
def test_values_docker_would_not_start_with_are_refused(tmp_path, config, problem):
    assert problem in refused(tmp_path, config)["msg"]


def test_keys_are_checked_against_the_installed_engines_version(tmp_path, monkeypatch):
    """log-format came with Docker 25: refused on docker.io 20.10, taken by Docker 27."""
    result = refused(tmp_path, {"log-format": "json"}, FAKE_DOCKERD_WITHOUT_VALIDATE, monkeypatch)
    assert "'log-format' needs Docker 25.0 or later; this server runs 20.10" in result["msg"]
    assert result["engine_version"] == "20.10"
    newer = tmp_path / "newer"
    newer.mkdir()
    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
    fake_dockerd(newer, monkeypatch, FAKE_DOCKERD_WITH_VALIDATE)
    accepted = run({"path": str(newer / "daemon.json"), "config": {"log-format": "json"}, "validate": True})
    assert accepted["changed"] is True
    assert accepted["engine_version"] == "27.5"
    assert accepted["validated"] is True  # and dockerd --validate took it too


def test_keys_removed_from_docker_are_refused_on_newer_engines(tmp_path, monkeypatch):
    result = refused(tmp_path, {"graph": "/data/docker"}, FAKE_DOCKERD_WITH_VALIDATE, monkeypatch)
    assert "'graph' was removed in Docker 23.0; this server runs 27.5" in result["msg"]


def test_check_mode_refuses_too(tmp_path):
    """A preview (role docker's preflight runs the module in check mode) finds the problem before any change."""
    refused(tmp_path, {"live-restore": "yes-please"}, check_mode=True)


def test_keys_left_as_they_are_are_not_checked(tmp_path):
    """The admin's key that the schema does not know stays: the running engine took it; only written keys count."""
    path = tmp_path / "daemon.json"
    write(path, '{"labels": ["admin"], "admin-plugin-key": 1}')
    result = run({"path": str(path), "config": {"live-restore": True}, "validate": True})
    assert result["changed"] is True
    assert load(path) == {"labels": ["admin"], "admin-plugin-key": 1, "live-restore": True}


def test_gpulab_defaults_and_the_nvidia_runtime_pass_the_schema():
    """What gpulab's roles write must pass on the oldest engine they support."""
    config = {
        "live-restore": True,
        "log-driver": "json-file",
        "log-opts": {"max-size": "100m", "max-file": "3"},
        "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}},
        "default-runtime": "nvidia",
        "registry-mirrors": ["http://127.0.0.1:5000"],
    }
    assert ddc.schema_problems(config, list(config), (20, 10)) == []


def test_the_previous_content_is_returned_for_a_rollback(tmp_path):
    path = tmp_path / "daemon.json"
    assert run({"path": str(path), "config": {"debug": True}})["previous_content"] is None
    text = path.read_text(encoding="utf-8")
    assert run({"path": str(path), "config": {"debug": False}})["previous_content"] == text
