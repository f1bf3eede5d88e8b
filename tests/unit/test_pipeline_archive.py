"""pipeline.archive: the archive choice applied to a backend, and reading meta.json and the domain XML back
(stand-in backends: no repository needed for the decisions; the real borg and restic listings and
reads are exercised in tests/test_hostile_archives*.py and tests/test_restore.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from kvm_borg.errors import UsageError
from kvm_borg.models import ArchiveInfo, BackendBase
from kvm_borg.pipeline import archive as archive_select

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


class Listing:
    """A backend's listing as the choice sees it: borg-like (every host's archives listed, no host of its
    own) or, given `host`, restic-like (only the snapshots of the hosts in `list_hosts` listed)."""

    name = "main"
    host = None
    list_hosts = None

    def __init__(self, archives, host=None, hosts=None):
        self.archives = archives
        self.repository = {"hosts": hosts} if hosts is not None else {}
        self.restic_like = host is not None
        if host is not None:
            self.host = host
            self.list_hosts = [host]

    def list_archives(self, domain=None):
        hosts = self.list_hosts if self.restic_like else None  # borg ignores the host filter
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


class Stored(BackendBase):
    """A third-party backend written against BackendBase: it has only list_paths and extract_file, so
    list_entries, stream_file and mount are BackendBase's."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__({"name": "plain", "type": "plainfs", "path": "/srv/plain"}, SETTINGS)
        self.files = files

    def list_paths(self, archive):
        return ["/" + path for path in self.files]

    def extract_file(self, archive, archive_path, destination):
        destination.write_bytes(self.files[archive_path])


def test_backend_base_reads_through_extract_file_and_names_every_path_unknown():
    backend = Stored({"a/meta.json": b"{}", "a/disk.img": b"x" * 10})
    assert archive_select.archive_entries(backend, "arch") == {"a/meta.json": "unknown", "a/disk.img": "unknown"}
    assert archive_select.read_bytes(backend, "arch", "a/disk.img") == b"x" * 10
    with pytest.raises(UsageError, match="larger than 4 bytes"):
        archive_select.read_bytes(backend, "arch", "a/disk.img", limit=4)


def test_a_meta_json_of_unknown_kind_is_refused_not_read():
    backend = Stored({"var/lib/kvm-borg/staging/web/meta.json": b'{"kvm_borg": 1}'})
    with pytest.raises(UsageError, match="is a unknown, not a regular file; refused"):
        archive_select.read_archive(backend, "arch", "web")


def test_backend_base_refuses_mount_and_passthrough_naming_the_repository_and_type():
    backend = Stored({})
    assert backend.location == "/srv/plain" and backend.host is None and backend.list_hosts is None
    assert backend.version() == "?"
    backend.preflight()
    with pytest.raises(UsageError, match=r"repository 'plain' \(plainfs\) cannot mount archives"):
        backend.mount("arch", "/mnt")
    with pytest.raises(UsageError, match=r"repository 'plain' \(plainfs\) cannot run plainfs by hand"):
        backend.command_environment()


class Entries(Stored):
    def list_entries(self, archive):
        return {"/" + path: kind for path, kind in self.kinds.items()}


def test_domain_xml_must_be_a_regular_utf8_file_of_the_archive():
    meta = {"files": {"domain_xml": "s/web/domain.xml"}}
    backend = Entries({"s/web/domain.xml": "<domain/>".encode()})
    backend.kinds = {"s/web/domain.xml": "file"}
    assert archive_select.read_domain_xml(backend, "arch", meta, {"s/web/domain.xml": "file"}) == \
        ("s/web/domain.xml", "<domain/>")
    with pytest.raises(UsageError, match="lacks the domain XML"):
        archive_select.read_domain_xml(backend, "arch", meta, {})
    with pytest.raises(UsageError, match="as a symlink, not a regular file"):
        archive_select.read_domain_xml(backend, "arch", meta, {"s/web/domain.xml": "symlink"})
    backend.files["s/web/domain.xml"] = b"\xff<domain/>"
    with pytest.raises(UsageError, match="is not UTF-8"):
        archive_select.read_domain_xml(backend, "arch", meta, {"s/web/domain.xml": "file"})


class CountedReads(Entries):
    """Counts the backend calls that read files, and answers read_files itself as borg does: in one call."""

    def __init__(self, files, kinds, withheld=()):
        super().__init__(files)
        self.kinds, self.calls, self.withheld = kinds, [], withheld

    def read_files(self, archive, archive_paths, limit):
        self.calls.append(list(archive_paths))
        return {p: self.files[p] for p in archive_paths if p not in self.withheld}

    def stream_file(self, archive, archive_path, write):
        self.calls.append(archive_path)
        write(self.files[archive_path])


META = {"kvm_borg": 1, "archive": "web-1", "created": "2026-12-01T00:00:00+00:00", "host": "hv1",
        "domain": {"name": "web", "uuid": "8a1c9f7e-2b3d-4c5e-9f60-7182a3b4c5d6", "running": False},
        "disks": [], "files": {"domain_xml": "s/web/domain.xml"}}


def test_meta_json_and_both_xmls_are_read_in_one_call_and_the_xml_is_not_read_again():
    import json
    files = {"s/web/meta.json": json.dumps(META).encode(), "s/web/domain.xml": b"<domain/>",
             "s/web/domain-live.xml": b"<domain id='1'/>", "s/web/vda.raw": b"x"}
    backend = CountedReads(files, {p: "file" for p in files})
    read = archive_select.read_archive_files(backend, "web-1", "web")
    assert backend.calls == [["s/web/meta.json", "s/web/domain.xml", "s/web/domain-live.xml"]]  # never the image
    assert read.meta["domain"]["name"] == "web" and read.small["s/web/domain-live.xml"] == b"<domain id='1'/>"
    assert archive_select.read_domain_xml(backend, "web-1", read.meta, read.entries, read.small) == \
        ("s/web/domain.xml", "<domain/>")
    assert len(backend.calls) == 1


def test_small_files_wanted_are_regular_candidates_and_the_regular_xmls_beside_them():
    entries = {"a/meta.json": "file", "a/domain.xml": "symlink", "a/domain-live.xml": "file",
               "b/meta.json": "symlink", "b/domain.xml": "file", "meta.json": "file", "domain.xml": "file"}
    assert archive_select.small_files_wanted(entries) == ["a/meta.json", "a/domain-live.xml", "meta.json",
                                                          "domain.xml"]


def test_a_meta_json_the_tool_did_not_hand_over_as_a_regular_file_is_refused():
    import json
    backend = CountedReads({"s/web/meta.json": json.dumps(META).encode()}, {"s/web/meta.json": "file"},
                           withheld={"s/web/meta.json"})  # listed as a file, then not a regular tar member
    with pytest.raises(UsageError, match="its meta.json s/web/meta.json is a changed file, not a regular file"):
        archive_select.read_archive(backend, "web-1", "web")
    assert backend.calls == [["s/web/meta.json"]]  # asked for (listed as a file), not handed over


def test_backend_base_reads_small_files_one_by_one_within_the_limit():
    backend = Stored({"a/meta.json": b"{}", "a/domain.xml": b"x" * 10})
    assert backend.read_files("arch", ["a/meta.json", "a/domain.xml"], 10) == {
        "a/meta.json": b"{}", "a/domain.xml": b"x" * 10}
    with pytest.raises(UsageError, match="a/domain.xml in arch is larger than 4 bytes"):
        backend.read_files("arch", ["a/domain.xml"], 4)
