"""Credentials in a repository URL never reach a log line or --json output, while restic itself
still gets the real URL (it authenticates with them). Real restic against a loopback REST server."""

from __future__ import annotations

import base64
import json

import pytest

from harness import DiskSpec, run_cli
from rest_server import RestServer
from support import assert_back_on_own_images, cli_env, write_config, write_passphrase

USER, SECRET = "kbuser", "s3cr3t-Pa55"


@pytest.fixture
def rest_repository(tmp_path):
    server = RestServer(USER, SECRET)
    with server.running():
        yield server, {"name": "rest", "type": "restic", "url": server.url(USER, SECRET),
                       "passphrase_file": str(write_passphrase(tmp_path / "restic.pass"))}


def _assert_no_secret(proc):
    for stream in (proc.stdout, proc.stderr):
        assert SECRET not in stream
        assert base64.b64encode(f"{USER}:{SECRET}".encode()).decode() not in stream


def test_credentials_in_a_rest_url_are_in_no_log_line_nor_json_and_restic_gets_them(
        rest_repository, domain_factory, image_dir):
    server, repository = rest_repository
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)])
    config = write_config(image_dir / "kb", repositories=[repository], init=False)
    procs = [run_cli("-vv", "init", config=config, env=cli_env())]
    assert procs[0].returncode == 0, procs[0].stderr
    assert f"{USER}:***@127.0.0.1:{server.port}" in procs[0].stderr  # the location is shown, redacted
    procs.append(run_cli("-vv", "backup", domain.name, "--json", config=config, env=cli_env()))
    assert procs[-1].returncode == 0, procs[-1].stderr
    assert json.loads(procs[-1].stdout)["domains"][0]["stores"][0]["ok"]
    procs.append(run_cli("-vv", "list", "--json", config=config, env=cli_env()))
    assert procs[-1].returncode == 0 and json.loads(procs[-1].stdout), procs[-1].stderr
    procs.append(run_cli("-vv", "status", "--refresh", "--json", domain.name, config=config, env=cli_env()))
    for proc in procs:
        _assert_no_secret(proc)
    assert server.created and any(k.startswith("snapshots/") for k in server.files)
    assert server.auth_seen == {server.expected}  # restic authenticated with the real URL's credentials
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_a_failing_store_error_and_the_error_line_do_not_show_the_password(rest_repository, domain_factory,
                                                                           image_dir, tmp_path):
    server, repository = rest_repository
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)])
    repository = {**repository, "url": server.url(USER, SECRET + "-wrong")}  # refused with 401
    config = write_config(image_dir / "kb", repositories=[repository], init=False)
    for args in (("-vv", "init"), ("-vv", "backup", domain.name, "--json"), ("list", "--json")):
        proc = run_cli(*args, config=config, env=cli_env())
        assert proc.returncode == 2, proc.stderr
        assert SECRET not in proc.stdout + proc.stderr
    assert f"Basic {base64.b64encode(f'{USER}:{SECRET}-wrong'.encode()).decode()}" in server.auth_seen
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
