"""contrib/: the systemd units and timers pass `systemd-analyze verify` (no systemd as PID 1 needed),
every kvm-borg command they and the borgmatic example run is a valid command line, and the borgmatic
example is a valid borgmatic 2.x configuration."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from harness import KVM_BORG_BIN, VENV_BIN

from kvm_borg.cli_args import build_parser

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
UNITS = sorted((CONTRIB / "systemd").glob("kvm-borg-*.*"))
INSTALLED = "/usr/local/bin/kvm-borg"


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path)
    return parser


def test_units_pass_systemd_analyze_verify(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: scripts/setup.sh installs the systemd package"
    for path in UNITS:  # the ExecStart binary must exist: point it at this venv's kvm-borg
        (tmp_path / path.name).write_text(path.read_text().replace(INSTALLED, str(KVM_BORG_BIN)))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr.strip() == "" and proc.stdout.strip() == "", proc.stderr


def test_every_service_has_a_timer_or_boot_install_and_valid_commands():
    services = [p for p in UNITS if p.suffix == ".service"]
    assert {p.stem for p in services} == {"kvm-borg-backup", "kvm-borg-prune", "kvm-borg-check", "kvm-borg-recover"}
    for path in services:
        command = unit(path)["Service"]["ExecStart"].replace("%%", "%")
        argv = shlex.split(command)
        assert argv[0] == INSTALLED
        build_parser().parse_args(argv[1:])  # exits (SystemExit) on a bad command line
        timer = path.with_suffix(".timer")
        if path.stem == "kvm-borg-recover":
            assert not timer.exists() and unit(path)["Install"]["WantedBy"] == "multi-user.target"
            assert "libvirtd.service" in unit(path)["Unit"]["After"]
        else:
            assert unit(timer)["Timer"]["Persistent"] == "true"
    calendars = {p.stem: unit(p)["Timer"]["OnCalendar"] for p in UNITS if p.suffix == ".timer"}
    assert calendars["kvm-borg-backup"].startswith("*-*-* ")  # nightly
    assert calendars["kvm-borg-prune"].startswith("Sun ")  # weekly
    assert calendars["kvm-borg-check"].startswith("*-*-01 ")  # monthly


def test_borgmatic_example_validates_and_runs_valid_kvm_borg_commands():
    config = CONTRIB / "borgmatic" / "kvm-borg.yaml"
    proc = subprocess.run([str(VENV_BIN / "borgmatic"), "config", "validate", "-c", str(config)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = yaml.safe_load(config.read_text())
    hooks = data["commands"]
    assert [(h.get("before") or h.get("after"), "before" in h) for h in hooks] == [
        ("configuration", True), ("configuration", False)]
    assert all(h["when"] == ["create"] for h in hooks) and "states" not in hooks[1]  # after runs on failure too
    for hook in hooks:
        for command in hook["run"]:
            argv = shlex.split(command)
            assert argv[0] == "kvm-borg"
            build_parser().parse_args(argv[1:])
    assert data["chunker_params"] == "fixed,4194304" and data["one_file_system"] is False
