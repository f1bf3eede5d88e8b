"""Retention policies: config checking, which policy a domain gets, borg's flags, borg's algorithm."""

from datetime import datetime, timezone

import pytest

from kvm_borg import config, retention
from kvm_borg.backends.borg import commands as borg_commands
from kvm_borg.backends.borg.output import parse_prune_line
from kvm_borg.errors import ConfigError


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def test_default_policy_is_7_daily_4_weekly_6_monthly():
    data = config.parse_text("")
    policy = retention.policy_for("web", data["retention"], data["domains_retention"])
    assert borg_commands.make_keep_flags(policy) == ("--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "6")


def test_domain_policy_replaces_the_global_one_which_replaces_the_default():
    data = config.parse_text("retention: {keep_daily: 14, keep_within: 2d}\n"
                             "domains_retention: {db: {keep_last: 3}}\n")
    assert borg_commands.make_keep_flags(retention.policy_for("web", data["retention"], data["domains_retention"])) == (
        "--keep-within", "2d", "--keep-daily", "14")
    assert borg_commands.make_keep_flags(retention.policy_for("db", data["retention"], data["domains_retention"])) == (
        "--keep-last", "3")


@pytest.mark.parametrize("text, message", [
    ("retention: {keep_dayly: 3}", "retention.keep_dayly: unknown retention rule"),
    ("retention: {keep_daily: -1}", "retention.keep_daily: expected a whole number ≥ 0"),
    ("retention: {keep_within: 3 days}", "retention.keep_within: expected a number and a unit"),
    ("retention: 7", "retention: expected a mapping of keep_* rules"),
    ("domains_retention: {web: {keep_weekly: x}}", "domains_retention.web.keep_weekly: expected a whole number"),
    ("prune_after_backup: sometimes", "prune_after_backup: expected true or false"),
    ("max_age: soon", "max_age: expected a duration"),
    ("metrics_file: relative.prom", "metrics_file: expected an absolute path"),
])
def test_retention_config_errors_name_the_key(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        config.parse_text(text)


def test_an_empty_policy_is_recognized():
    assert retention.is_empty(retention.merge_policy({"keep_daily": 0}))
    assert not retention.is_empty(retention.merge_policy({"keep_within": "1d"}))


def test_a_prune_with_an_empty_policy_is_refused_naming_the_domain():
    assert retention.empty_policy_refusal("web", retention.merge_policy({"keep_daily": 0})) == (
        "the retention policy of domain 'web' keeps nothing: refusing to prune")
    assert retention.empty_policy_refusal("web", retention.merge_policy({"keep_last": 1})) is None


def test_kept_archives_follows_borgs_rules():
    times = {
        "a-0310b": utc("2024-03-10T20:00:00"), "a-0310a": utc("2024-03-10T08:00:00"),
        "a-0309": utc("2024-03-09T08:00:00"), "a-0308": utc("2024-03-08T08:00:00"),
        "a-0301": utc("2024-03-01T08:00:00"), "a-0220": utc("2024-02-20T08:00:00"),
        "a-0115": utc("2024-01-15T08:00:00"),
    }
    policy = retention.merge_policy({"keep_daily": 2, "keep_weekly": 2, "keep_monthly": 5})
    assert retention.kept_archives(times, policy) == {
        "a-0310b": "keep_daily", "a-0309": "keep_daily",  # newest of each of the 2 newest days
        "a-0301": "keep_weekly", "a-0220": "keep_weekly",  # weeks 9 and 8 (week 10 already kept)
        "a-0115": "keep_monthly",  # 2024-01 (03 and 02 already kept); then the rule runs out
    }


def test_kept_archives_keeps_the_oldest_when_a_rule_runs_out():
    times = {"x-1": utc("2024-01-01T00:00:00"), "x-2": utc("2024-01-01T01:00:00"), "x-3": utc("2024-01-02T00:00:00")}
    kept = retention.kept_archives(times, retention.merge_policy({"keep_daily": 5}))
    assert kept == {"x-3": "keep_daily", "x-2": "keep_daily", "x-1": "keep_daily (oldest)"}


def test_keep_within_counts_from_now():
    now = utc("2024-03-10T12:00:00")
    times = {"in": utc("2024-03-09T13:00:00"), "out": utc("2024-03-09T11:00:00")}
    assert retention.kept_archives(times, retention.merge_policy({"keep_within": "1d"}), now) == {"in": "within"}


def test_prune_argv_is_limited_to_one_domains_archives():
    argv = borg_commands.make_prune_command("borg", "/r", borg_commands.archive_glob("web"),
                                            ("--keep-daily", "7"), dry_run=True, lock_wait=5)
    assert argv == ("borg", "prune", "--list", "--log-json", "--lock-wait", "5", "--dry-run", "--glob-archives",
                    "web-" + "[0-9]" * 8 + "T" + "[0-9]" * 6 + "Z", "--keep-daily", "7", "/r")
    with pytest.raises(ValueError):
        borg_commands.make_prune_command("borg", "/r", "", ("--keep-daily", "7"))
    assert borg_commands.make_compact_command("borg", "/r") == ("borg", "compact", "--log-json", "/r")


def test_prune_list_lines_are_parsed():
    line_id = "a" * 64
    assert parse_prune_line(f"{'Keeping archive (rule: daily #1):':<44} web 1-20240310T200000Z  "
                            f"Sun, 2024-03-10 20:00:00 [{line_id}]") == ("kept", "web 1-20240310T200000Z", "keep_daily")
    assert parse_prune_line(f"{'Keeping archive (rule: monthly[oldest] #1):':<44} w-1 Sun, 2024-03-10 20:00:00 "
                            f"[{line_id}]") == ("kept", "w-1", "keep_monthly (oldest)")
    assert parse_prune_line(f"{'Keeping archive (rule: secondly #2):':<44} w-1 Sun, 2024-03-10 20:00:00 "
                            f"[{line_id}]") == ("kept", "w-1", "keep_last")
    assert parse_prune_line(f"{'Would prune:':<44} w-2 Sun, 2024-03-10 20:00:00 [{line_id}]") == ("pruned", "w-2", None)
    assert parse_prune_line(f"{'Pruning archive (3/4):':<44} w-2 Sun, 2024-03-10 20:00:00 [{line_id}]") == (
        "pruned", "w-2", None)
    assert parse_prune_line("Keeping 3 archives") is None


def test_restic_prune_and_check_argv():
    from kvm_borg.backends.restic import commands as rc

    assert rc.make_prune_command("restic", options=("sftp.command=ssh x",)) == (
        "restic", "prune", "--option", "sftp.command=ssh x")
    assert rc.make_check_command("restic", read_data_subset="10%") == ("restic", "check", "--read-data-subset", "10%")
    assert rc.make_check_command("restic", read_data=True) == ("restic", "check", "--read-data")
    with pytest.raises(ValueError):
        rc.make_check_command("restic", read_data=True, read_data_subset="1/5")
