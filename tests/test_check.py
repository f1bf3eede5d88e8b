"""`kvm-borg check` on real borg repositories: a sound one passes, a damaged one fails, both land in the metrics."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from harness import run_cli
from support import borg, cli_env, write_config, write_passphrase


def check_metrics(textfile) -> dict[str, float]:
    return {s.labels["repository"]: s.value for f in text_string_to_metric_families(textfile.read_text())
            for s in f.samples if s.name == "kvm_borg_last_check_success"}


def test_check_passes_on_a_sound_repository_and_fails_on_a_damaged_one(tmp_path):
    textfile = tmp_path / "kvm-borg.prom"
    passphrase = str(write_passphrase(tmp_path / "passphrase"))
    repos = [{"name": "sound", "type": "borg", "path": str(tmp_path / "sound"), "passphrase_file": passphrase},
             {"name": "damaged", "type": "borg", "path": str(tmp_path / "damaged"), "passphrase_file": passphrase}]
    config = write_config(tmp_path / "kb", repositories=repos, plugins=(), metrics_file=str(textfile))

    proc = run_cli("check", "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert [(r["repository"], r["ok"], r["mode"]) for r in json.loads(proc.stdout)] == [
        ("sound", True, "metadata"), ("damaged", True, "metadata")]
    assert check_metrics(textfile) == {"sound": 1, "damaged": 1}

    verify = run_cli("check", "--repo", "sound", "--verify-data", "--json", config=config, env=cli_env())
    assert verify.returncode == 0 and json.loads(verify.stdout)[0]["mode"] == "verify-data"

    # Store something in the second repository, then damage its largest segment file: borg's
    # check finds the CRC mismatch.
    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(range(256)) * 4096)
    borg("create", f"{tmp_path / 'damaged'}::x", payload, base_dir=tmp_path)
    segments = sorted((p for p in (tmp_path / "damaged" / "data").rglob("*") if p.is_file()),
                      key=lambda p: p.stat().st_size)
    segment = segments[-1]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))

    failed = run_cli("check", "--json", config=config, env=cli_env())
    assert failed.returncode == 2
    results = {r["repository"]: r for r in json.loads(failed.stdout)}
    assert results["sound"]["ok"] and not results["damaged"]["ok"] and results["damaged"]["error"]
    assert check_metrics(textfile) == {"sound": 1, "damaged": 0}


def test_read_data_subset_is_validated(tmp_path):
    config = write_config(tmp_path / "kb", repo_path=tmp_path / "repo", plugins=())
    proc = run_cli("check", "--read-data-subset", "150%", config=config, env=cli_env())
    assert proc.returncode == 2 and "--read-data-subset 150%" in proc.stderr
    ok = run_cli("check", "--read-data-subset", "10%", "--json", config=config, env=cli_env())
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["mode"] == "metadata"  # borg runs its full check
