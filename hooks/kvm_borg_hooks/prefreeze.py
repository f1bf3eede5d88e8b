"""Pre-freeze commands: run commands inside a guest through its QEMU guest agent (guest-exec) right
before kvm-borg snapshots it, and right after, e.g. to flush a database to disk.

Config (key `prefreeze:`), per domain:

    plugins: [kvm_borg_hooks.prefreeze]
    prefreeze:
      db01:
        before:                       # each a string (run with /bin/sh -c) or an argv list
          - "mysql -e 'FLUSH TABLES; FLUSH LOGS'"
          - [/usr/local/bin/app-checkpoint, --sync]
        after: ["systemctl start app-batch"]
        timeout: 60s                  # per command
        required: false               # true: a failing `before` command fails the domain's backup

A failing command is a warning in the run summary (exit code 1); with `required: true` a failing
`before` command fails the domain before anything is frozen. The guest must run qemu-guest-agent
with guest-exec allowed. A lock that must be held *during* the snapshot (FLUSH TABLES WITH READ
LOCK) cannot be held across separate guest-exec calls: use the agent's fsfreeze hook scripts in the
guest for that, which kvm-borg's quiesced snapshot runs.

This is a `kvm_borg_frozen_source` wrapper: it wraps whatever source freezes the domain (the
built-in snapshot, or a plugin's), so it works for `kvm-borg backup` and `kvm-borg freeze` alike.
"""

from __future__ import annotations

import base64
import logging
import time

from kvm_borg.engine.lifecycle import agent_command
from kvm_borg.errors import EngineError, RefusedError
from kvm_borg.config_schema import BOOLEAN, POSITIVE_DURATION, key, mapping, named_mapping
from kvm_borg.hookspecs import hookimpl
from kvm_borg.models import FreezeResult, FrozenSource, ReleaseResult

log = logging.getLogger(__name__)

# One guest command: a string (run with /bin/sh -c) or a non-empty argv list.
GUEST_COMMANDS = {
    "type": "array",
    "items": {"anyOf": [{"type": "string", "pattern": "\\S"},
                        {"type": "array", "minItems": 1, "items": {"type": "string"}}],
              "x-message": "expected a command string or a list of strings, got {value!r}"},
    "x-expected": "a list of commands",
}

PREFREEZE_SCHEMA = key(named_mapping(mapping({
    "before": key(GUEST_COMMANDS, "run in the guest right before the snapshot", default=[]),
    "after": key(GUEST_COMMANDS, "run in the guest right after the snapshot", default=[]),
    "timeout": key(POSITIVE_DURATION, "per command", default="60s"),
    "required": key(BOOLEAN, "a failing `before` command fails the domain's backup", default=False),
})), "per domain, commands kvm_borg_hooks.prefreeze runs in the guest through its agent (see "
    "docs/operations.md)", default={},
    examples=[{"db01": {"before": ["mysql -e 'FLUSH TABLES'"]}}])


@hookimpl
def kvm_borg_config_schema():
    """Return the `prefreeze:` key."""
    return {"keys": {"prefreeze": PREFREEZE_SCHEMA}}

POLL_SECONDS = 0.2


class GuestCommandError(Exception):
    """A guest command could not run, failed, or did not finish in time."""


def exec_request(command) -> dict:
    """Given a command (a string for /bin/sh -c, or an argv list), return the guest-exec arguments."""
    path, args = ("/bin/sh", ["-c", command]) if isinstance(command, str) else (command[0], list(command[1:]))
    return {"path": path, "arg": args, "capture-output": True}


def describe(command) -> str:
    return command if isinstance(command, str) else " ".join(command)


def _agent(dom, execute: str, arguments: dict, timeout: float) -> dict:
    try:
        return agent_command(dom, execute, arguments, timeout)
    except EngineError as exc:
        raise GuestCommandError(f"guest agent: {exc}") from None


def guest_exec(dom, command, timeout: float) -> tuple[int, str, str]:
    """Given a running domain and a command, run it through the guest agent; return (exit code, stdout, stderr)."""
    pid = _agent(dom, "guest-exec", exec_request(command), min(timeout, 30))["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = _agent(dom, "guest-exec-status", {"pid": pid}, min(timeout, 30))
        if status.get("exited"):
            out = base64.b64decode(status.get("out-data", "")).decode("utf-8", "replace")
            err = base64.b64decode(status.get("err-data", "")).decode("utf-8", "replace")
            if "exitcode" not in status:
                raise GuestCommandError(f"killed by signal {status.get('signal')}")
            return status["exitcode"], out, err
        if time.monotonic() > deadline:
            raise GuestCommandError(f"still running after {timeout:.0f}s")
        time.sleep(POLL_SECONDS)


def run_commands(dom, name: str, phase: str, commands, timeout: float) -> list[str]:
    """Run each command in order; return one message per failure (a failure does not stop the next command)."""
    failures = []
    for command in commands:
        try:
            code, out, err = guest_exec(dom, command, timeout)
        except GuestCommandError as exc:
            failures.append(f"domain '{name}': {phase} command `{describe(command)}` failed: {exc}")
            continue
        if code != 0:
            detail = (err.strip() or out.strip()).splitlines()[-1:] or [""]
            failures.append(f"domain '{name}': {phase} command `{describe(command)}` exited with code {code}"
                            + (f": {detail[0]}" if detail[0] else ""))
        else:
            log.info("domain '%s': %s command `%s` ran in the guest", name, phase, describe(command))
    return failures


class GuestCommandsSource:
    """A FrozenSource (kvm_borg.models) that runs the domain's `before` commands, freezes through `inner`,
    then runs `after`; every other member is the inner source's."""

    def __init__(self, inner: FrozenSource, handle, spec: dict):
        self.inner, self.handle, self.spec = inner, handle, spec

    def hand_over(self, owner: str) -> None:
        self.inner.hand_over(owner)

    def mark_stage(self, stage: str) -> str | None:
        return self.inner.mark_stage(stage)

    def freeze(self) -> FreezeResult:
        name = self.handle.name
        failures = run_commands(self.handle.dom, name, "pre-freeze", self.spec["before"], self.spec["timeout"])
        if failures and self.spec["required"]:
            raise RefusedError(f"{failures[0]}; nothing was frozen (prefreeze: required)")
        result = self.inner.freeze()
        failures += run_commands(self.handle.dom, name, "post-freeze", self.spec["after"], self.spec["timeout"])
        for failure in failures:
            log.warning("%s", failure)
        result.warnings.extend(failures)
        return result

    def release(self) -> ReleaseResult:
        return self.inner.release()


@hookimpl(wrapper=True)
def kvm_borg_frozen_source(domain, plan, settings):
    """Wrap the chosen source of a running domain that has `prefreeze:` commands."""
    source = yield
    spec = (settings.plugin_config.get("prefreeze") or {}).get(plan.name)
    if source is None or not spec or not plan.running or not (spec["before"] or spec["after"]):
        return source
    return GuestCommandsSource(source, domain, spec)
