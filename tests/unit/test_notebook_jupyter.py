"""Tests of the notebook role's Jupyter side (plugins/filter/notebook_jupyter.py): the flavour of an image, the command
line, the config file with the secrets, for each flavour (classic Notebook 6, Jupyter Server 1 and 2).
"""

import base64
import copy
import hashlib
import importlib
import json
import logging
import os
import secrets
import shutil

import pytest
from ansible.errors import AnsibleFilterError
from notebook_cases import (
    IMAGE,
    NOTEBOOK6,
    PASSWORD,
    ROOT,
    TOKEN,
    plan,
    users,
    with_entry,
)

nb = importlib.import_module("ansible_collections.gpulab.lab.plugins.filter.notebook_jupyter")
FLAVOURS = nb.FLAVOURS


# ---- Jupyter ------------------------------------------------------------------------------------------------


def probe(image, versions=None, rc=0, stderr=""):
    return {"item": image, "rc": rc, "stdout": json.dumps(versions) if versions else "", "stderr": stderr}


@pytest.mark.parametrize(
    ("versions", "frontend", "flavour"),
    [
        (NOTEBOOK6, "notebook", "notebook6"),
        ({"notebook": "7.2.1", "jupyter_server": "2.14.0", "jupyterlab": "4.2.0"}, "notebook", "jupyter_server2"),
        ({"notebook": "7.2.1", "jupyter_server": "2.14.0", "jupyterlab": "4.2.0"}, "lab", "jupyter_server2"),
        ({"notebook": "6.5.4", "jupyter_server": "1.24.0", "jupyterlab": "3.6.3"}, "lab", "jupyter_server1"),
        ({"notebook": "6.5.4", "jupyter_server": "1.24.0", "jupyterlab": "3.6.3"}, "notebook", "notebook6"),
        ({"notebook": "6.0.3", "jupyter_server": None, "jupyterlab": "2.2.9"}, "lab", "notebook6"),
    ],
)
def test_the_flavour_follows_the_images_jupyter(versions, frontend, flavour):
    flavours = nb.notebook_flavours([probe(IMAGE, versions)])
    assert flavours[IMAGE] == {"versions": versions, "new": True}
    users_ = [{**plan()["users"][0], "frontend": frontend}]
    result = nb.notebook_commands(users_, flavours)
    assert result["errors"] == []
    assert result["users"][0]["flavour"] == flavour


def test_the_command_line():
    result = nb.notebook_commands(plan()["users"], nb.notebook_flavours([probe(IMAGE, NOTEBOOK6)]))
    assert result["users"][0]["command"] == [
        "python3",
        "-m",
        "notebook",
        "--no-browser",
        "--ip=0.0.0.0",
        "--port=8888",
        "--allow-root",
        "--notebook-dir=/workspace",
        "--config=/etc/gpulab-notebook/gpulab_jupyter_config.json",
    ]
    lab = [{**plan()["users"][0], "frontend": "lab", "container_workdir": "/home/jovyan/work"}]
    versions = {"notebook": None, "jupyter_server": "2.14.0", "jupyterlab": "4.2.0"}
    images = {IMAGE: {"python": "/opt/conda/bin/python"}}
    command = nb.notebook_commands(lab, nb.notebook_flavours([probe(IMAGE, versions)]), images)["users"][0]["command"]
    assert command[:3] == ["/opt/conda/bin/python", "-m", "jupyterlab"]
    assert "--notebook-dir=/home/jovyan/work" in command


@pytest.mark.parametrize(
    ("versions", "frontend", "expected"),
    [
        (NOTEBOOK6, "lab", "has no JupyterLab (python module jupyterlab); use frontend: notebook"),
        ({"notebook": None, "jupyter_server": "2.1", "jupyterlab": "4.0"}, "notebook", "use frontend: lab"),
    ],
)
def test_an_image_without_the_frontend_is_refused(versions, frontend, expected):
    users_ = [{**plan()["users"][0], "frontend": frontend}]
    result = nb.notebook_commands(users_, nb.notebook_flavours([probe(IMAGE, versions)]))
    assert expected in result["errors"][0]


def test_an_image_that_cannot_be_asked_is_refused():
    found = nb.notebook_flavours([probe(IMAGE, rc=127, stderr='exec: "python3": executable file not found')])
    assert "could not ask the image" in found[IMAGE]["error"]
    assert "python3" in found[IMAGE]["error"] and "declare it in notebook_images" in found[IMAGE]["error"]
    assert "error" in nb.notebook_flavours([{**probe(IMAGE), "stdout": "Segmentation fault"}])[IMAGE]


def test_declared_and_cached_images_are_not_probed():
    cached = [{"item": "a:1", "content": base64.b64encode(json.dumps(NOTEBOOK6).encode()).decode()}]
    cached.append({"item": "b:1", "content": base64.b64encode(b"garbage").decode()})  # ignored: probed instead
    found = nb.notebook_flavours([probe("b:1", NOTEBOOK6)], {"c:1": {"flavour": "jupyter_server2"}}, cached)
    assert found == {
        "c:1": {"flavour": "jupyter_server2"},
        "a:1": {"versions": NOTEBOOK6},
        "b:1": {"versions": NOTEBOOK6, "new": True},
    }
    assert "error" in nb.notebook_flavours([], {"d:1": {"flavour": "jupyter9"}})["d:1"]


def test_an_absent_user_needs_no_image():
    result = nb.notebook_commands([{"name": "old", "state": "absent", "image": ""}], {})
    assert result["errors"] == []


# ---- the config file with the secrets -------------------------------------------------------------------------


def jupyter_passwd_check(hashed, passphrase):
    """notebook.auth.security.passwd_check / jupyter_server.auth.security.passwd_check for salted hashes."""
    algorithm, salt, digest = hashed.split(":", 2)
    check = hashlib.new(algorithm)
    check.update(passphrase.encode("utf-8") + salt.encode("ascii"))
    return check.hexdigest() == digest


def test_the_password_hash_is_jupyters_format_and_stable():
    first = nb.password_hash(PASSWORD, "gpu01\0student2")
    assert first == nb.password_hash(PASSWORD, "gpu01\0student2")  # so a second run changes nothing
    assert first != nb.password_hash(PASSWORD, "gpu02\0student2")  # another salt on another server
    assert first.startswith("sha256:")
    assert jupyter_passwd_check(first, PASSWORD)
    assert not jupyter_passwd_check(first, PASSWORD + "!")
    with pytest.raises(AnsibleFilterError):
        nb.password_hash("", "seed")


def planned_with(flavour, entries=None):
    result = nb.notebook_commands(plan(entries)["users"], {IMAGE: {"flavour": flavour}})
    return {user["name"]: user for user in result["users"]}


def test_the_config_of_classic_notebook_6():
    planned = planned_with("notebook6")
    token_config = json.loads(nb.notebook_jupyter_config(users(), planned["student1"], "gpu01"))
    assert token_config == {
        "NotebookApp": {"token": TOKEN, "password": "", "password_required": False, "allow_password_change": False}
    }
    password_config = json.loads(nb.notebook_jupyter_config(users(), planned["student2"], "gpu01"))["NotebookApp"]
    assert password_config["token"] == ""
    assert password_config["password_required"] is True
    assert jupyter_passwd_check(password_config["password"], PASSWORD)


def test_the_config_of_jupyter_server_1_and_2():
    planned = planned_with("jupyter_server1")
    config = json.loads(nb.notebook_jupyter_config(users(), planned["student1"], "gpu01"))
    assert config["ServerApp"]["token"] == TOKEN
    planned = planned_with("jupyter_server2")
    config = json.loads(nb.notebook_jupyter_config(users(), planned["student2"], "gpu01"))
    assert config["IdentityProvider"] == {"token": ""}
    assert jupyter_passwd_check(config["PasswordIdentityProvider"]["hashed_password"], PASSWORD)
    assert config["PasswordIdentityProvider"]["allow_password_change"] is False


def test_a_given_hash_is_used_as_it_is_and_auth_none_empties_both():
    entries = users()
    argon2 = "argon2:$argon2id$v=19$m=10240,t=10,p=8$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
    entries[1] = {**entries[1], "password_hash": argon2}
    del entries[1]["password"]
    planned = planned_with("notebook6", entries)
    assert json.loads(nb.notebook_jupyter_config(entries, planned["student2"], "gpu01"))["NotebookApp"]["password"] == (
        argon2
    )
    entries = with_entry({"token": None, "auth": "none"})
    planned = planned_with("jupyter_server2", entries)
    config = json.loads(nb.notebook_jupyter_config(entries, planned["student3"], "gpu01"))
    assert config["IdentityProvider"] == {"token": ""}
    assert config["PasswordIdentityProvider"]["hashed_password"] == ""
    assert config["PasswordIdentityProvider"]["password_required"] is False


def test_the_config_is_stable_text():
    planned = planned_with("notebook6")
    one = nb.notebook_jupyter_config(users(), planned["student2"], "gpu01")
    assert one == nb.notebook_jupyter_config(copy.deepcopy(users()), planned["student2"], "gpu01")
    assert one.endswith("}\n")


def test_bad_arguments():
    with pytest.raises(AnsibleFilterError):
        nb.notebook_jupyter_config(users(), {"name": "nobody", "flavour": "notebook6"}, "gpu01")
    with pytest.raises(AnsibleFilterError):
        nb.notebook_jupyter_config(users(), {"name": "student1", "flavour": "jupyter9"}, "gpu01")


# ---- no token in the log, no runtime file in the workdir --------------------------------------------------------

LOG_FILTER = (
    ROOT / "ansible_collections" / "gpulab" / "lab" / "roles" / "notebook" / "files" / "gpulab_jupyter_config.py"
)
# What each flavour's server logs when the browser opens the sheet's URL and afterwards, as its code writes it:
# Notebook 6 and Jupyter Server 1 (notebook/log.py, jupyter_server/log.py: log_method(msg.format(**ns)) on
# tornado.access), Jupyter Server 2 (the same line, and the ServerApp's own messages with %s).
ACCESS_LINES = {
    "notebook6": [("tornado.access", "302 GET /?token={token} (172.17.0.1) 1.240000ms", ())],
    "jupyter_server1": [("tornado.access", "302 GET /lab?token={token} (172.17.0.1) 1.24ms", ())],
    "jupyter_server2": [
        ("tornado.access", "404 GET /api/nope?token={token} (172.17.0.1) 0.80ms referer=None", ()),
        ("ServerApp", "Jupyter Server is running at: %s", ("http://127.0.0.1:8888/tree?token={token}",)),
    ],
}


@pytest.fixture
def log_filter_for(tmp_path, monkeypatch):
    """Load the role's log filter the way traitlets loads a config file (exec with __file__) beside the JSON config
    of a flavour; the logging record factory and the environment are put back afterwards."""
    previous = logging.getLogRecordFactory()
    monkeypatch.delenv("JUPYTER_RUNTIME_DIR", raising=False)

    def load(flavour, entries=None):
        planned = planned_with(flavour, entries)["student1"]
        (tmp_path / planned["config_file"]).write_text(nb.notebook_jupyter_config(entries or users(), planned, "gpu01"))
        path = tmp_path / planned["log_filter_file"]
        shutil.copy(LOG_FILTER, path)
        exec(compile(path.read_text(), str(path), "exec"), {"c": None, "__file__": str(path)})  # noqa: S102
        return planned

    yield load
    logging.setLogRecordFactory(previous)


def logged(caplog, lines, token):
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        for name, text, args in lines:
            logging.getLogger(name).info(text.format(token=token), *(arg.format(token=token) for arg in args))
    return "\n".join(record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_notebooks_log_hides_the_token_for_every_flavour(flavour, log_filter_for, caplog):
    log_filter_for(flavour)
    text = logged(caplog, ACCESS_LINES[flavour], TOKEN)
    assert TOKEN not in text
    assert "?token=(hidden)" in text
    wrong = secrets.token_hex(24)  # a wrong or old token in a URL is hidden as well
    assert wrong not in logged(caplog, ACCESS_LINES[flavour], wrong)


def test_the_log_filter_hides_the_token_anywhere(log_filter_for, caplog):
    log_filter_for("jupyter_server2")
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("ServerApp").warning("headers: %s", json.dumps({"Authorization": f"token {TOKEN}"}))
        logging.getLogger("ServerApp").info("kernel started with %s", TOKEN)
    assert TOKEN not in "\n".join(record.getMessage() for record in caplog.records)
    assert caplog.records[0].getMessage() == 'headers: {"Authorization": "token (hidden)"}'
    assert caplog.records[1].getMessage() == "kernel started with (hidden)"


def test_the_log_filter_keeps_every_other_line_as_it_is(log_filter_for, caplog):
    log_filter_for("notebook6")
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("NotebookApp").info("Serving notebooks from local directory: %s", "/workspace")
        logging.getLogger("tornado.access").warning("403 GET /api/status (172.17.0.1) 1.2ms referer=None")
    assert [record.getMessage() for record in caplog.records] == [
        "Serving notebooks from local directory: /workspace",
        "403 GET /api/status (172.17.0.1) 1.2ms referer=None",
    ]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_flavour_reads_the_log_filter_which_keeps_the_runtime_files_out_of_the_workdir(flavour, log_filter_for):
    user = log_filter_for(flavour)
    config = [arg for arg in user["command"] if arg.startswith("--config=")]
    assert config == ["--config=/etc/gpulab-notebook/gpulab_jupyter_config.json"]
    # traitlets reads <name>.py beside <name>.json for one --config name; the role writes both in the mounted folder
    assert user["log_filter_file"] == "gpulab_jupyter_config.py"
    runtime = os.environ["JUPYTER_RUNTIME_DIR"]  # set by the filter, for Jupyter and the kernels it starts
    assert runtime == "/tmp/jupyter-runtime"
    assert not runtime.startswith(user["container_workdir"] + "/")
    assert runtime not in [mount["target"] for mount in user["mounts"]]
    assert "JUPYTER_RUNTIME_DIR" not in user["env"]  # not in the container's environment: no recreated containers
