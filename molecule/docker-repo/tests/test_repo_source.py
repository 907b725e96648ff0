"""Checks of the repo source: a deb822 source with its own key, and no stale source left behind."""


def test_docker_source_is_deb822_with_signed_by(host):
    source = host.file("/etc/apt/sources.list.d/docker.sources")
    assert source.exists
    text = source.content_string
    assert "URIs: http://127.0.0.1:8081/linux/debian" in text
    assert "Suites: bookworm" in text
    assert "Components: stable" in text
    signed_by = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Signed-By:"))
    assert host.file(signed_by).exists
    assert "BEGIN PGP PUBLIC KEY BLOCK" in host.file(signed_by).content_string


def test_stale_docker_source_was_removed(host):
    assert not host.file("/etc/apt/sources.list.d/docker.list").exists


def test_apt_update_is_clean(host):
    update = host.run("apt-get update")
    assert update.rc == 0, update.stderr
    assert "W:" not in update.stderr and "E:" not in update.stderr, update.stderr


def test_docker_ce_comes_from_the_repository(host):
    policy = host.check_output("apt-cache policy docker-ce")
    assert "127.0.0.1:8081/linux/debian bookworm/stable" in policy
    assert host.package("docker-ce").version.startswith("5:")
