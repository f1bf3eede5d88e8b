"""restic argv builders, tags, version features, sftp command, output parsing: no restic run."""

from __future__ import annotations

import json
import os
import shlex

import pytest

from kvm_borg.backends.restic import archives
from kvm_borg.backends.restic import commands as rc
from kvm_borg.backends.restic.archives import ArchiveParts, archive_info_from, group_archives, utc_iso
from kvm_borg.backends.restic.output import BackupOutput, ResticLog, parse_ls_nodes
from kvm_borg.backends.restic.repository import ResticRepository
from kvm_borg.errors import ConfigError
from kvm_borg.sparse import SparseWriter

COMMENT = json.dumps({"kvm_borg": 1, "domain": "web, 1", "uuid": "u", "disks": ["vda", "vdb"], "host": "hv1"})


def test_version_is_read_from_restic_version_output():
    assert rc.parse_version("restic 0.14.0 compiled with go1.19.8 on linux/amd64") == (0, 14, 0)
    assert rc.parse_version("restic 0.17.3 compiled with go1.23.3 on linux/amd64\n") == (0, 17, 3)
    assert rc.parse_version("something else") is None


def test_features_follow_the_version():
    debian = rc.Features((0, 14, 0))
    assert not debian.restore_sparse and not debian.exit_codes
    assert rc.Features((0, 15, 1)).restore_sparse and not rc.Features((0, 15, 1)).exit_codes
    newer = rc.Features((0, 17, 0))
    assert newer.restore_sparse and newer.exit_codes


@pytest.mark.parametrize("value", ["web01", "web, 1", "Grüße aus Köln", " lead", "trail ", "100%", "a\nb", ",,"])
def test_tag_values_survive_restics_comma_split_and_trim(value):
    escaped = archives.escape_tag_value(value)
    assert "," not in escaped and escaped == escaped.strip() and "\n" not in escaped
    assert archives.unescape_tag_value(escaped) == value


def test_readable_names_stay_readable_in_tags():
    assert archives.escape_tag_value("Grüße aus Köln") == "Grüße aus Köln"
    assert archives.escape_tag_value("web, 1") == "web%2C 1"


def test_archive_tags_mark_the_part_and_carry_the_comment():
    tags = archives.archive_tags("web, 1", "web, 1-20260101T000000Z", COMMENT, archives.PART_MAIN, size=42)
    assert tags[0] == "kvm-borg" and all("," not in t for t in tags)
    values = archives.parse_tags(tags)
    assert values["domain"] == "web, 1" and values["archive"] == "web, 1-20260101T000000Z"
    assert values["part"] == "main" and values["size"] == "42"
    assert archives.decode_comment(values["comment"]) == COMMENT
    assert "size" not in archives.parse_tags(archives.archive_tags("d", "a", COMMENT, archives.PART_DEVICE))


def test_backup_argv_has_tags_host_time_and_paths_after_double_dash():
    argv = rc.make_backup_command("restic", ["/a b", "-odd"], host="hv1", tags=["kvm-borg", "domain=x"],
                                  time="2026-01-01 00:00:00", compression="max")
    assert argv[:3] == ("restic", "backup", "--json")
    assert ("--compression", "max") == argv[argv.index("--compression"):argv.index("--compression") + 2]
    assert argv[argv.index("--host") + 1] == "hv1"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--tag"] == ["kvm-borg", "domain=x"]
    assert argv[argv.index("--time") + 1] == "2026-01-01 00:00:00"
    assert argv[-3:] == ("--", "/a b", "-odd")


def test_stdin_backup_argv_names_the_device_and_takes_no_paths():
    argv = rc.make_backup_command("restic", [], host="h", tags=["kvm-borg"], time=None,
                                  stdin_filename="/dev/vg/lv")
    assert argv[-3:] == ("--stdin", "--stdin-filename", "/dev/vg/lv") and "--" not in argv
    assert "--compression" not in argv and "--time" not in argv
    with pytest.raises(ValueError):
        rc.make_backup_command("restic", ["/x"], host="h", tags=[], time=None, stdin_filename="/dev/x")


def test_no_argv_holds_the_repository_or_a_password():
    argvs = [
        rc.make_init_command("restic"), rc.make_cat_config_command("restic"),
        rc.make_snapshots_command("restic", tags=["kvm-borg"], hosts=["a", "b"]),
        rc.make_ls_command("restic", "abc"), rc.make_dump_command("restic", "abc", "/x"),
        rc.make_restore_command("restic", "abc", "/t", "/x", sparse=True),
        rc.make_forget_command("restic", ["abc"]),
    ]
    for argv in argvs:
        assert not any(a in ("-r", "--repo", "-p", "--password-file", "--password-command") for a in argv)


def test_snapshots_argv_requires_every_tag_and_repeats_hosts():
    argv = rc.make_snapshots_command("restic", tags=["kvm-borg", "domain=a%2Cb"], hosts=["hv1", "hv2"])
    assert argv[argv.index("--tag") + 1] == "kvm-borg,domain=a%2Cb"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--host"] == ["hv1", "hv2"]
    assert "--host" not in rc.make_snapshots_command("restic", tags=["kvm-borg"], hosts=None)


def test_restore_argv_includes_exactly_one_path_and_sparse_only_when_asked():
    argv = rc.make_restore_command("restic", "abc", "/t", "/img/[x]*.qcow2", sparse=True)
    assert argv[argv.index("--include") + 1] == r"/img/\[x\]\*.qcow2"
    assert "--sparse" in argv and argv[-1] == "abc"
    assert "--sparse" not in rc.make_restore_command("restic", "abc", "/t", "/x", sparse=False)


def test_restic_time_reads_the_run_timestamp():
    assert rc.restic_time("20261126T121638Z") == "2026-11-26 12:16:38"
    with pytest.raises(ValueError):
        rc.restic_time("yesterday")


def test_environment_carries_repository_and_password_source_only():
    inherited = {"PATH": "/bin", "RESTIC_PASSWORD": "leak", "RESTIC_REPOSITORY": "/elsewhere", "HOME": "/root"}
    env = rc.make_environment(inherited, url="sftp:u@h:/r", passphrase_file="/etc/pw", passphrase_command=None)
    assert env["RESTIC_REPOSITORY"] == "sftp:u@h:/r" and env["RESTIC_PASSWORD_FILE"] == "/etc/pw"
    assert "RESTIC_PASSWORD" not in env and env["TZ"] == "UTC" and env["PATH"] == "/bin"
    env = rc.make_environment(inherited, url="/r", passphrase_file=None, passphrase_command="pass show restic")
    assert env["RESTIC_PASSWORD_COMMAND"] == "pass show restic" and "RESTIC_PASSWORD_FILE" not in env


@pytest.mark.parametrize("url, target", [
    ("sftp:backup@server:/srv/restic", ("backup", "server", None)),
    ("sftp:server:/srv/restic", (None, "server", None)),
    ("sftp://backup@127.0.0.1:2222//srv/restic", ("backup", "127.0.0.1", 2222)),
    ("/srv/restic", None),
    ("rest:https://server:8000/hv1", None),
])
def test_sftp_targets_are_read_from_both_url_forms(url, target):
    assert rc.sftp_target(url) == target


def test_sftp_command_puts_batch_mode_first_and_the_target_last():
    command = rc.sftp_command("sftp://backup@127.0.0.1:2222//srv/r",
                              "ssh -i '/etc/kvm-borg/id key' -o UserKnownHostsFile=/etc/kvm-borg/known_hosts")
    argv = shlex.split(command)
    assert argv[:3] == ["ssh", "-o", "BatchMode=yes"]
    assert "/etc/kvm-borg/id key" in argv
    assert argv[-5:] == ["-p", "2222", "backup@127.0.0.1", "-s", "sftp"]
    assert rc.sftp_command("/local/path", "ssh") is None


def _snapshot(id_, part, archive="web, 1-20260101T000000Z", host="hv1", **extra):
    return {"id": id_, "time": "2026-01-01T00:00:00.123456789Z", "hostname": host, "paths": ["/x"],
            "tags": list(archives.archive_tags("web, 1", archive, COMMENT, part, size=10 if part == "main" else None)),
            **extra}


def test_an_archive_is_listed_only_once_its_main_snapshot_exists():
    groups = group_archives([
        _snapshot("d1", "device"), _snapshot("m1", "main"),
        _snapshot("d2", "device", archive="web, 1-20260102T000000Z"),  # interrupted run: no main part
        {"id": "foreign", "tags": ["daily"], "hostname": "hv1", "time": "2026-01-01T00:00:00Z"},
    ])
    assert set(groups) == {("hv1", "web, 1-20260101T000000Z"), ("hv1", "web, 1-20260102T000000Z")}
    infos = [archive_info_from(parts, "repo") for parts in groups.values()]
    [info] = [i for i in infos if i is not None]
    assert info.name == "web, 1-20260101T000000Z" and info.domain == "web, 1" and info.disks == ("vda", "vdb")
    assert info.time == "2026-01-01T00:00:00+00:00" and info.original_size == 10 and info.host == "hv1"
    assert info.deduplicated_size is None  # restic 0.14 keeps no statistics in snapshots
    assert archive_info_from(groups[("hv1", "web, 1-20260101T000000Z")], "repo", domain="web") is None


def test_deduplicated_size_comes_from_snapshot_summaries_when_restic_keeps_them():
    parts = ArchiveParts("a", "hv1", main=_snapshot("m", "main", summary={"data_added": 5}),
                         devices=[_snapshot("d", "device", summary={"data_added": 7})])
    assert archive_info_from(parts, "repo").deduplicated_size == 12


def test_a_device_part_holds_its_device_path_and_the_main_snapshot_the_rest():
    device = dict(_snapshot("d", "device"), paths=["/dev/vg/web"])
    parts = ArchiveParts("a", "hv1", main=dict(_snapshot("m", "main"), paths=["/var/lib/web.qcow2"]), devices=[device])
    assert parts.snapshot_holding("/dev/vg/web")["id"] == "d"
    assert parts.snapshot_holding("/var/lib/web.qcow2")["id"] == "m"
    assert parts.snapshot_holding("/etc/meta.json")["id"] == "m"


def test_ls_output_yields_only_the_nodes():
    stdout = "\n".join(json.dumps(record) for record in (
        {"struct_type": "snapshot", "id": "m", "paths": ["/"]},
        {"struct_type": "node", "path": "/var", "type": "dir"},
        {"struct_type": "node", "path": "/var/lib/web.qcow2", "type": "file"},
        {"struct_type": "node", "type": "file"},  # no path: not one of ours to list
    ))
    assert [node["path"] for node in parse_ls_nodes(stdout)] == ["/var", "/var/lib/web.qcow2"]
    with pytest.raises(ValueError):
        parse_ls_nodes(stdout + "\nnot json")


def test_backup_output_reports_progress_and_keeps_the_summary_across_chunk_boundaries():
    seen = []
    output = BackupOutput(seen.append)
    text = (b'{"message_type":"status","percent_done":0.5,"bytes_done":100}\n'
            b'{"message_type":"error","error":{"message":"permission denied"},"item":"/x"}\n'
            b'{"message_type":"summary","snapshot_id":"abc","data_added":3,"total_bytes_processed":200}\n')
    for i in range(0, len(text), 7):
        output.feed(text[i:i + 7])
    output.close()
    assert seen == [100] and output.summary["snapshot_id"] == "abc"
    assert output.errors == ["/x: permission denied"]


def test_restic_log_names_the_fatal_reason_and_sshs():
    log = ResticLog()
    for line in ["subprocess ssh: ssh: connect to host 127.0.0.1 port 1: Connection refused",
                 "Fatal: unable to open repo at sftp:u@127.0.0.1:/r: unable to start the sftp session, error: EOF"]:
        log.feed(line)
    message = log.error_message(1)
    assert message.startswith("unable to open repo") and "Connection refused" in message and "\n" not in message
    missing = ResticLog()
    for line in ["Fatal: unable to open config file: stat /r/config: no such file or directory",
                 "Is there a repository at the following location?", "/r"]:
        missing.feed(line)
    assert "kvm-borg init" in missing.error_message(1)


def test_utc_iso_drops_nanoseconds_and_converts_offsets():
    assert utc_iso("2026-01-01T01:02:03.123456789+01:00") == "2026-01-01T00:02:03+00:00"
    assert utc_iso("2026-01-01T00:00:00Z") == "2026-01-01T00:00:00+00:00"


def test_sparse_writer_leaves_zero_blocks_as_holes(tmp_path):
    path = tmp_path / "out"
    data = b"\0" * (1 << 20) + b"x" * 100 + b"\0" * 5000 + b"y" + b"\0" * (3 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    writer = SparseWriter(fd)
    for i in range(0, len(data), 65000):  # chunks not aligned with the blocks
        writer.write(data[i:i + 65000])
    writer.close()
    os.close(fd)
    assert path.read_bytes() == data
    assert os.stat(path).st_blocks * 512 < 512 * 1024  # mostly holes


def test_preflight_refuses_a_missing_restic_binary_naming_the_key():
    settings = type("S", (), {"hostname": "hv1", "restic_binary": "/nonexistent/restic", "progress": False})()
    backend = ResticRepository({"name": "r", "type": "restic", "url": "/r"}, settings)
    with pytest.raises(Exception, match="restic_binary"):
        backend.preflight()


def test_config_validates_restic_compression_and_hosts_naming_the_key():
    from kvm_borg.config import validate

    base = {"name": "r", "type": "restic", "url": "/x", "passphrase_file": "/p"}
    with pytest.raises(ConfigError, match=r"repositories\[0\]\.compression: expected one of auto, off, max"):
        validate({"repositories": [{**base, "compression": "zstd"}]})
    with pytest.raises(ConfigError, match=r"repositories\[0\]\.hosts"):
        validate({"repositories": [{**base, "hosts": "hv1"}]})
    [repo] = validate({"repositories": [{**base, "hosts": ["hv1", "hv2"], "host": "hv1"}]})["repositories"]
    assert repo["hosts"] == ["hv1", "hv2"] and repo["compression"] is None


def test_a_lost_ssh_reason_is_asked_of_ssh_again(tmp_path):
    """restic may exit before passing on ssh's complaint; the backend then runs the ssh command once more."""
    fake_ssh = tmp_path / "ssh"
    fake_ssh.write_text("#!/bin/sh\necho 'Host key verification failed.' >&2\nexit 255\n")
    fake_ssh.chmod(0o755)
    settings = type("S", (), {"hostname": "hv1", "restic_binary": None, "progress": False})()
    backend = ResticRepository({"name": "r", "type": "restic", "url": "sftp:u@h:/r", "ssh_command": str(fake_ssh)},
                               settings)
    log = ResticLog()
    log.feed("Fatal: unable to open repository at sftp:u@h:/r: unable to start the sftp session, error: EOF")
    assert log.lost_ssh_reason()
    result = type("R", (), {"returncode": 1})()
    message = backend._reason(log, result)
    assert message.endswith("(ssh: Host key verification failed.)") and "\n" not in message
    log.feed("subprocess ssh: Host key verification failed.")
    assert not log.lost_ssh_reason()


def test_backend_takes_its_host_location_and_ssh_options_from_the_config():
    settings = type("S", (), {"hostname": "hv1", "restic_binary": None, "progress": False})()
    backend = ResticRepository({"name": "r", "type": "restic", "url": "sftp:u@h:/r", "hosts": ["*"]}, settings)
    assert backend.list_hosts is None and backend.host == "hv1" and backend.location == "sftp:u@h:/r"
    assert backend.options[0].startswith("sftp.command=ssh -o BatchMode=yes")
    assert backend.archive_path("var/lib/x.qcow2") == "/var/lib/x.qcow2"
