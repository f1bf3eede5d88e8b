"""actions.archive_select: the archive choice applied to a backend (a stand-in object: no repository needed
for the decisions; the real borg and restic listings are exercised in tests/test_hostile_archives_xml.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from kvm_borg.actions import archive_select
from kvm_borg.errors import UsageError
from kvm_borg.models import ArchiveInfo

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


class Listing:
    """A backend's listing as the choice sees it."""

    def __init__(self, archives, host=None, hosts=None):
        self.name = "main"
        self.archives = archives
        self.repository = {"hosts": hosts} if hosts is not None else {}
        if host is not None:  # restic-like
            self.host = host
            self.list_hosts = [host]

    def list_archives(self, domain=None):
        hosts = getattr(self, "list_hosts", None)  # restic lists only these hosts' snapshots
        return [a for a in self.archives if (domain is None or a.domain == domain)
                and (hosts is None or a.host in hosts)]


def info(name, when, host):
    return ArchiveInfo(name=name, domain="web", time=when.isoformat(), repository="main", host=host)


SETTINGS = SimpleNamespace(hostname="hv1")


def test_latest_is_this_hosts_and_not_future_dated():
    backend = Listing([info("mine", NOW - timedelta(hours=1), "hv1"), info("planted", NOW + timedelta(days=9), "hv1"),
                       info("theirs", NOW, "hv2")])
    chosen = archive_select.choose(backend, SETTINGS, "web", "latest", None, now=NOW)
    assert (chosen.name, chosen.host) == ("mine", "hv1") and "planted" in chosen.warnings[0]


def test_host_option_widens_restics_host_filter_to_that_host():
    backend = Listing([info("theirs", NOW, "hv2")], host="hv1")
    chosen = archive_select.choose(backend, SETTINGS, "web", None, "hv2", now=NOW)
    assert chosen.name == "theirs" and backend.list_hosts == ["hv2"]


def test_star_is_only_for_listing():
    backend = Listing([], host="hv1")
    assert archive_select.host_for(backend, SETTINGS, "*", any_allowed=True) == "*" and backend.list_hosts is None
    with pytest.raises(UsageError, match="only lists"):
        archive_select.host_for(backend, SETTINGS, "*")


def test_meta_json_of_another_host_is_refused():
    chosen = archive_select.Chosen("web-1", "hv1")
    archive_select.check_meta_host({"host": "hv1"}, chosen, "web-1")
    archive_select.check_meta_host({}, chosen, "web-1")  # hand-made archives without a host: their paths decide
    with pytest.raises(UsageError, match="made on host 'hv2', not 'hv1'; give --host hv2"):
        archive_select.check_meta_host({"host": "hv2"}, chosen, "web-1")


def test_explicit_archive_of_another_host_in_the_listing_is_refused_unless_host_names_it():
    backend = Listing([info("web-2", NOW, "hv2")])
    with pytest.raises(UsageError, match="made on host hv2, not 'hv1'"):
        archive_select.choose(backend, SETTINGS, "web", "web-2", None, now=NOW)
    assert archive_select.choose(backend, SETTINGS, "web", "web-2", "hv2", now=NOW).name == "web-2"
    # not a listed kvm-borg archive (e.g. borgmatic's): left to check_meta_host
    assert archive_select.choose(backend, SETTINGS, "web", "borgmatic-1", None, now=NOW).name == "borgmatic-1"


def test_explicit_archive_hidden_by_restics_host_filter_is_refused_by_name():
    backend = Listing([info("web-2", NOW, "hv2")], host="hv1")
    with pytest.raises(UsageError, match="made on host hv2, not 'hv1'; give --host hv2"):
        archive_select.choose(backend, SETTINGS, "web", "web-2", None, now=NOW)
    assert backend.list_hosts == ["hv1"]  # the filter is back for the reads that follow
