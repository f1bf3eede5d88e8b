"""Every `kvm-borg` verb's arguments, with nothing imported but argparse (so `--help` and `--version` start fast).

Each verb's parser sets `run` to the dotted name `"module:function"` of its `function(ctx, args) -> exit code`;
kvm_borg.cli imports that module only when the verb runs. A verb that needs no configuration also sets
`needs_settings=False` (it gets ctx None).
"""

from __future__ import annotations

import argparse

from kvm_borg import __version__

# Also verify's own defaults (kvm_borg.actions.verify); tests/unit/test_startup_imports.py keeps them equal.
DEFAULT_BOOT_TIMEOUT = 300.0
DEFAULT_ALIVE_SECONDS = 10.0


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 2."""

    def error(self, message):
        self.exit(2, f"kvm-borg: error: {message}\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Return the parser of the `kvm-borg` command line: the global options and every verb; given the
    arguments to parse, only the verb they name when `verb_named` can tell it (building all ~20 verb
    parsers costs ~30 ms of every run's start-up; the one verb's parser is the same either way)."""
    parser = Parser(prog="kvm-borg", description="Back up live libvirt domains into Borg or restic.")
    parser.add_argument("--version", action="version", version=f"kvm-borg {__version__}")
    parser.add_argument("-c", "--config", help="config file (default: $KVM_BORG_CONFIG or /etc/kvm-borg/config.yaml)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    only = verb_named(argv) if argv is not None else None
    for names, add in VERBS.items():
        if only is None or only in names:
            add(subparsers)
    return parser


# Global options without a value, and those that take the next argument as their value.
_FLAGS = {"-v", "-vv", "-vvv", "--verbose", "-q", "--quiet", "--debug"}
_WITH_VALUE = {"-c", "--config"}


def verb_named(argv: list[str]) -> str | None:
    """Given the arguments after `kvm-borg`, return the verb they name when the global options before it
    are plain ones (`-c FILE`, `--config=FILE`, `-v`, `-q`, `--debug`); None when in doubt (any other
    option first, no verb, an unknown word): the whole parser then handles it, errors and help included."""
    known = {name for names in VERBS for name in names}
    arguments = iter(argv)
    for argument in arguments:
        if argument in _FLAGS or argument.startswith("--config="):
            continue
        if argument in _WITH_VALUE:
            next(arguments, None)
            continue
        return argument if argument in known else None
    return None


def add_backup(subparsers) -> None:
    """Register `kvm-borg backup`."""
    parser = subparsers.add_parser("backup", help="back up domains")
    parser.add_argument("domains", nargs="*", metavar="DOMAIN")
    parser.add_argument("--all", action="store_true", help="every domain the config's `domains:` selects")
    parser.add_argument("--repo", action="append", metavar="NAME", help="only this repository (repeatable)")
    parser.add_argument("--exclude-disk", action="append", default=[], metavar="TARGET",
                        help="leave this disk target out (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a TTY")
    parser.add_argument("--full", action="store_true",
                        help="read every segment this run (bitmap method); a deliberate full re-read")
    parser.add_argument("--jobs", metavar="N",
                        help="back up N domains at once (1 to 64; default: the config's `jobs`, 1)")
    parser.set_defaults(run="kvm_borg.actions.backup:run_from_args")


def add_recover(subparsers) -> None:
    """Register `kvm-borg recover`."""
    parser = subparsers.add_parser("recover", help="merge back overlays left by interrupted runs")
    parser.add_argument("domains", nargs="*", metavar="DOMAIN")
    parser.add_argument("--all", action="store_true", help="every journal entry (the default without names)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run="kvm_borg.actions.recover:run_from_args")


def add_list_and_init(subparsers) -> None:
    """Register `kvm-borg list` and `kvm-borg init`."""
    listing = subparsers.add_parser("list", help="list archives")
    listing.add_argument("domain", nargs="?", metavar="DOMAIN")
    listing.add_argument("--repo", action="append", metavar="NAME")
    listing.add_argument("--host", metavar="NAME",
                         help="archives made on host NAME, '*' for every host (default: this host)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run="kvm_borg.actions.listing:list_from_args")
    init = subparsers.add_parser("init", help="create the configured repositories")
    init.add_argument("--repo", action="append", metavar="NAME")
    init.set_defaults(run="kvm_borg.actions.listing:init_from_args")


def add_config(subparsers) -> None:
    """Register `kvm-borg config generate|validate`."""
    config = subparsers.add_parser("config", help="generate or validate the configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    generate = config_sub.add_parser("generate", help="print a commented sample configuration")
    generate.set_defaults(run="kvm_borg.actions.config_cmd:generate_from_args", needs_settings=False)
    validate = config_sub.add_parser("validate", help="check the configuration file and its plugins")
    validate.set_defaults(run="kvm_borg.actions.config_cmd:validate_from_args")


def add_doctor(subparsers) -> None:
    """Register `kvm-borg doctor`."""
    parser = subparsers.add_parser("doctor", help="check the host, show versions and plugins")
    parser.add_argument("--round-trip", action="store_true",
                        help="back up a scratch domain into a temporary repository and compare the restore")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run="kvm_borg.actions.doctor:run_from_args")


def add_prune(subparsers) -> None:
    """Register `kvm-borg prune`."""
    parser = subparsers.add_parser("prune", help="delete archives the retention policy no longer keeps")
    parser.add_argument("domains", nargs="*", metavar="DOMAIN",
                        help="only these domains (default: every domain with kvm-borg archives)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    parser.add_argument("--repo", action="append", metavar="NAME", help="only this repository (repeatable)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run="kvm_borg.actions.prune:run_from_args")


def add_check(subparsers) -> None:
    """Register `kvm-borg check`."""
    parser = subparsers.add_parser("check", help="check the consistency of the repositories")
    parser.add_argument("--repo", action="append", metavar="NAME", help="only this repository (repeatable)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--verify-data", action="store_true", help="read and verify all data (slow)")
    data.add_argument("--read-data-subset", metavar="PCT",
                      help="restic: read this share of the data (e.g. 10%%); borg runs its normal check")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run="kvm_borg.actions.check:run_from_args")


def add_status(subparsers) -> None:
    """Register `kvm-borg status`."""
    parser = subparsers.add_parser("status", help="last backup per domain; exit 2 when one is too old")
    parser.add_argument("domains", nargs="*", metavar="DOMAIN",
                        help="only these domains (default: every domain the config's `domains:` selects)")
    parser.add_argument("--repo", action="append", metavar="NAME", help="only this repository (repeatable)")
    parser.add_argument("--max-age", metavar="DURATION", help="stale after this age (default: max_age, 26h)")
    parser.add_argument("--refresh", action="store_true",
                        help="first list the repositories (archive counts, backups made elsewhere)")
    parser.add_argument("--host", metavar="NAME",
                        help="with --refresh: record the archives made on host NAME, '*' for every host "
                             "(default: this host)")
    parser.add_argument("--all-hosts", action="store_true",
                        help="list the repositories: every host's domains and their last backup (a shared "
                             "restic repository; borg: one repository per host, each in the config)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run="kvm_borg.actions.status:run_from_args")


def add_freeze_and_thaw(subparsers) -> None:
    """Register `kvm-borg freeze` and `kvm-borg thaw`."""
    freeze = subparsers.add_parser("freeze", help="snapshot domains and expose the frozen images read-only under DIR")
    freeze.add_argument("domains", nargs="*", metavar="DOMAIN")
    freeze.add_argument("--all", action="store_true", help="every domain the config's `domains:` selects")
    freeze.add_argument("--expose", required=True, metavar="DIR", help="directory to expose the domains under")
    freeze.add_argument("--exclude-disk", action="append", default=[], metavar="TARGET",
                        help="leave this disk target out (repeatable)")
    freeze.add_argument("--json", action="store_true")
    freeze.set_defaults(run="kvm_borg.actions.freeze:freeze_from_args")
    thaw = subparsers.add_parser("thaw", help="undo `freeze`: unmount, merge back, clean up (idempotent)")
    thaw.add_argument("domains", nargs="*", metavar="DOMAIN")
    thaw.add_argument("--expose", metavar="DIR", help="only what was exposed under DIR")
    thaw.add_argument("--json", action="store_true")
    thaw.set_defaults(run="kvm_borg.actions.freeze:thaw_from_args")


def add_restore(subparsers) -> None:
    """Register `kvm-borg restore`."""
    parser = subparsers.add_parser("restore", help="restore a domain from an archive")
    parser.add_argument("domain", metavar="DOMAIN", help="the archived domain's name")
    parser.add_argument("--archive", metavar="NAME", default="latest", help="archive name, or latest (default)")
    parser.add_argument("--repo", metavar="NAME", help="repository to read (default: the first configured)")
    parser.add_argument("--host", metavar="NAME", help="take the archives made on host NAME (default: this host)")
    parser.add_argument("--target-dir", metavar="DIR", help="write the images and the XML here (default: the local "
                                                            "domain's own images, else /var/lib/libvirt/images)")
    parser.add_argument("--name", metavar="NEW", help="restore as a copy: new name, UUID and MAC addresses")
    parser.add_argument("--define", action="store_true", help="define the restored domain in libvirt")
    parser.add_argument("--start", action="store_true", help="define and start the restored domain")
    parser.add_argument("--disk", action="append", default=[], metavar="TARGET", help="only this disk (repeatable)")
    parser.add_argument("--to", metavar="FILE", help="with one --disk: write its image to FILE, into a block device "
                                                     "(with --overwrite), or - for stdout")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing files and an existing shut-off domain")
    parser.add_argument("--live", action="store_true",
                        help="define and start the domain at once on local images backed by the archive, then pull "
                             "the data in; returns when the pull is done")
    parser.add_argument("--pull-bandwidth", metavar="MIB", type=int, default=0,
                        help="with --live: pull each disk at most MIB MiB/s (default: unlimited)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run="kvm_borg.actions.restore:run_from_args")


def add_verify(subparsers) -> None:
    """Register `kvm-borg verify`."""
    parser = subparsers.add_parser("verify", help="restore drill: restore to scratch, check, optionally boot")
    parser.add_argument("domain", metavar="DOMAIN")
    parser.add_argument("--archive", metavar="NAME", default="latest", help="archive name, or latest (default)")
    parser.add_argument("--repo", metavar="NAME", help="repository to read (default: the first configured)")
    parser.add_argument("--host", metavar="NAME", help="take the archives made on host NAME (default: this host)")
    parser.add_argument("--boot", action="store_true", help="start the copy isolated and wait for a sign of life")
    parser.add_argument("--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT, metavar="SECONDS",
                        help=f"wait this long for the guest agent (default {DEFAULT_BOOT_TIMEOUT:g})")
    parser.add_argument("--alive-seconds", type=float, default=DEFAULT_ALIVE_SECONDS, metavar="SECONDS",
                        help="without a guest agent: the copy must still run after this long "
                             f"(default {DEFAULT_ALIVE_SECONDS:g})")
    parser.add_argument("--live", action="store_true",
                        help="with --boot: boot the copy the way restore --live does (running from the archive "
                             "while its disks are pulled in); the RTO is the time to its first sign of life")
    parser.add_argument("--pull-bandwidth", metavar="MIB", type=int, default=0,
                        help="with --live: pull each disk at most MIB MiB/s (default: unlimited)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run="kvm_borg.actions.verify:run_from_args")


def add_mount_and_umount(subparsers) -> None:
    """Register `kvm-borg mount` and `kvm-borg umount`."""
    parser = subparsers.add_parser("mount", help="mount an archive's disks and their file systems read-only")
    parser.add_argument("domain", metavar="DOMAIN")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    parser.add_argument("--archive", metavar="NAME", default="latest", help="archive name, or latest (default)")
    parser.add_argument("--repo", metavar="NAME", help="repository to read (default: the first configured)")
    parser.add_argument("--disk", action="append", default=[], metavar="TARGET", help="only this disk (repeatable)")
    parser.add_argument("--json", action="store_true", help="print what is mounted where as JSON")
    parser.set_defaults(run="kvm_borg.actions.mount:mount_from_args")
    umount = subparsers.add_parser("umount", help="undo `kvm-borg mount`")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.set_defaults(run="kvm_borg.actions.mount:umount_from_args")


def add_key(subparsers) -> None:
    """Register `kvm-borg key export`."""
    key = subparsers.add_parser("key", help="export a borg repository's key (borg key export)",
                                description="The repositories' encryption keys.")
    commands = key.add_subparsers(dest="key_command", required=True, metavar="export")
    export = commands.add_parser(
        "export", help="write a borg repository's key to FILE (0600)",
        description="Write a borg repository's key to FILE (mode 0600; `-`: stdout), as `borg key export` "
                    "makes it. restic repositories have no key file: keep their password instead.")
    export.add_argument("--repo", metavar="NAME", help="the borg repository (default: the only one configured)")
    export.add_argument("--paper", action="store_true", help="a key to print and type back in (borg --paper)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    export.add_argument("file", metavar="FILE", help="where to write the key (`-`: stdout)")
    export.set_defaults(run="kvm_borg.actions.key:run_key_export")


def add_passthrough(subparsers) -> None:
    """Register `kvm-borg borg` and `kvm-borg restic`."""
    for kind, example in (("borg", "list ::ARCHIVE"), ("restic", "snapshots")):
        parser = subparsers.add_parser(
            kind,
            help=f"run the configured {kind} on a repository (its location, passphrase and ssh settings)",
            description=f"Run the configured {kind} with a repository's location, passphrase and ssh settings, "
                        f"e.g. `kvm-borg {kind} --repo NAME -- {example}`. The exit code is {kind}'s.",
        )
        parser.add_argument("--repo", metavar="NAME",
                            help=f"the {kind} repository (default: the only one configured)")
        parser.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                            help=f"the {kind} command and its arguments")
        parser.set_defaults(run=f"kvm_borg.actions.passthrough:run_{kind}")


# The verbs each add_* function registers, in the order `kvm-borg --help` lists them
# (tests/unit/test_startup_imports.py checks that each function registers exactly these).
VERBS = {
    ("backup",): add_backup,
    ("recover",): add_recover,
    ("list", "init"): add_list_and_init,
    ("config",): add_config,
    ("doctor",): add_doctor,
    ("prune",): add_prune,
    ("check",): add_check,
    ("status",): add_status,
    ("freeze", "thaw"): add_freeze_and_thaw,
    ("restore",): add_restore,
    ("verify",): add_verify,
    ("mount", "umount"): add_mount_and_umount,
    ("key",): add_key,
    ("borg", "restic"): add_passthrough,
}
