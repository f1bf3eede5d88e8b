"""Prometheus metrics in the node_exporter textfile-collector format, rendered from the run state.

`render` is pure: the run state (kvm_borg.run_state), the host name, the pending journal entries
and the per-domain job bound in, the text out, so every domain keeps its series across runs that
did not touch it. Every series carries `host` (the config's `hostname`) so one Prometheus can
watch a fleet; contrib/prometheus/kvm-borg.rules.yml alerts on them. `write_textfile` replaces the file atomically (a
temporary name node_exporter ignores, fsync, rename), so the collector never reads half a file.
"""

from __future__ import annotations

from pathlib import Path

from kvm_borg.atomic import write_atomic

PREFIX = "kvm_borg_"

# name -> (help, field of the per-domain-and-repository attempt or success record)
_DOMAIN_REPOSITORY_GAUGES = (
    ("last_success_timestamp_seconds", "Time of the last successful backup (Unix time).", "last_success", "time"),
    ("last_attempt_timestamp_seconds", "Time of the last backup attempt (Unix time).", "last_attempt", "time"),
    ("last_attempt_success", "1 if the last backup attempt stored an archive, else 0.", "last_attempt", "ok"),
    ("last_duration_seconds", "Duration of the domain's last backup attempt, freeze to merge back.",
     "last_attempt", "seconds"),
    ("last_store_seconds", "Seconds the repository took to store the last attempt's archive.",
     "last_attempt", "store_seconds"),
    ("last_read_bytes", "Bytes read (archive original size) by the last successful backup.",
     "last_success", "original_size"),
    ("last_added_bytes", "Bytes added to the repository (deduplicated size) by the last successful backup.",
     "last_success", "deduplicated_size"),
    ("last_freeze_seconds", "Seconds the snapshot (freeze) took in the last attempt.", "last_attempt",
     "freeze_seconds"),
    ("last_commit_seconds", "Seconds merging the overlays back took in the last attempt.", "last_attempt",
     "commit_seconds"),
)
_VERIFY_GAUGES = (
    ("last_verify_timestamp_seconds", "Time of the last verify drill (Unix time).", "time"),
    ("last_verify_success", "1 if the last verify drill passed, else 0.", "ok"),
    ("last_verify_restore_seconds", "Seconds the last verify drill took to restore the archive.", "restore_seconds"),
    ("last_verify_rto_seconds", "Restore plus first sign of life of the last `verify --boot` drill.", "rto_seconds"),
)
_REPOSITORY_GAUGES = (
    ("last_check_timestamp_seconds", "Time of the last repository check (Unix time).", "last_check", "time"),
    ("last_check_success", "1 if the last repository check passed, else 0.", "last_check", "ok"),
    ("last_check_duration_seconds", "Seconds the last repository check took.", "last_check", "seconds"),
    ("last_prune_timestamp_seconds", "Time of the last prune (Unix time).", "last_prune", "time"),
    ("last_prune_success", "1 if the last prune (and compact) succeeded, else 0.", "last_prune", "ok"),
)


def escape_label(value: str) -> str:
    """Given a label value, return it escaped for the text format (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{key}="{escape_label(str(value))}"' for key, value in labels.items()) + "}"


def _number(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render(state: dict, host: str = "", entries: list[dict] = (), job_bound: float | None = None) -> str:
    """Given the run state, the host name (the `host` label; "" leaves it out), the pending journal
    entries ([{domain, stage, created, orphaned}]) and one domain's job bound in seconds (store_timeout
    + commit_timeout), return the metrics text: per domain and repository, per repository, per run,
    per pending journal entry. Nothing recorded and nothing pending: ""."""
    lines: list[str] = []
    base = {"host": host} if host else {}
    domains = state.get("domains", {})
    for name, help_text, record, key in _DOMAIN_REPOSITORY_GAUGES:
        samples = []
        for domain in sorted(domains):
            for repository, data in sorted(domains[domain].get("repositories", {}).items()):
                value = (data.get(record) or {}).get(key)
                if value is not None:
                    samples.append(f"{PREFIX}{name}{_labels(**base, domain=domain, repository=repository)} "
                                   f"{_number(value)}")
        _family(lines, name, help_text, samples)
    for name, help_text, key in _VERIFY_GAUGES:
        samples = []
        for domain in sorted(domains):
            for repository, data in sorted(domains[domain].get("repositories", {}).items()):
                value = (data.get("last_verify") or {}).get(key)
                if value is not None:
                    samples.append(f"{PREFIX}{name}{_labels(**base, domain=domain, repository=repository)} "
                                   f"{_number(value)}")
        _family(lines, name, help_text, samples)
    samples = []
    for domain in sorted(domains):
        for repository, data in sorted(domains[domain].get("repositories", {}).items()):
            if data.get("archive_count") is not None:
                samples.append(f"{PREFIX}archives{_labels(**base, domain=domain, repository=repository)} "
                               f"{_number(data['archive_count'])}")
    _family(lines, "archives", "Archives of the domain in the repository, as of the last prune or status --refresh.",
            samples)
    repositories = state.get("repositories", {})
    for name, help_text, record, key in _REPOSITORY_GAUGES:
        samples = []
        for repository in sorted(repositories):
            value = (repositories[repository].get(record) or {}).get(key)
            if value is not None:
                samples.append(f"{PREFIX}{name}{_labels(**base, repository=repository)} {_number(value)}")
        _family(lines, name, help_text, samples)
    host_labels = _labels(**base) if base else ""
    last_run = state.get("last_run")
    if last_run:
        _family(lines, "last_run_timestamp_seconds", "Time the last `kvm-borg backup` run ended (Unix time).",
                [f"{PREFIX}last_run_timestamp_seconds{host_labels} {_number(last_run['time'])}"])
        _family(lines, "last_run_exit_code", "Exit code of the last `kvm-borg backup` run (0 ok, 1 warnings, 2 error).",
                [f"{PREFIX}last_run_exit_code{host_labels} {_number(last_run['exit_code'])}"])
    running = state.get("running")
    if running is not None:
        _family(lines, "runs_in_progress", "`kvm-borg backup` runs started and not ended, as of this file.",
                [f"{PREFIX}runs_in_progress{host_labels} {len(running)}"])
        if running:
            deadline = min(run["deadline"] for run in running.values())
            _family(lines, "run_deadline_timestamp_seconds",
                    "When the oldest run in progress passes its bound: start + domains x (store_timeout + "
                    "commit_timeout) (Unix time).", [f"{PREFIX}run_deadline_timestamp_seconds{host_labels} "
                                                     f"{_number(deadline)}"])
    samples, orphaned = [], []
    for entry in sorted(entries, key=lambda e: (e["domain"], e["created"])):
        labels = _labels(**base, domain=entry["domain"], stage=entry["stage"])
        samples.append(f"{PREFIX}journal_entry_created_timestamp_seconds{labels} {_number(entry['created'])}")
        orphaned.append(f"{PREFIX}journal_entry_orphaned{labels} {_number(bool(entry['orphaned']))}")
    _family(lines, "journal_entry_created_timestamp_seconds",
            "A pending journal entry: the guest runs on its overlay since this time (Unix time) until the "
            "merge back or `kvm-borg recover`.", samples)
    _family(lines, "journal_entry_orphaned",
            "1 if no running kvm-borg holds the pending journal entry (stage exposed: `freeze --expose` by design; "
            "else the run died: `kvm-borg recover`).", orphaned)
    if lines and job_bound is not None:
        _family(lines, "job_bound_seconds", "One domain's bound: store_timeout + commit_timeout (seconds).",
                [f"{PREFIX}job_bound_seconds{host_labels} {_number(job_bound)}"])
    return "\n".join(lines) + "\n" if lines else ""


def _family(lines: list[str], name: str, help_text: str, samples: list[str]) -> None:
    if samples:
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} gauge")
        lines.extend(samples)


def write_textfile(path: str | Path, text: str) -> None:
    """Given the textfile's path and its text, replace it atomically (world-readable: node_exporter reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode("utf-8"), 0o644)  # its temp name ends in .tmp: the collector skips it
