"""kvm_borg_hooks.webhook: what leaves the host carries no repository password (the POST body goes
through the same redaction as every log line and --json document)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from kvm_borg_hooks import webhook


class Summary:
    exit_code = 2

    def as_dict(self) -> dict:
        return {"domains": [{"domain": "web1", "ok": False,
                             "error": "restic: cannot reach rest:https://fleet:s3cret@backup.example.org/repo"}]}


def test_the_summary_sent_to_the_webhook_is_redacted(monkeypatch):
    sent = []
    monkeypatch.setattr(webhook, "post", lambda url, body, _config: sent.append((url, body)))
    settings = SimpleNamespace(plugin_config={"webhook": {"url": "https://hooks.example.org/T/B/x"}}, hostname="hv1")
    webhook.kvm_borg_backup_finished(Summary(), settings)
    [(url, body)] = sent
    assert url == "https://hooks.example.org/T/B/x"
    document = json.loads(body)
    assert document["status"] == "failure" and document["host"] == "hv1"
    assert "fleet:***@backup.example.org" in document["domains"][0]["error"]
    assert b"s3cret" not in body
