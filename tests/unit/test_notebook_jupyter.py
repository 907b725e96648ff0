"""Tests of the notebook role's Jupyter side (plugins/filter/notebook_jupyter.py): the flavour of an image, the command
line, the config file with the secrets, for each flavour (classic Notebook 6, Jupyter Server 1 and 2).
"""

import base64
import copy
import hashlib
import importlib
import json

import pytest
from ansible.errors import AnsibleFilterError
from notebook_cases import (
    IMAGE,
    NOTEBOOK6,
    PASSWORD,
    TOKEN,
    plan,
    users,
    with_entry,
)

nb = importlib.import_module("ansible_collections.gpulab.lab.plugins.filter.notebook_jupyter")


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
