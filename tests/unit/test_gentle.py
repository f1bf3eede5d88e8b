"""Gentle on production: `nice:`/`ionice:` for every child and a repository's `upload_ratelimit`, as values
and argv (the real processes are observed in tests/test_gentle.py)."""

import os
import shutil
import subprocess
import sys

import pytest

from kvm_borg import config, config_formats, execute, priority
from kvm_borg.backends.borg import commands as borg_commands
from kvm_borg.backends.restic import commands as rc
from kvm_borg.errors import ConfigError

REPOS = """
repositories:
  - {name: b, type: borg, path: /srv/borg, passphrase_file: /etc/p%s}
  - {name: r, type: restic, url: /srv/restic, passphrase_file: /etc/p%s}
"""


@pytest.mark.parametrize("text, expected", [
    ("idle", ("idle", None)), ("best-effort", ("best-effort", None)), ("best-effort:7", ("best-effort", 7)),
    ("realtime:0", ("realtime", 0)), (" realtime ", ("realtime", None)),
])
def test_ionice_values_parse(text, expected):
    assert priority.parse_ionice(text) == expected


@pytest.mark.parametrize("text", ["idle:3", "best-effort:8", "best-effort:", "rt", "realtime:x", "3", ""])
def test_bad_ionice_values_are_refused(text):
    with pytest.raises(ValueError):
        priority.parse_ionice(text)


def test_the_prefix_applies_nice_then_ionice_and_is_empty_when_nothing_is_set():
    assert priority.priority_prefix(priority.INHERIT) == ()
    both = priority.child_priority(10, "best-effort:6")
    assert priority.priority_prefix(both, 0, "/n", "/i") == ("/n", "-n", "10", "--", "/i", "-c", "2", "-n", "6", "--")
    assert priority.priority_prefix(priority.child_priority(None, "idle"), 0, "/n", "/i") == ("/i", "-c", "3", "--")
    assert priority.priority_prefix(priority.child_priority(0, None), 0, "/n", "/i") == ()
    assert priority.describe(both) == "nice 10, ionice best-effort:6" and priority.describe(priority.INHERIT) == "inherited"


def test_nice_is_absolute_whatever_niceness_kvm_borg_runs_at():
    """`nice -n` is relative: under a unit's Nice=10, `nice: 13` is a step of 3, `nice: 0` one of -10."""
    assert priority.priority_prefix(priority.child_priority(13, None), 10, "/n") == ("/n", "-n", "3", "--")
    assert priority.priority_prefix(priority.child_priority(0, None), 10, "/n") == ("/n", "-n", "-10", "--")
    assert priority.priority_prefix(priority.child_priority(10, None), 10, "/n") == ()


def test_a_child_is_wrapped_only_when_a_priority_is_set_and_its_binary_exists():
    true = shutil.which("true")
    gentle = priority.child_priority(19, "idle")
    assert execute.with_child_priority((true,), priority.INHERIT) == (true,)
    assert execute.with_child_priority(("kvm-borg-no-such-binary",), gentle) == ("kvm-borg-no-such-binary",)
    wrapped = execute.with_child_priority((true, "x"), gentle)
    step = str(19 - os.getpriority(os.PRIO_PROCESS, 0))
    assert wrapped == (execute.NICE, "-n", step, "--", execute.IONICE, "-c", "3", "--", true, "x")


def test_the_wrapped_child_really_runs_at_that_priority_and_keeps_its_name():
    """The prefix run for real: the command sees niceness 7 and ionice best-effort 5 for itself."""
    argv = execute.with_child_priority(
        (shutil.which("sh"), "-c", "cut -d' ' -f19 /proc/$$/stat; ionice -p $$"), priority.child_priority(7, "best-effort:5"))
    process = subprocess.Popen(execute.with_parent_death_signal(argv), stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=30)
    assert out.split("\n")[:2] == ["7", "best-effort: prio 5"]
    assert execute.command_name(process) == "sh"


def test_a_child_of_a_niced_kvm_borg_gets_the_configured_niceness_not_the_sum():
    """kvm-borg itself at niceness 5 more (a unit's Nice=), `nice: 12`: the child runs at 12, not 12 + 5."""
    child = (sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))")
    code = ("import os, subprocess, sys; from kvm_borg import execute, priority; os.nice(5); "
            f"argv = execute.with_child_priority({child!r}, priority.child_priority(12, None)); "
            "print(os.getpriority(os.PRIO_PROCESS, 0), subprocess.run(argv, capture_output=True, text=True).stdout)")
    parent, child_nice = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout.split()
    assert int(parent) >= 5 and child_nice == "12"


def test_run_command_and_run_tool_give_children_the_set_priority(monkeypatch):
    from kvm_borg import tools

    monkeypatch.setattr(execute, "_child_priority", priority.child_priority(3, "idle"))
    probe = ("sh", "-c", "cut -d' ' -f19 /proc/$$/stat; ionice -p $$")
    assert execute.run_command(probe).stdout.split("\n")[:2] == ["3", "idle"]
    assert tools.tool_output(probe).split("\n")[:2] == ["3", "idle"]
    monkeypatch.setattr(execute, "_child_priority", priority.INHERIT)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert execute.run_command(probe).stdout.split("\n")[0] == str(own)


def test_nice_and_ionice_are_config_keys_unset_by_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"state_dir: {tmp_path / 'kb'}\n")
    settings = config.load_config(str(path))[0]
    assert (settings.nice, settings.ionice, settings.child_priority) == (None, None, priority.INHERIT)
    path.write_text(f"state_dir: {tmp_path / 'kb'}\nnice: 19\nionice: best-effort:7\n")
    settings = config.load_config(str(path))[0]
    assert settings.child_priority == priority.ChildPriority(19, "best-effort", 7)


@pytest.mark.parametrize("text, message", [
    ("nice: 20", "nice: "), ("nice: -1", "nice: "), ("nice: ten", "nice: "),
    ("ionice: idle:2", "ionice: the idle class takes no level, got 'idle:2'"),
    ("ionice: best-effort:9", "ionice: the level of best-effort is 0 (highest) to 7, got 'best-effort:9'"),
    ("ionice: slow", "ionice: expected idle, best-effort[:LEVEL] or realtime[:LEVEL], got 'slow'"),
])
def test_bad_priority_values_are_one_line_naming_the_key(text, message):
    with pytest.raises(ConfigError) as info:
        config.parse_text(text + "\n")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("value, rate, kib", [
    ("50MiB", 50 * 2**20, 51200), ("50MiB/s", 50 * 2**20, 51200), ("800k", 800 * 1024, 800), (1024, 1024, 1),
    ("1.5KiB", 1536, 2), ("10MB", 10**7, 9766), (512, 512, 1),
])
def test_upload_ratelimit_is_a_size_per_second_sent_in_whole_kib(value, rate, kib):
    assert config_formats.upload_ratelimit(value, "k") == rate
    assert config_formats.rate_kib_per_second(rate) == kib


@pytest.mark.parametrize("value", ["100", 0, "511B", "0MiB", "0.4KiB"])
def test_an_upload_ratelimit_that_rounds_to_zero_is_refused_in_one_line(value):
    with pytest.raises(ConfigError) as info:
        config.parse_text(REPOS % (f", upload_ratelimit: {value!r}", ""))
    assert "rounds to 0 KiB/s" in str(info.value) and "\n" not in str(info.value)


def test_upload_ratelimit_per_repository_is_normalized_to_bytes_per_second():
    data = config.parse_text(REPOS % (", upload_ratelimit: 50MiB", ", upload_ratelimit: 2MiB/s"))
    borg, restic = data["repositories"]
    assert borg["upload_ratelimit"] == 50 * 2**20 and restic["upload_ratelimit"] == 2 * 2**20
    assert config.parse_text(REPOS % ("", ""))["repositories"][0]["upload_ratelimit"] is None


def test_borg_create_gets_upload_ratelimit_in_kib_only_when_set():
    common = dict(compression="lz4", chunker_params="fixed,4194304", read_special=False, sparse=False, comment=None,
                  progress=False, lock_wait=5)
    limited = borg_commands.make_create_command("borg", "/r", "a", ["/x"], upload_ratelimit_kib=51200, **common)
    assert limited[limited.index("--upload-ratelimit") + 1] == "51200"
    assert "--upload-ratelimit" not in borg_commands.make_create_command("borg", "/r", "a", ["/x"], **common)


def test_restic_backup_and_prune_get_limit_upload_in_kib_only_when_set():
    backup = rc.make_backup_command("restic", ["/x"], host="h", tags=["t"], time=None, limit_upload_kib=800)
    assert backup[backup.index("--limit-upload") + 1] == "800" and backup.index("--limit-upload") < backup.index("--")
    assert rc.make_prune_command("restic", limit_upload_kib=800)[-2:] == ("--limit-upload", "800")
    assert "--limit-upload" not in rc.make_backup_command("restic", ["/x"], host="h", tags=[], time=None)
    assert "--limit-upload" not in rc.make_prune_command("restic")
