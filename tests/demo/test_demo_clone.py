"""scripts/demo, run from a fresh git clone of this repository, ends in a working notebook: its last line is
student1's URL with the token on a port of this machine, which reaches Jupyter through the demo's SSH tunnel (200 with
the token, 403 without), the token is printed on that line only, the status page names the student, and
`scripts/demo --clean` stops the tunnel and removes the server.

Heavy (a Docker-in-Docker server, a few minutes): scripts/test runs it after the unit tests. The clone reuses the
images cached in Docker, the project's virtual environment and, hard-linked, the project's deep-learning archive
(.cache/demo/dl-notebook.tar.zst); everything else starts from nothing. It replaces a demo server left running.
"""

from __future__ import annotations

import http.cookiejar
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE = Path(".cache/demo/dl-notebook.tar.zst")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> tuple[int, str]:
    """The final status and URL of a GET, following redirects with cookies (as a browser would)."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        with opener.open(url, timeout=20) as answer:
            return answer.status, answer.geturl()
    except urllib.error.HTTPError as error:
        return error.code, error.geturl()


def port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_demo_from_a_fresh_clone_ends_in_a_notebook_reached_through_the_ssh_tunnel(tmp_path):
    clone = tmp_path / "gpulab"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    if (ROOT / ARCHIVE).is_file():
        (clone / ARCHIVE).parent.mkdir(parents=True)
        try:
            os.link(ROOT / ARCHIVE, clone / ARCHIVE)
        except OSError:
            shutil.copy2(ROOT / ARCHIVE, clone / ARCHIVE)
    port = free_port()
    env = {
        **os.environ,
        "GPULAB_DEMO_PORT": str(port),
        "GPULAB_VENV": os.environ.get("VIRTUAL_ENV", str(ROOT / ".venv")),
    }
    env.pop("GPULAB_CACHE", None)  # the clone's own .cache
    demo = clone / "scripts" / "demo"
    subprocess.run([str(demo), "--clean"], env=env, check=True, capture_output=True)
    try:
        run = subprocess.run(
            [str(demo)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200, check=False
        )
        assert run.returncode == 0, run.stdout[-6000:]
        lines = run.stdout.rstrip("\n").splitlines()
        token = (clone / ".cache" / "demo" / "student1.token").read_text().strip()
        assert re.fullmatch(r"[0-9a-f]{48}", token)
        url = f"http://127.0.0.1:{port}/?token={token}"
        assert lines[-1] == url
        assert run.stdout.count(token) == 1, "the token is printed on the URL line only"

        pid = int((clone / ".cache" / "demo" / "tunnel.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].endswith(b"ssh")
        assert f"127.0.0.1:{port}:127.0.0.1:8888".encode() in cmdline

        status, final = http_status(url)
        assert status == 200
        assert "/login" not in final, f"the token did not log in: {final}"
        assert http_status(f"http://127.0.0.1:{port}/api/status?token={token}")[0] == 200
        assert http_status(f"http://127.0.0.1:{port}/api/status")[0] == 403

        page_line = next(line for line in lines[-4:] if "status page: " in line)
        page = Path(page_line.split("status page: ", 1)[1].strip())
        assert page == clone / ".cache" / "demo" / "status" / "status.html"
        html = page.read_text()
        assert "student1" in html
        assert token not in html
    finally:
        subprocess.run([str(demo), "--clean"], env=env, check=True, capture_output=True)
    assert not alive(pid)
    assert not port_answers(port)
    gone = subprocess.run(["docker", "inspect", "gpulab-demo-server"], capture_output=True, check=False)
    assert gone.returncode != 0
    shutil.rmtree(clone)  # with the student's key and token (a failed run keeps them, for a look)
