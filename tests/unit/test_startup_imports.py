"""`kvm-borg --help`, `--version` and `kvm-borg VERB --help` start fast: they import neither libvirt nor a
backend nor any heavy library; each verb's run function is imported only when that verb runs."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kvm_borg import cli, cli_args

HEAVY = ("libvirt", "libvirtmod", "kvm_borg.backends", "kvm_borg.actions", "kvm_borg.engine", "kvm_borg.config",
         "kvm_borg.plugins", "sh", "tenacity", "ruamel", "yaml", "jsonschema", "fastjsonschema", "pluggy", "rich")


def imported_modules(*python_args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """Given the arguments of a `python -X importtime ...` run, return (the names of every module it
    imported, the finished process)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *python_args], capture_output=True, text=True,
                          timeout=60)
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    names.discard("package")  # the header line: "import time: self [us] | cumulative | imported package"
    return names, proc


def heavy_among(names: set[str]) -> set[str]:
    """Given module names, return those that are, or are inside, one of the HEAVY packages."""
    return {n for n in names if any(n == h or n.startswith(h + ".") for h in HEAVY)}


def verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Given a parser, yield (command words, leaf parser) for every runnable (sub)command below it."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        yield path, parser
    for action in actions:
        for name, sub in action.choices.items():
            yield from verbs(sub, path + (name,))


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["backup", "--help"], ["restore", "--help"],
                                  ["config", "generate", "--help"], ["borg", "--help"]])
def test_help_and_version_import_no_libvirt_backend_or_heavy_library(argv):
    names, proc = imported_modules("-m", "kvm_borg.cli", *argv)
    assert proc.returncode == 0, proc.stderr
    assert "kvm_borg.cli_args" in names  # the probe sees kvm-borg's own imports
    assert heavy_among(names) == set()
    assert proc.stdout.startswith("kvm-borg 0.1.0" if argv == ["--version"] else "usage: kvm-borg")


def test_the_probe_sees_a_heavy_import_when_there_is_one():
    names, proc = imported_modules("-c", "import kvm_borg.cli, kvm_borg.backends, libvirt, sh, tenacity")
    assert proc.returncode == 0, proc.stderr
    assert {"libvirt", "libvirtmod", "kvm_borg.backends", "sh", "tenacity"} <= heavy_among(names)


def test_every_verb_names_a_run_function_that_exists_and_takes_ctx_and_args():
    leaves = dict(verbs(cli_args.build_parser()))
    assert {" ".join(p) for p in leaves} == {
        "backup", "recover", "list", "init", "config generate", "config validate", "doctor", "prune", "check",
        "status", "freeze", "thaw", "restore", "verify", "mount", "umount", "key export", "borg", "restic"}
    for path, parser in leaves.items():
        run = cli.resolve_run(parser.get_default("run"))
        assert callable(run), path
        assert run.__code__.co_argcount == 2, (path, run)  # run(ctx, args)
    assert leaves["config", "generate"].get_default("needs_settings") is False


def test_verify_defaults_in_the_arguments_are_verifys_own():
    from kvm_borg.actions import verify

    args = cli_args.build_parser().parse_args(["verify", "dom"])
    assert (args.boot_timeout, args.alive_seconds) == (verify.DEFAULT_BOOT_TIMEOUT, verify.DEFAULT_ALIVE_SECONDS)


def test_each_add_function_registers_exactly_the_verbs_listed_for_it():
    for names, add in cli_args.VERBS.items():
        parser = cli_args.Parser(prog="kvm-borg")
        subparsers = parser.add_subparsers(dest="command", parser_class=cli_args.Parser)
        add(subparsers)
        assert tuple(subparsers.choices) == names, add.__name__


def test_the_one_verb_parser_parses_like_the_whole_one():
    import contextlib
    import io

    samples = [["backup", "web", "--repo", "a", "--json"], ["-q", "--config", "backup", "list", "web"],
               ["-c", "f.yaml", "-v", "restore", "web", "--disk", "vda", "--to", "-"], ["--config=f", "thaw"],
               ["config", "validate"], ["borg", "--repo", "r", "--", "list"], ["-vv", "--debug", "status", "--json"]]
    for argv in samples:
        assert cli_args.verb_named(argv) == next(a for a in argv if a in {n for ns in cli_args.VERBS for n in ns}
                                                  and argv[argv.index(a) - 1] not in ("-c", "--config"))
        assert vars(cli_args.build_parser(argv).parse_args(argv)) == vars(cli_args.build_parser().parse_args(argv))
    for unsure in (["--help"], ["-x", "backup"], ["nosuchverb"], [], ["--config"]):
        assert cli_args.verb_named(unsure) is None
    for bad in (["backup", "--no-such-flag"], ["restore"]):  # the same one-line error and exit 2 either way
        outputs = []
        for parser in (cli_args.build_parser(bad), cli_args.build_parser()):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
                parser.parse_args(bad)
            outputs.append((exit_.value.code, err.getvalue()))
        assert outputs[0] == outputs[1] and outputs[0][0] == 2


# Modules only the bitmap method needs (engine.backup_job is not among them: the snapshot planning asks it
# whether a checkpoint is kvm-borg's own).
BITMAP_ONLY = ("kvm_borg.engine.libvirt_bitmap", "kvm_borg.engine.qemu_nbd", "kvm_borg.segments",
               "kvm_borg.segment_state", "kvm_borg.nbd_client", "kvm_borg.segment_view", "kvm_borg.pipeline.segments_read",
               "nbd", "libnbdmod", "pyfuse3", "trio")


@pytest.fixture(scope="module")
def repeat_backup_runs(tmp_path_factory) -> list[tuple[set[str], subprocess.CompletedProcess]]:
    """A snapshot-method backup (up to its failure on a domain that does not exist, after libvirt answered)
    run twice on the same config text: [(modules imported, process)] of both runs."""
    tmp_path = tmp_path_factory.mktemp("repeat-backup")
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("not-a-secret\n")
    passphrase.chmod(0o600)
    path = tmp_path / "config.yaml"
    path.write_text(f"# a comment makes this text unique to the test: {tmp_path}\nstate_dir: {tmp_path / 'state'}\n"
                    f"quiesce: off\nrepositories:\n  - {{name: r, type: borg, path: {tmp_path / 'repo'}, "
                    f"passphrase_file: {passphrase}}}\n")
    argv = ("-m", "kvm_borg.cli", "--config", str(path), "backup", "kvm-borg-fixedcost-no-such-domain")
    runs = [imported_modules(*argv) for _ in range(2)]
    for names, proc in runs:
        assert proc.returncode == 2 and "domain 'kvm-borg-fixedcost-no-such-domain' does not exist" in proc.stderr
        assert {"kvm_borg.config", "kvm_borg.engine.connection", "libvirt"} <= names  # it got to libvirt
    return runs


def test_a_repeat_backup_of_an_unchanged_config_imports_no_yaml_parser_no_validator_and_no_bitmap_module(
        repeat_backup_runs):
    """The second run's parsed document and its validation come from /run/kvm-borg, so neither ruamel.yaml
    nor fastjsonschema is imported; the first run imported them."""
    for names, _ in repeat_backup_runs:
        assert {n for n in names if n.split(".")[0] in BITMAP_ONLY or n.startswith(BITMAP_ONLY)} == set()
    first, again = (heavy_among(names) for names, _ in repeat_backup_runs)
    assert {"ruamel.yaml", "fastjsonschema"} <= first
    assert {n for n in again if n.startswith(("ruamel", "fastjsonschema", "yaml", "jsonschema"))} == set()


# What only restore, verify, mount, the repositories' own tools or a restic repository (the test's is borg)
# need, and the standard modules nothing on a backup's path needs (each costs a backup's start-up
# milliseconds: uuid imports platform, hashlib and secrets load OpenSSL, tempfile and secrets import random).
NOT_ON_THE_BACKUP_PATH = (
    "kvm_borg.restore_plan", "kvm_borg.live_restore_plan", "kvm_borg.archive_meta", "kvm_borg.restore_refusals",
    "kvm_borg.restore_files", "kvm_borg.xml_sanitize", "kvm_borg.mountinfo", "kvm_borg.pipeline.restore",
    "kvm_borg.pipeline.live_restore", "kvm_borg.pipeline.archive", "kvm_borg.pipeline.archive_mount",
    "kvm_borg.backends.tool_commands", "kvm_borg.backends.restic.commands", "kvm_borg.engine.live_pull",
    "libvirt_qemu", "libvirtmod_qemu",
    "uuid", "platform", "secrets", "hashlib", "_hashlib", "tempfile", "random",
)


def test_a_backup_imports_no_restore_only_module_and_no_costly_standard_module_it_does_not_use(repeat_backup_runs):
    for names, _ in repeat_backup_runs:
        assert names & set(NOT_ON_THE_BACKUP_PATH) == set()


def test_the_backup_path_guard_sees_such_a_module_when_one_is_imported():
    names, proc = imported_modules("-c", "import kvm_borg.cli, kvm_borg.restore_plan, uuid, hashlib")
    assert proc.returncode == 0, proc.stderr
    assert {"kvm_borg.restore_plan", "uuid", "platform", "hashlib", "_hashlib"} <= names & set(NOT_ON_THE_BACKUP_PATH)
