"""kvm_borg_hooks.webhook against a local HTTP server on 127.0.0.1: success and failure payloads,
healthchecks.io-style start / success / fail pings."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import DiskSpec, run_cli
from support import cli_env, write_config

from kvm_borg_hooks import webhook


class Receiver(ThreadingHTTPServer):
    """Records every request: (method, path, headers, JSON body or None)."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict, object]] = []
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, self.path, dict(self.headers),
                                     json.loads(body) if body else None))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_endpoints_from_healthchecks_url_and_explicit_urls():
    assert webhook.endpoints({"healthchecks_url": "https://hc/abc/"}) == {
        "url": None, "start": "https://hc/abc/start", "success": "https://hc/abc", "failure": "https://hc/abc/fail"}
    assert webhook.endpoints({"healthchecks_url": "https://hc/abc", "failure_url": "https://other/f"})["failure"] == (
        "https://other/f")


def test_webhook_receives_success_and_failure_payloads(domain_factory, image_dir, tmp_path, receiver):
    good = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], name="webhook good")
    bad = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 8)], name="webhook bad")
    bad.dom.checkpointCreateXML("<domaincheckpoint><name>cp1</name></domaincheckpoint>", 0)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo",
                          plugins=("kbtest_plugins.probe", "kvm_borg_hooks.webhook"),
                          webhook={"url": f"{receiver.base}/summary", "healthchecks_url": f"{receiver.base}/ping/abc",
                                   "headers": {"X-Token": "t0k"}, "timeout": "5s"})
    try:
        ok = run_cli("backup", good.name, config=config, env=cli_env())
        assert ok.returncode == 0, ok.stderr
        assert [(method, path) for method, path, _, _ in receiver.requests] == [
            ("POST", "/ping/abc/start"), ("POST", "/summary"), ("POST", "/ping/abc")]
        _, _, headers, summary = receiver.requests[1]
        assert headers["X-Token"] == "t0k" and headers["Content-Type"] == "application/json"
        assert summary["event"] == "backup" and summary["status"] == "success" and summary["exit_code"] == 0
        [domain] = summary["domains"]
        assert domain["domain"] == good.name and domain["ok"] and domain["stores"][0]["archive"]
        assert receiver.requests[2][3] == summary  # the success ping carries the summary too

        receiver.requests.clear()
        failed = run_cli("backup", good.name, bad.name, config=config, env=cli_env())
        assert failed.returncode == 2
        paths = [path for _, path, _, _ in receiver.requests]
        assert paths == ["/ping/abc/start", "/summary", "/ping/abc/fail"]
        summary = receiver.requests[1][3]
        assert summary["status"] == "failure" and summary["exit_code"] == 2
        results = {d["domain"]: d for d in summary["domains"]}
        assert results[good.name]["ok"] and not results[bad.name]["ok"]
        assert "checkpoints" in results[bad.name]["error"]
    finally:
        for checkpoint in bad.dom.listAllCheckpoints(0):
            checkpoint.delete(0)


def test_an_unreachable_webhook_does_not_fail_the_backup(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name="webhook down")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", plugins=("kvm_borg_hooks.webhook",),
                          webhook={"url": "http://127.0.0.1:9/nothing-listens-here", "timeout": "2s"})
    proc = run_cli("backup", domain.name, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert "webhook http://127.0.0.1:9/… failed" in proc.stderr
    assert "nothing-listens-here" not in proc.stderr  # a webhook's path is its secret: never logged


def test_log_lines_show_only_the_endpoints_scheme_host_and_port():
    assert webhook.endpoint_label("https://hc-ping.com/5d3f-uuid") == "https://hc-ping.com/…"
    assert webhook.endpoint_label("https://user:pw@hooks.example.org:8443/T0/B1/sekrit?x=1") == (
        "https://hooks.example.org:8443/…")
    assert webhook.endpoint_label("http://[::1]:9/x") == "http://[::1]:9/…"
