"""archive_choice: only one host's archives are taken, and "latest" is never dated in the future."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kvm_borg.archive_choice import (
    ANY_HOST,
    CLOCK_SKEW,
    check_explicit,
    choose_latest,
    chosen_host,
    of_host,
    split_future,
)
from kvm_borg.errors import UsageError
from kvm_borg.models import ArchiveInfo

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def info(name: str, when: datetime | str, host: str | None = "hv1", domain: str = "web") -> ArchiveInfo:
    time = when if isinstance(when, str) else when.isoformat(timespec="seconds")
    return ArchiveInfo(name=name, domain=domain, time=time, repository="main", host=host)


def choose(archives, host="hv1", domain="web"):
    return choose_latest(archives, domain=domain, host=host, now=NOW, repository="main")


def test_chosen_host_is_the_requested_one_else_a_single_configured_one_else_this_host():
    assert chosen_host("hv2", "hv1") == "hv2"
    assert chosen_host(None, "hv1") == "hv1"
    assert chosen_host(None, "hv1", ["hv3"]) == "hv3"
    assert chosen_host(None, "hv1", ["*"]) == "hv1"
    assert chosen_host(None, "hv1", ["hv2", "hv3"]) == "hv1"
    assert chosen_host("*", "hv1") == ANY_HOST
    with pytest.raises(UsageError, match="--host needs"):
        chosen_host(" ", "hv1")


def test_of_host_keeps_one_hosts_archives_or_every_hosts():
    archives = [info("a", NOW, "hv1"), info("b", NOW, "hv2"), info("c", NOW, None)]
    assert [a.name for a in of_host(archives, "hv1")] == ["a"]
    assert [a.name for a in of_host(archives, ANY_HOST)] == ["a", "b", "c"]


def test_latest_is_this_hosts_newest():
    archives = [info("old", NOW - timedelta(days=2)), info("new", NOW - timedelta(hours=1)),
                info("other-host-newer", NOW - timedelta(minutes=1), host="hv2")]
    latest, warnings = choose(archives)
    assert latest.name == "new" and warnings == []
    assert choose(archives, host="hv2")[0].name == "other-host-newer"


def test_a_future_dated_archive_is_never_latest_and_is_named_in_a_warning():
    archives = [info("good", NOW - timedelta(hours=1)), info("planted", NOW + timedelta(days=365))]
    latest, warnings = choose(archives)
    assert latest.name == "good"
    assert len(warnings) == 1 and "planted" in warnings[0] and "future" in warnings[0]


def test_small_clock_skew_is_allowed():
    archives = [info("skewed", NOW + CLOCK_SKEW - timedelta(seconds=1)), info("older", NOW - timedelta(hours=1))]
    assert choose(archives)[0].name == "skewed"
    assert choose([info("too far", NOW + CLOCK_SKEW + timedelta(seconds=1)), info("older", NOW)])[0].name == "older"


def test_unreadable_time_is_never_latest():
    latest, warnings = choose([info("bad", "yesterday"), info("ok", NOW)])
    assert latest.name == "ok" and "unreadable" in warnings[0]


def test_only_future_or_foreign_archives_is_one_usage_error_with_a_hint():
    with pytest.raises(UsageError, match="not dated in the future"):
        choose([info("planted", NOW + timedelta(days=1))])
    with pytest.raises(UsageError, match="archives of host hv2 exist: give --host"):
        choose([info("theirs", NOW, host="hv2")])
    with pytest.raises(UsageError, match="no archive of domain 'web'"):
        choose([info("db", NOW, domain="db")])


def test_naive_times_are_utc():
    kept, warnings = split_future([info("naive", "2026-12-01T12:04:00")], NOW)
    assert [a.name for a in kept] == ["naive"] and warnings == []


def test_explicit_archive_of_another_host_is_refused_unless_host_names_it():
    archives = [info("web-1", NOW, "hv1"), info("web-2", NOW, "hv2")]
    assert check_explicit(archives, "web-1", domain="web", host="hv1", repository="main").name == "web-1"
    with pytest.raises(UsageError, match="made on host hv2, not 'hv1'; give --host hv2"):
        check_explicit(archives, "web-2", domain="web", host="hv1", repository="main")
    assert check_explicit(archives, "web-2", domain="web", host="hv2", repository="main").host == "hv2"
    with pytest.raises(UsageError, match="no kvm-borg archive"):
        check_explicit(archives, "web-3", domain="web", host="hv1", repository="main")
    with pytest.raises(UsageError, match="holds domain 'web', not 'db'"):
        check_explicit(archives, "web-1", domain="db", host="hv1", repository="main")
