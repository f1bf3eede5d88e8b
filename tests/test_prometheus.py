"""Fleet-wide monitoring: contrib/prometheus's alert rules pass `promtool check rules` and their unit
tests (`promtool test rules`); a real Prometheus scraping a real node_exporter's textfile collector
sees a real `kvm-borg backup`'s series with their `host` label (everything on 127.0.0.1, started and
stopped here)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from harness import DiskSpec, run_cli
from support import cli_env, write_config

RULES_DIR = Path(__file__).resolve().parent.parent / "contrib" / "prometheus"
RULES = RULES_DIR / "kvm-borg.rules.yml"
NODE_EXPORTER = "prometheus-node-exporter"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert shutil.which("promtool"), "promtool missing: scripts/setup.sh installs Debian's prometheus package"
    return subprocess.run(["promtool", *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)


def test_alert_rules_are_valid_and_their_unit_tests_pass():
    check = promtool("check", "rules", RULES.name)
    assert check.returncode == 0 and "SUCCESS: 8 rules found" in check.stdout, check.stdout + check.stderr
    unit = promtool("test", "rules", "kvm-borg.rules.test.yml")
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> dict:
    with _DIRECT.open(url, timeout=5) as response:
        return json.load(response)


@contextlib.contextmanager
def started(argv: list[str], log: Path, ready_url: str, deadline_seconds: float = 60):
    """Start argv (output to log), wait until ready_url answers 200, yield; always stop it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + deadline_seconds
        while True:
            assert proc.poll() is None, f"{argv[0]} exited {proc.returncode}: {log.read_text()[-2000:]}"
            with contextlib.suppress(OSError):
                with _DIRECT.open(ready_url, timeout=2) as response:
                    if response.status == 200:
                        break
            assert time.monotonic() < deadline, f"{argv[0]} not ready: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def query(base: str, promql: str) -> list[dict]:
    answer = get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_prometheus_scrapes_a_real_backups_series_through_node_exporter(domain_factory, image_dir, tmp_path):
    assert shutil.which(NODE_EXPORTER) and shutil.which("prometheus"), \
        "scripts/setup.sh installs Debian's prometheus and prometheus-node-exporter"
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name="prom e2e")
    collector = tmp_path / "collector"
    collector.mkdir()
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", hostname="prom-e2e-host",
                          metrics_file=str(collector / "kvm-borg.prom"))
    exporter_port, prometheus_port = free_port(), free_port()
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "node", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
    }))
    exporter = [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{exporter_port}", "--collector.disable-defaults",
                "--collector.textfile", f"--collector.textfile.directory={collector}"]
    prometheus = ["prometheus", f"--config.file={prom_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{prometheus_port}", "--web.enable-lifecycle"]
    base = f"http://127.0.0.1:{prometheus_port}"
    with started(exporter, tmp_path / "node-exporter.log", f"http://127.0.0.1:{exporter_port}/metrics"), \
            started(prometheus, tmp_path / "prometheus.log", f"{base}/-/ready"):
        backup = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
        assert backup.returncode == 0, backup.stderr
        stored = json.loads(backup.stdout)["domains"][0]["stores"][0]
        selector = f'{{domain="{domain.name}",repository="main"}}'
        deadline = time.monotonic() + 30
        while not (found := query(base, f"kvm_borg_last_success_timestamp_seconds{selector}")):
            assert time.monotonic() < deadline, "Prometheus never scraped the kvm-borg series"
            time.sleep(0.5)
        [series] = found
        assert series["metric"]["host"] == "prom-e2e-host" and series["metric"]["job"] == "node"
        assert abs(float(series["value"][1]) - time.time()) < 120
        [read] = query(base, f"kvm_borg_last_read_bytes{selector}")
        assert float(read["value"][1]) == stored["original_size"] > 0
        [success] = query(base, f"kvm_borg_last_attempt_success{selector}")
        assert float(success["value"][1]) == 1
        [exit_code] = query(base, 'kvm_borg_last_run_exit_code{host="prom-e2e-host"}')
        assert float(exit_code["value"][1]) == 0
        [running] = query(base, 'kvm_borg_runs_in_progress{host="prom-e2e-host"}')
        assert float(running["value"][1]) == 0
        # Every kvm-borg series Prometheus holds from this host carries the label; the rules loaded,
        # and none fires for a healthy backup.
        every = query(base, '{__name__=~"kvm_borg_.+"}')
        assert every and all(s["metric"].get("host") == "prom-e2e-host" for s in every)
        rules = get_json(f"{base}/api/v1/rules")["data"]["groups"]
        assert sum(len(g["rules"]) for g in rules) == 8 and all(r["health"] != "err" for g in rules for r in g["rules"])
        assert query(base, 'ALERTS{alertstate="firing",host="prom-e2e-host"}') == []
