"""Reading borg's output: `list --json-lines` items, `create --json` statistics, `--version`, foreign archives."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from kvm_borg.backends.borg.output import (
    entry_kind,
    is_foreign,
    parse_create_stats,
    parse_files_tar,
    parse_items,
    parse_version,
)


def test_items_are_read_line_by_line_skipping_blank_lines():
    stdout = '{"path": "etc/meta.json", "type": "-"}\n\n{"path": "var/lib/vda.qcow2", "type": "-"}\n'
    assert [item["path"] for item in parse_items(stdout)] == ["etc/meta.json", "var/lib/vda.qcow2"]


@pytest.mark.parametrize("line", ["not json", '["path"]', '{"type": "-"}'])
def test_an_unreadable_item_line_is_a_value_error(line):
    with pytest.raises(ValueError):
        parse_items('{"path": "a", "type": "-"}\n' + line + "\n")


@pytest.mark.parametrize("item, kind", [
    ({"type": "-"}, "file"), ({"type": "d"}, "dir"), ({"type": "l"}, "symlink"), ({"type": "h"}, "hardlink"),
    ({"type": "b"}, "device"), ({"type": "c"}, "device"), ({"type": "p"}, "fifo"), ({"type": "s"}, "socket"),
    ({"type": "?"}, "other"), ({}, "other"),
    ({"type": "-", "source": "earlier/item"}, "hardlink"),  # borg 1.x: a hard link to an earlier item
])
def test_entry_kind_follows_borgs_type_letter(item, kind):
    assert entry_kind(item) == kind


def test_create_statistics_are_read_or_none():
    stdout = json.dumps({"archive": {"stats": {"original_size": 10, "deduplicated_size": 3, "nfiles": 2}}})
    assert parse_create_stats(stdout) == (10, 3)
    assert parse_create_stats("") is None
    assert parse_create_stats('{"archive": {}}') is None


def test_version_is_read_from_borg_version_output():
    assert parse_version("borg 1.4.5\n") == "1.4.5"
    assert parse_version("borg 2.0.0b14") == "2.0.0b14"
    assert parse_version("no borg here") is None


def test_an_archive_is_foreign_unless_kvm_borg_made_it_for_the_domain():
    ours = {"name": "web-1", "comment": json.dumps({"kvm_borg": 1, "domain": "web"})}
    assert not is_foreign(ours, "web")
    assert is_foreign(ours, "web2")
    assert is_foreign({"name": "web-2", "comment": "made by hand"}, "web")
    assert is_foreign({"name": "web-3"}, "web")


def test_files_borg_could_not_read_are_kept_apart_from_other_warnings():
    from kvm_borg.backends.borg.output import BorgLog

    log = BorgLog()
    for record in (
        {"type": "log_message", "levelname": "WARNING", "msgid": "BackupOSError",
         "message": "/var/lib/kvm-borg/view/u/vda/00000040: read: [Errno 5] Input/output error"},
        {"type": "log_message", "levelname": "WARNING", "msgid": "FileChangedWarning", "message": "/x: file changed"},
        {"type": "log_message", "levelname": "WARNING", "msgid": "BackupPermissionError", "message": "/y: open"},
        {"type": "log_message", "levelname": "WARNING", "msgid": "BackupFileNotFoundError", "message": "/gone: stat"},
    ):
        log.feed(json.dumps(record))
    assert log.unread_files == ["/var/lib/kvm-borg/view/u/vda/00000040: read: [Errno 5] Input/output error",
                                "/y: open"]
    assert len(log.warnings) == 4


def test_the_delete_command_names_one_archive():
    from kvm_borg.backends.borg.commands import make_delete_command

    assert make_delete_command("borg", "/r", "web-20261201T120000Z", lock_wait=5) == (
        "borg", "delete", "--log-json", "--lock-wait", "5", "/r::web-20261201T120000Z")


def _tar(*members) -> bytes:
    """Given (name, bytes) or (name, ("link", tarfile type)), return an uncompressed tar of them, as borg
    export-tar writes one."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.GNU_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.type = content[1]
                info.linkname = "/etc/shadow"
                tar.addfile(info)
    return out.getvalue()


def test_files_tar_gives_the_regular_files_asked_for_and_leaves_out_the_rest():
    data = _tar(("s/meta.json", b'{"kvm_borg": 1}'), ("s/domain.xml", ("link", tarfile.SYMTYPE)), ("s/other", b"x"),
                ("s/domain-live.xml", ("link", tarfile.LNKTYPE)))
    assert parse_files_tar(data, ["s/meta.json", "s/domain.xml", "s/domain-live.xml"], 100, "a") == {
        "s/meta.json": b'{"kvm_borg": 1}'}


def test_files_tar_refuses_a_file_over_the_limit_and_an_unreadable_tar():
    with pytest.raises(ValueError, match="s/meta.json in a is larger than 4 bytes"):
        parse_files_tar(_tar(("s/meta.json", b"12345")), ["s/meta.json"], 4, "a")
    with pytest.raises(ValueError, match="unreadable tar"):
        parse_files_tar(b"\x01" * 700, ["s/meta.json"], 4, "a")
