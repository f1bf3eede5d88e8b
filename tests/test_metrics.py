"""The Prometheus textfile: written after every run, parsed by prometheus_client's own text parser."""

from __future__ import annotations

import json
import os
import socket
import stat
import time

from prometheus_client.parser import text_string_to_metric_families

from harness import DiskSpec, run_cli, start_cli, wait_for
from support import assert_back_on_own_images, cli_env, write_config

from kvm_borg import metrics
from kvm_borg.models import DomainResult, RunSummary, StoreResult
from kvm_borg.run_state import empty_state, record_backup


def samples(text: str, host: str | None = None) -> dict[tuple[str, tuple], float]:
    """Given textfile contents (and the host every series must carry, then left out of the keys), return
    {(metric name, sorted labels): value} as prometheus_client parses them."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if host is not None:
                assert labels.pop("host", None) == host, sample
            found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found[(f"kvm_borg_{name}", tuple(sorted(labels.items())))]


def test_render_escapes_label_values_and_parses():
    summary = RunSummary([DomainResult('we"ird\\ näme\nx', ok=True, freeze_seconds=0.25, commit_seconds=1.5,
                                       seconds=9.0, stores=[StoreResult("main", ok=True, archive="a",
                                                                        original_size=10, deduplicated_size=3)])])
    state = record_backup(empty_state(), summary, ["main"], now=1700000000.0)
    found = samples(metrics.render(state))
    labels = {"domain": 'we"ird\\ näme\nx', "repository": "main"}
    assert value(found, "last_success_timestamp_seconds", **labels) == 1700000000.0
    assert value(found, "last_read_bytes", **labels) == 10 and value(found, "last_added_bytes", **labels) == 3
    assert value(found, "last_freeze_seconds", **labels) == 0.25
    assert metrics.render(empty_state()) == ""


def test_textfile_after_each_run_keeps_other_domains_and_records_checks(domain_factory, image_dir, tmp_path):
    good = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)], name="metrics good")
    other = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 8)], running=False, name="metrics other")
    bad = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 8)], name="metrics bad")
    bad.dom.checkpointCreateXML("<domaincheckpoint><name>cp1</name></domaincheckpoint>", 0)
    textfile = tmp_path / "collector" / "kvm-borg.prom"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", metrics_file=str(textfile))
    try:
        started = time.time()
        first = run_cli("backup", good.name, other.name, bad.name, "--json", config=config, env=cli_env())
        assert first.returncode == 2, first.stderr
        assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
        assert [p.name for p in textfile.parent.iterdir()] == ["kvm-borg.prom"]  # no temporary file left
        found = samples(textfile.read_text(), socket.gethostname())
        result = {d["domain"]: d for d in json.loads(first.stdout)["domains"]}
        g = {"domain": good.name, "repository": "main"}
        assert value(found, "last_attempt_success", **g) == 1
        assert started <= value(found, "last_success_timestamp_seconds", **g) <= time.time()
        assert value(found, "last_read_bytes", **g) == result[good.name]["stores"][0]["original_size"] > 0
        assert value(found, "last_added_bytes", **g) == result[good.name]["stores"][0]["deduplicated_size"]
        assert value(found, "last_freeze_seconds", **g) == result[good.name]["freeze_seconds"] > 0
        assert value(found, "last_commit_seconds", **g) == result[good.name]["commit_seconds"] > 0
        assert value(found, "last_duration_seconds", **g) == result[good.name]["seconds"]
        b = {"domain": bad.name, "repository": "main"}
        assert value(found, "last_attempt_success", **b) == 0
        assert ("kvm_borg_last_success_timestamp_seconds", tuple(sorted(b.items()))) not in found
        assert value(found, "last_run_exit_code") == 2

        # A second run of one domain only: the others keep their series.
        second = run_cli("backup", good.name, config=config, env=cli_env())
        assert second.returncode == 0, second.stderr
        found = samples(textfile.read_text(), socket.gethostname())
        assert value(found, "last_attempt_success", domain=other.name, repository="main") == 1
        assert value(found, "last_attempt_success", **b) == 0
        assert value(found, "last_run_exit_code") == 0

        # A check lands in the metrics too.
        check = run_cli("check", config=config, env=cli_env())
        assert check.returncode == 0, check.stderr
        found = samples(textfile.read_text(), socket.gethostname())
        assert value(found, "last_check_success", repository="main") == 1
        assert value(found, "last_check_timestamp_seconds", repository="main") >= started
        assert os.stat(image_dir / "kb" / "state" / "run-state.json").st_mode & 0o077 == 0
    finally:
        for checkpoint in bad.dom.listAllCheckpoints(0):
            checkpoint.delete(0)


def test_a_run_that_dies_on_the_overlay_shows_its_deadline_then_an_orphaned_entry_until_recover(
        domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 8)], name="metrics orphan")
    textfile = tmp_path / "collector" / "kvm-borg.prom"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", metrics_file=str(textfile),
                          store_timeout="2h", commit_timeout="30m")
    host = socket.gethostname()
    pause = tmp_path / "at-storing"
    started = time.time()
    proc = start_cli("backup", domain.name, config=config, env=cli_env(KVM_BORG_FAILPOINT=f"storing:pause={pause}"))
    try:
        wait_for(lambda: pause.exists(), "the backup to reach storing", timeout=120, proc=proc)
        # Written at the run's start: one run in progress, its deadline one domain's bound away.
        found = samples(textfile.read_text(), host)
        assert value(found, "runs_in_progress") == 1 and value(found, "job_bound_seconds") == 9000
        assert started + 9000 <= value(found, "run_deadline_timestamp_seconds") <= time.time() + 9000
        # Another command rewrites the file meanwhile: the live run holds its entry, nothing orphaned.
        assert run_cli("check", config=config, env=cli_env()).returncode == 0
        found = samples(textfile.read_text(), host)
        entry = {"domain": domain.name, "stage": "storing"}
        assert value(found, "journal_entry_orphaned", **entry) == 0
        assert started <= value(found, "journal_entry_created_timestamp_seconds", **entry) <= time.time()
        proc.kill()  # the run dies with the guest on its overlay
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert run_cli("check", config=config, env=cli_env()).returncode == 0
    found = samples(textfile.read_text(), host)
    assert value(found, "journal_entry_orphaned", **entry) == 1 and value(found, "runs_in_progress") == 0
    assert not any(name == "kvm_borg_run_deadline_timestamp_seconds" for name, _labels in found)
    recover = run_cli("recover", "--all", config=config, env=cli_env())
    assert recover.returncode == 0, recover.stderr
    assert "journal_entry" not in textfile.read_text()
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_verify_drills_land_in_the_metrics_and_bad_input_does_not(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name="metrics verify")
    textfile = tmp_path / "collector" / "kvm-borg.prom"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", metrics_file=str(textfile))
    host = socket.gethostname()
    assert run_cli("backup", domain.name, config=config, env=cli_env()).returncode == 0
    started = time.time()
    drill = run_cli("verify", domain.name, "--json", config=config, env=cli_env())
    assert drill.returncode == 0, drill.stderr
    report = json.loads(drill.stdout)
    found = samples(textfile.read_text(), host)
    pair = {"domain": domain.name, "repository": "main"}
    assert value(found, "last_verify_success", **pair) == 1
    assert started <= value(found, "last_verify_timestamp_seconds", **pair) <= time.time()
    assert abs(value(found, "last_verify_restore_seconds", **pair) - report["restore_seconds"]) < 0.001  # JSON: rounded
    # A drill of a backed-up domain that finds no such archive fails, and says so.
    missing = run_cli("verify", domain.name, "--archive", "metrics-gone", config=config, env=cli_env())
    assert missing.returncode == 2
    found = samples(textfile.read_text(), host)
    assert value(found, "last_verify_success", **pair) == 0
    # Bad input (an unknown --repo) and a domain kvm-borg never backed up are no drill: nothing recorded.
    before = textfile.read_text()
    bad = run_cli("verify", domain.name, "--repo", "nope", config=config, env=cli_env())
    typo = run_cli("verify", "metrics-no-such-domain", config=config, env=cli_env())
    assert bad.returncode == 2 and typo.returncode == 2 and textfile.read_text() == before
