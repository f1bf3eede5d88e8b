"""The borg argv builders: pure functions, tested without running borg."""

from __future__ import annotations

import re

import pytest
from borg.helpers.parseformat import replace_placeholders
from borg.shellpattern import translate

from kvm_borg.backends.borg.commands import (
    archive_glob,
    archive_location,
    escape_placeholders,
    make_check_command,
    make_create_command,
    make_export_tar_command,
    make_export_files_command,
    make_extract_command,
    make_info_command,
    make_init_command,
    make_list_archive_paths_command,
    make_list_command,
    make_mount_command,
    make_umount_command,
    make_version_command,
)

CREATE_DEFAULTS = dict(
    compression="lz4",
    chunker_params="fixed,4194304",
    read_special=False,
    sparse=True,
    comment=None,
    progress=False,
    lock_wait=60,
)


def borg_matches(glob: str, name: str) -> bool:
    """Given a glob as we pass it to borg, return whether borg would match `name` (borg's own code)."""
    return re.match(translate(replace_placeholders(escape_placeholders(glob))), name) is not None


def test_init_makes_parent_dirs_by_default():
    assert make_init_command("borg", "/srv/repo", "repokey-blake2") == (
        "borg", "init", "--encryption", "repokey-blake2", "--make-parent-dirs", "--log-json", "/srv/repo",
    )


def test_create_passes_paths_unchanged_after_the_archive():
    argv = make_create_command("borg", "/r", "web-20260101T000000Z", ["/a/meta.json", "/b/vda.qcow2"], **CREATE_DEFAULTS)
    assert argv[:3] == ("borg", "create", "--json")
    assert argv[-3:] == ("/r::web-20260101T000000Z", "/a/meta.json", "/b/vda.qcow2")
    assert ("--compression", "lz4") == argv[argv.index("--compression"):][:2]
    assert ("--chunker-params", "fixed,4194304") == argv[argv.index("--chunker-params"):][:2]
    assert ("--lock-wait", "60") == argv[argv.index("--lock-wait"):][:2]
    assert "--log-json" in argv
    assert "--files-cache" not in argv  # borg's default mode keeps unchanged images unread


def test_create_sparse_only_with_fixed_chunker():
    fixed = make_create_command("borg", "/r", "a", ["/x"], **CREATE_DEFAULTS)
    buzhash = make_create_command("borg", "/r", "a", ["/x"], **{**CREATE_DEFAULTS, "chunker_params": "buzhash,19,23,21,4095"})
    not_asked = make_create_command("borg", "/r", "a", ["/x"], **{**CREATE_DEFAULTS, "sparse": False})
    assert "--sparse" in fixed
    assert "--sparse" not in buzhash
    assert "--sparse" not in not_asked


def test_create_read_special_only_when_asked():
    assert "--read-special" not in make_create_command("borg", "/r", "a", ["/x"], **CREATE_DEFAULTS)
    assert "--read-special" in make_create_command("borg", "/r", "a", ["/dev/vg/lv"], **{**CREATE_DEFAULTS, "read_special": True})


def test_create_progress_flag():
    assert "--progress" not in make_create_command("borg", "/r", "a", ["/x"], **CREATE_DEFAULTS)
    assert "--progress" in make_create_command("borg", "/r", "a", ["/x"], **{**CREATE_DEFAULTS, "progress": True})


def test_create_comment_survives_borg_placeholder_expansion():
    comment = '{"kvm_borg": 1, "domain": "web", "disks": ["vda"], "host": "h1"}'
    argv = make_create_command("borg", "/r", "a", ["/x"], **{**CREATE_DEFAULTS, "comment": comment})
    passed = argv[argv.index("--comment") + 1]
    assert replace_placeholders(passed) == comment


def test_create_without_comment_has_no_comment_option():
    assert "--comment" not in make_create_command("borg", "/r", "a", ["/x"], **CREATE_DEFAULTS)


def test_location_with_braces_survives_placeholder_expansion():
    assert replace_placeholders(archive_location("/srv/{odd}", "dom{1}-20260101T000000Z")) == (
        "/srv/{odd}::dom{1}-20260101T000000Z"
    )


def test_list_and_info_commands():
    assert make_list_command("borg", "/r") == ("borg", "list", "--json", "--log-json", "/r")
    assert make_list_command("borg", "/r", last=1, lock_wait=5) == (
        "borg", "list", "--json", "--log-json", "--lock-wait", "5", "--last", "1", "/r",
    )
    assert make_info_command("borg", "/r", glob="web-*") == (
        "borg", "info", "--json", "--log-json", "--glob-archives", "web-*", "/r",
    )


def test_list_archive_paths_command():
    assert make_list_archive_paths_command("borg", "ssh://u@h:22/r", "a-1") == (
        "borg", "list", "--json-lines", "--log-json", "ssh://u@h:22/r::a-1",
    )


def test_extract_command_names_exact_paths_sparse():
    assert make_extract_command("borg", "/r", "a", ["var/lib/x.qcow2"]) == (
        "borg", "extract", "--log-json", "--sparse", "/r::a", "pf:var/lib/x.qcow2",
    )
    to_stdout = make_extract_command("borg", "/r", "a", ["x"], stdout=True)
    assert "--stdout" in to_stdout and "--sparse" not in to_stdout


def test_plain_extract_applies_none_of_the_archives_flags_acls_xattrs_or_names():
    assert make_extract_command("borg", "/r", "a", ["var/lib/x.raw"], plain=True) == (
        "borg", "extract", "--log-json", "--sparse", "--noflags", "--noacls", "--noxattrs", "--numeric-ids",
        "/r::a", "pf:var/lib/x.raw",
    )


def test_export_files_command_names_each_file_exactly_and_writes_the_tar_to_stdout():
    assert make_export_files_command("borg", "/r{x}", "a", ["s/meta.json", "s/domain.xml"], lock_wait=3) == (
        "borg", "export-tar", "--log-json", "--lock-wait", "3", "/r{{x}}::a", "-", "pf:s/meta.json", "pf:s/domain.xml",
    )


def test_check_command():
    assert make_check_command("borg", "/r", verify_data=True, lock_wait=5) == (
        "borg", "check", "--log-json", "--lock-wait", "5", "--verify-data", "/r",
    )
    assert make_check_command("borg", "/r", progress=True) == ("borg", "check", "--log-json", "--progress", "/r")


def test_archive_glob_matches_the_domains_archives():
    assert borg_matches(archive_glob("web"), "web-20261126T121638Z")


@pytest.mark.parametrize(
    "name",
    [
        "web-2-20261126T121638Z",  # another domain whose name starts with ours
        "web-20261126T121638",  # no Z
        "web-20261126T121638Z.checkpoint",
        "web-",
        "webx-20261126T121638Z",
        "foreign-1",
    ],
)
def test_archive_glob_rejects_other_names(name):
    assert not borg_matches(archive_glob("web"), name)


def test_archive_glob_of_a_domain_with_a_dash_and_digits():
    assert borg_matches(archive_glob("web-2"), "web-2-20261126T121638Z")
    assert not borg_matches(archive_glob("web-2"), "web-20261126T121638Z")


# Borg's glob escapes "[" as "[[]", which Python's re accepts with a FutureWarning.
@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@pytest.mark.parametrize("domain", ["a*b", "a?b", "a[b]c", "x]y", "odd{name}", "a.b"])
def test_archive_glob_matches_metacharacters_literally(domain):
    glob = archive_glob(domain)
    assert borg_matches(glob, f"{domain}-20261126T121638Z")
    assert not borg_matches(glob, f"{domain.replace(domain[1], 'Q', 1)}-20261126T121638Z")


def test_archive_glob_star_does_not_match_a_longer_name():
    assert not borg_matches(archive_glob("a*"), "abc-20261126T121638Z")


def test_archive_glob_without_domain_matches_any_timestamped_archive():
    assert borg_matches(archive_glob(None), "anything-20261126T121638Z")
    assert not borg_matches(archive_glob(None), "foreign-1")


def test_mount_command_mounts_one_archive_read_only():
    assert make_mount_command("borg", "/r/{x}", "web-1", "/mnt/a", lock_wait=5) == (
        "borg", "mount", "--log-json", "--lock-wait", "5", "-o", "ro", "/r/{{x}}::web-1", "/mnt/a")


def test_umount_and_version_commands():
    assert make_umount_command("borg", "/mnt/a") == ("borg", "umount", "--log-json", "/mnt/a")
    assert make_version_command("/venv/bin/borg") == ("/venv/bin/borg", "--version")


def test_export_tar_command_streams_one_directory_and_what_lies_below_it_uncompressed():
    assert make_export_tar_command("borg", "/r", "a", "var/lib/kvm-borg/view/u/vda", lock_wait=5) == (
        "borg", "export-tar", "--log-json", "--lock-wait", "5", "/r::a", "-", "pp:var/lib/kvm-borg/view/u/vda")


def test_create_reads_no_flags_acls_or_xattrs_of_plain_files_only():
    plain = make_create_command("borg", "/r", "a", ["/view/vda"], **{**CREATE_DEFAULTS, "plain_files": True})
    images = make_create_command("borg", "/r", "a", ["/x"], **CREATE_DEFAULTS)
    assert {"--noflags", "--noacls", "--noxattrs"} <= set(plain)
    assert not {"--noflags", "--noacls", "--noxattrs"} & set(images)
    assert plain[-1] == "/view/vda"  # options stay before the archive and the paths
