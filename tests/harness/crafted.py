"""Hostile archives made from real ones, and the host listing that shows what a restore wrote.

A crafted archive starts as a real kvm-borg archive (borg) or snapshot set (restic): it is
extracted into a temporary tree, a callback edits the tree (meta.json fields, the XML, a file
replaced by a symlink, a device node, a FIFO or a setuid file...) and the tree is stored again
as a NEW archive carrying kvm-borg's own marks, so kvm-borg lists and reads it like one it made:

- borg: ``--comment`` is the original archive's one-line JSON comment (``{"kvm_borg":1,...}``,
  re-serialised as `kvm_borg.metadata.archive_comment` does, braces escaped for borg's
  placeholders), ``--timestamp`` the given time;
- restic: the tags of `kvm_borg.backends.restic.archives.archive_tags` (``kvm-borg``,
  ``domain=``, ``archive=``, ``part=main``, ``comment=``, ``size=``), ``--host`` and ``--time``.

Usage::

    def edit(tree: Tree) -> None:
        meta = tree.meta()
        meta["domain"]["uuid"] = "../../../../etc/cron.d"
        tree.write_meta(meta)
        tree.replace_with_symlink(meta["disks"][0]["archive_path"], "/etc/shadow")

    name = craft_borg(repo, archive, edit, workdir=tmp_path / "craft")
    name = craft_restic(repo_url, archive, edit, workdir=tmp_path / "craft", env=restic_env())

A module that crafts many variants of one archive extracts it once (`borg_original`,
`restic_original`) and passes the `Original` to every craft, which then copies the extracted
tree instead of reading the archive again.

The listing helpers (`listing`, `marked_paths`, `changed`) compare the host paths an attacker
would aim at before and after a restore; see `ATTACK_ROOTS` and `QUIET_ROOTS`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Mapping

from .cli import BORG_BIN, RESTIC_BIN, borg_env

#: Host directories a hostile archive would aim at (others write to some of them concurrently:
#: compare there only entries whose names carry the attack's marker).
ATTACK_ROOTS = ("/etc", "/etc/cron.d", "/root", "/var/lib/libvirt/qemu/nvram", "/var/lib/libvirt/swtpm",
                "/var/lib/libvirt/images", "/tmp")
#: Of those, the ones nobody else writes during a test run: their top level is compared whole.
QUIET_ROOTS = ("/etc/cron.d", "/root")

_sequence = itertools.count(1)


# --- the tree being edited ----------------------------------------------------------------------


@dataclass
class Tree:
    """An extracted archive: `root` is the archive root (archive paths are relative to it)."""

    root: Path

    def path(self, archive_path: str) -> Path:
        """Given an archive path (with or without a leading "/"), return where it is in the tree."""
        return self.root / archive_path.lstrip("/")

    def meta_path(self) -> Path:
        """Return the tree's (only) meta.json."""
        found = [p for p in self.root.rglob("meta.json") if p.is_file()]
        if len(found) != 1:
            raise AssertionError(f"expected one meta.json in {self.root}, found {found}")
        return found[0]

    def meta(self) -> dict:
        """Return the parsed meta.json."""
        return json.loads(self.meta_path().read_text())

    def write_meta(self, meta: dict | str | bytes) -> None:
        """Replace meta.json with `meta` (a dict is dumped as JSON; str/bytes are written as they are)."""
        if isinstance(meta, dict):
            meta = json.dumps(meta, indent=2)
        path = self.meta_path()
        path.write_bytes(meta if isinstance(meta, bytes) else meta.encode())

    def read_text(self, archive_path: str) -> str:
        return self.path(archive_path).read_text()

    def write_file(self, archive_path: str, data: bytes | str, mode: int = 0o600) -> Path:
        """Write (or replace) a regular file at `archive_path` with `mode` (setuid bits included)."""
        path = self.path(archive_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._remove(path)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.chmod(path, mode)
        return path

    def chmod(self, archive_path: str, mode: int) -> None:
        os.chmod(self.path(archive_path), mode)

    def replace_with_symlink(self, archive_path: str, target: str) -> None:
        path = self.path(archive_path)
        self._remove(path)
        os.symlink(target, path)

    def replace_with_device(self, archive_path: str, kind: str = "c", major: int = 1, minor: int = 3) -> None:
        """Replace the file by a character ("c", default /dev/null's 1:3) or block ("b") device node."""
        path = self.path(archive_path)
        self._remove(path)
        os.mknod(path, 0o600 | (stat.S_IFCHR if kind == "c" else stat.S_IFBLK), os.makedev(major, minor))

    def replace_with_fifo(self, archive_path: str) -> None:
        path = self.path(archive_path)
        self._remove(path)
        os.mkfifo(path, 0o600)

    def replace_with_dir(self, archive_path: str) -> None:
        path = self.path(archive_path)
        self._remove(path)
        path.mkdir()
        (path / "inside").write_bytes(b"x")

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


Edit = Callable[[Tree], None]


@dataclass(frozen=True)
class Original:
    """A real archive extracted once: `tree` (never edited: every craft edits a copy), the
    archive's kvm-borg `comment` (JSON text), and for restic the main snapshot's `hostname`."""

    archive: str
    tree: Path
    comment: str
    hostname: str | None = None

    @property
    def domain(self) -> str:
        return json.loads(self.comment)["domain"]


def _checked(original: Original, archive: str) -> Original:
    """Return `original` if it is the extraction of `archive`, else raise ValueError."""
    if original.archive != archive:
        raise ValueError(f"the original given is archive {original.archive}, not {archive}")
    return original


def _new_dir(workdir: Path, prefix: str) -> Path:
    """Return a new, empty directory under `workdir` (created) whose name starts with `prefix`."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))


def _variant(original: Original, kind: str, edit: Edit, workdir: Path, name: str | None, host: str | None,
             when: datetime | None, comment: str | None) -> tuple[str, datetime, str, Path]:
    """Given an Original and what the crafted archive should be (see craft_borg), copy the original's
    tree under `workdir` (modes and times kept, symlinks as symlinks) and let `edit` change the copy.
    Return (name, creation time, comment text, edited tree) of the new archive."""
    when = when or unique_timestamp()
    name = name or f"{original.domain}-{kvm_borg_timestamp(when)}"
    text = comment if comment is not None else rewrite_comment(original.comment, host=host)
    tree = Path(workdir) / f"{kind}-{name}"
    shutil.copytree(original.tree, tree, symlinks=True)
    edit(Tree(tree))
    return name, when, text, tree


# --- names, times, comments ---------------------------------------------------------------------


def unique_timestamp(base: datetime | None = None) -> datetime:
    """Return a UTC time to the second no other crafted archive of this process has (past times by default)."""
    base = base or datetime(2025, 1, 1, tzinfo=timezone.utc)
    return base + timedelta(seconds=next(_sequence) + os.getpid() % 10000 * 1000)


def kvm_borg_timestamp(when: datetime) -> str:
    """Given a time, return kvm-borg's archive-name timestamp (20261126T121638Z)."""
    return when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def rewrite_comment(comment: str, *, host: str | None = None, domain: str | None = None) -> str:
    """Given kvm-borg's archive comment, return it with `host`/`domain` replaced, serialised like kvm-borg."""
    data = json.loads(comment)
    if host is not None:
        data["host"] = host
    if domain is not None:
        data["domain"] = domain
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _run(argv, *, env: Mapping[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], env=dict(env), cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def _store_roots(tree: Path) -> list[str]:
    return sorted(entry.name for entry in tree.iterdir())


# --- borg ---------------------------------------------------------------------------------------


def borg_comment(repo: Path | str, archive: str, env: Mapping[str, str] | None = None) -> str:
    """Given a borg repository and archive, return the archive's comment."""
    proc = _run([BORG_BIN, "info", "--json", f"{repo}::{archive}"], env=env or borg_env())
    return json.loads(proc.stdout)["archives"][0]["comment"]


def borg_original(repo: Path | str, archive: str, *, workdir: Path,
                  env: Mapping[str, str] | None = None) -> Original:
    """Given a real kvm-borg borg archive, extract it into a new directory under `workdir` (created)
    and return the Original."""
    env = dict(env or borg_env())
    tree = _new_dir(workdir, f"original-borg-{archive}-")
    _run([BORG_BIN, "extract", "--sparse", f"{repo}::{archive}"], env=env, cwd=tree)
    return Original(archive, tree, borg_comment(repo, archive, env))


def craft_borg(repo: Path | str, archive: str, edit: Edit, *, workdir: Path, name: str | None = None,
               host: str | None = None, when: datetime | None = None, comment: str | None = None,
               env: Mapping[str, str] | None = None, original: Original | None = None) -> str:
    """Given a real kvm-borg archive, extract it, let `edit(Tree)` change it and store it as a new archive.

    The new archive gets the original's comment (with `host` replaced when given, or `comment`
    verbatim), the creation time `when` (default: a unique past time) and the name `name`
    (default: `{domain}-{timestamp}` like kvm-borg's). With `original` (`borg_original` of
    `archive`), its tree is copied instead of extracting the archive. Return the new archive's name."""
    env = dict(env or borg_env())
    own = original is None
    original = borg_original(repo, archive, workdir=workdir, env=env) if own else _checked(original, archive)
    name, when, text, tree = _variant(original, "borg", edit, workdir, name, host, when, comment)
    stamp = when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + "+00:00"
    escaped = text.replace("{", "{{").replace("}", "}}")  # borg expands {placeholders} in --comment
    _run([BORG_BIN, "create", "--comment", escaped, "--timestamp", stamp, f"{repo}::{name}",
          *_store_roots(tree)], env=env, cwd=tree)
    shutil.rmtree(tree, ignore_errors=True)
    if own:
        shutil.rmtree(original.tree, ignore_errors=True)
    return name


# --- restic -------------------------------------------------------------------------------------


def restic_snapshots(env: Mapping[str, str], *tags: str) -> list[dict]:
    """Return `restic snapshots --json` entries that carry all `tags` (any host)."""
    argv = [RESTIC_BIN, "snapshots", "--json"] + (["--tag", ",".join(tags)] if tags else [])
    return json.loads(_run(argv, env=env).stdout) or []


def _restic_main(env: Mapping[str, str], archive: str) -> dict:
    """Return the `part=main` snapshot of kvm-borg restic archive `archive` (file disks only: no device part)."""
    from kvm_borg.backends.restic import archives as rc

    parts = restic_snapshots(env, rc.MARKER_TAG, rc.tag("archive", archive))
    mains = [s for s in parts if rc.parse_tags(s.get("tags") or []).get("part") == rc.PART_MAIN]
    if len(mains) != 1 or len(parts) != 1:
        raise AssertionError(f"restic archive {archive}: expected one main snapshot and no device part, got {parts}")
    return mains[0]


def _restic_repository_env(env: Mapping[str, str], repo_url: str) -> dict[str, str]:
    return {**env, "RESTIC_REPOSITORY": str(repo_url), "TZ": "UTC"}


def restic_original(repo_url: str, archive: str, *, workdir: Path, env: Mapping[str, str]) -> Original:
    """Given a real kvm-borg restic archive, restore its main snapshot into a new directory under
    `workdir` (created) and return the Original (`env` holds the repository password)."""
    from kvm_borg.backends.restic import archives as rc

    env = _restic_repository_env(env, repo_url)
    main = _restic_main(env, archive)
    tree = _new_dir(workdir, f"original-restic-{archive}-")
    _run([RESTIC_BIN, "restore", main["id"], "--target", tree], env=env)
    return Original(archive, tree, rc.decode_comment(rc.parse_tags(main["tags"])["comment"]), main["hostname"])


def craft_restic(repo_url: str, archive: str, edit: Edit, *, workdir: Path, env: Mapping[str, str],
                 name: str | None = None, host: str | None = None, when: datetime | None = None,
                 comment: str | None = None, original: Original | None = None) -> str:
    """Given a real kvm-borg restic archive (its `part=main` snapshot; file disks only), restore it,
    let `edit(Tree)` change it and back it up as a new archive with kvm-borg's tags.

    `env` holds the repository password (RESTIC_PASSWORD...); `repo_url` goes to RESTIC_REPOSITORY.
    The new snapshot has the original's host (or `host`), the time `when` (default: a unique past
    time) and the original's comment (host replaced when given, or `comment` verbatim). With
    `original` (`restic_original` of `archive`), its tree is copied instead of restoring the
    snapshot. Return the new archive's name."""
    from kvm_borg.backends.restic import archives as rc

    own = original is None
    original = restic_original(repo_url, archive, workdir=workdir, env=env) if own else _checked(original, archive)
    env = _restic_repository_env(env, repo_url)
    name, when, text, tree = _variant(original, "restic", edit, workdir, name, host, when, comment)
    size = sum(p.lstat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    tags = rc.archive_tags(original.domain, name, text, rc.PART_MAIN, size=size)
    argv = [RESTIC_BIN, "backup", "--json", "--host", host or original.hostname,
            "--time", when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")]
    for item in tags:
        argv += ["--tag", item]
    _run(argv + ["--", *_store_roots(tree)], env=env, cwd=tree)
    shutil.rmtree(tree, ignore_errors=True)
    if own:
        shutil.rmtree(original.tree, ignore_errors=True)
    return name


# --- what a restore wrote on the host -----------------------------------------------------------


def _entry(st: os.stat_result) -> tuple:
    kind = stat.S_IFMT(st.st_mode)
    # A directory's mtime moves with whatever anybody writes inside it: keep it out.
    return (kind, stat.S_IMODE(st.st_mode), st.st_size if kind != stat.S_IFDIR else 0,
            st.st_mtime_ns if kind != stat.S_IFDIR else 0)


def listing(directories=QUIET_ROOTS) -> dict[str, tuple]:
    """Given directories, return {path: (type, mode, size, mtime_ns)} of their top-level entries (lstat,
    never following a symlink; size and mtime of directories left out). A missing directory lists nothing."""
    result: dict[str, tuple] = {}
    for directory in directories:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for entry in names:
            path = os.path.join(directory, entry)
            try:
                result[path] = _entry(os.lstat(path))
            except FileNotFoundError:
                continue
    return result


def changed(before: Mapping[str, tuple], after: Mapping[str, tuple]) -> list[str]:
    """Given two listings, return the paths added, removed or changed, sorted."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


def marked_paths(marker: str, roots=ATTACK_ROOTS, depth: int = 3) -> list[str]:
    """Return every path under `roots` (to `depth` levels, never following symlinks) whose name holds `marker`."""
    found = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        base = root.rstrip("/").count("/")
        for current, dirs, files in os.walk(root, followlinks=False):
            for name in dirs + files:
                if marker in name:
                    found.append(os.path.join(current, name))
            if current.count("/") - base >= depth - 1:
                dirs[:] = []
    return sorted(set(found))


def special_files(directory: Path | str) -> list[str]:
    """Return files below `directory` that are not plain: symlinks, devices, FIFOs, sockets, or with
    setuid/setgid/sticky bits or world-writable."""
    bad = []
    for current, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            path = os.path.join(current, name)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR) or st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) \
                    or st.st_mode & 0o002:
                bad.append(f"{path} {stat.filemode(st.st_mode)}")
    return sorted(bad)
