"""Webhook notifier: tell an HTTP endpoint how each `kvm-borg backup` run went.

Config (key `webhook:`):

    plugins: [kvm_borg_hooks.webhook]
    webhook:
      url: https://hooks.example.org/kvm-borg        # POST the JSON summary after every run
      healthchecks_url: https://hc-ping.com/UUID      # .../start, then ... (success) or .../fail
      # or any of: start_url, success_url, failure_url (they win over healthchecks_url)
      timeout: 10s
      headers: {Authorization: "Bearer ..."}

The start ping goes out when the run's first domain is about to be frozen; success means exit
code 0 or 1 (warnings), failure exit code 2 (or an interrupted run). The payload:
`{"event": "backup", "status": "success"|"warning"|"failure", "exit_code", "host", "time",
"domains": [...]}` (the RunSummary). A notifier failure is logged, never fails the backup.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from kvm_borg.config_schema import HTTP_URL, POSITIVE_DURATION, any_of_keys, key, mapping, named_mapping, optional
from kvm_borg.hookspecs import hookimpl
from kvm_borg.redact import redact_text

log = logging.getLogger(__name__)

ATTEMPTS = 2
_started: set[int] = set()  # id() of the Settings whose run already sent its start ping


URL_KEYS = ("url", "healthchecks_url", "start_url", "success_url", "failure_url")

WEBHOOK_SCHEMA = key(optional(mapping({
    "url": key(optional(HTTP_URL), "POST the JSON run summary here after every run"),
    "healthchecks_url": key(optional(HTTP_URL), "healthchecks.io-style base: URL/start, then URL or URL/fail"),
    "start_url": key(optional(HTTP_URL), "pinged when the run's first domain is about to be frozen"),
    "success_url": key(optional(HTTP_URL), "pinged after a run with exit code 0 or 1"),
    "failure_url": key(optional(HTTP_URL), "pinged after a failed or interrupted run"),
    "timeout": key(POSITIVE_DURATION, "per request", default="10s"),
    "headers": key(named_mapping({"type": "string", "x-expected": "a string"}), "extra HTTP headers", default={}),
}, allOf=[any_of_keys(URL_KEYS, "give at least one of url, healthchecks_url, start_url, success_url, failure_url")])),
    "where kvm_borg_hooks.webhook reports each run (POST of the summary, start / success / fail pings; "
    "see docs/operations.md)",
    examples=[{"healthchecks_url": "https://hc-ping.com/YOUR-UUID"}])


@hookimpl
def kvm_borg_config_schema():
    """Return the `webhook:` key."""
    return {"keys": {"webhook": WEBHOOK_SCHEMA}}


def endpoints(webhook: dict) -> dict[str, str | None]:
    """Given the `webhook:` config, return {url, start, success, failure} (None where not configured)."""
    base = (webhook.get("healthchecks_url") or "").rstrip("/") or None
    return {
        "url": webhook.get("url"),
        "start": webhook.get("start_url") or (f"{base}/start" if base else None),
        "success": webhook.get("success_url") or base,
        "failure": webhook.get("failure_url") or (f"{base}/fail" if base else None),
    }


def payload(summary, host: str) -> dict:
    """Given a RunSummary and the host name, return the JSON document the webhook receives."""
    code = summary.exit_code
    status = "success" if code == 0 else "warning" if code == 1 else "failure"
    return {"event": "backup", "status": status, "exit_code": code, "host": host, "time": time.time(),
            **summary.as_dict()}


def endpoint_label(url: str) -> str:
    """Given an endpoint URL, return what a log line may show of it: scheme, host and port. The path and
    query of a webhook (a healthchecks UUID, a chat service's token) are its secret, as is any userinfo."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


def post(url: str, body: bytes | None, webhook: dict) -> None:
    """POST `body` (JSON) to `url` with the configured headers and timeout; retried once; errors are logged."""
    headers = {"Content-Type": "application/json", "User-Agent": "kvm-borg-webhook", **webhook.get("headers", {})}
    for attempt in range(1, ATTEMPTS + 1):
        request = urllib.request.Request(url, data=body or b"", headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=webhook.get("timeout", 10.0)) as response:
                response.read()
            return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if attempt == ATTEMPTS:
                reason = str(getattr(exc, "reason", None) or exc).replace(url, endpoint_label(url))
                log.warning("webhook %s failed: %s", endpoint_label(url), reason)
            else:
                time.sleep(1)


@hookimpl
def kvm_borg_before_snapshot(domain, settings):
    """Send the start ping once per run, when its first domain is about to be frozen."""
    webhook = settings.plugin_config.get("webhook") if settings else None
    if not webhook or id(settings) in _started:
        return
    _started.add(id(settings))
    start = endpoints(webhook)["start"]
    if start:
        post(start, None, webhook)


@hookimpl
def kvm_borg_backup_finished(summary, settings):
    """POST the run's summary to `url` and ping success or failure."""
    webhook = settings.plugin_config.get("webhook") if settings else None
    if not webhook:
        return
    document = payload(summary, getattr(settings, "hostname", None) or socket.gethostname())
    body = redact_text(json.dumps(document, default=str)).encode()  # no repository password leaves the host
    urls = endpoints(webhook)
    if urls["url"]:
        post(urls["url"], body, webhook)
    ping = urls["failure"] if document["status"] == "failure" else urls["success"]
    if ping:
        post(ping, body, webhook)
