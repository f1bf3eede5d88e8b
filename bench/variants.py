"""The ways of backing up the reference domain that the benchmarks compare, one function each.

Every variant backs up the same running domain's disk image:

- `read_image`: `cat IMAGE > /dev/null`, the read limit;
- `plain_borg` / `plain_restic`: the shell sequence an administrator would write, `virsh
  snapshot-create-as --disk-only --atomic --no-metadata`, `borg create` (kvm-borg's options:
  lz4, `fixed,4194304`, no `--sparse`, see src/kvm_borg/backends/borg/repository.py) or
  `restic backup` of the frozen image, `virsh blockcommit --active --pivot --wait`, `rm overlay`;
- `kvm_borg_backup`: `kvm-borg backup DOMAIN --json` with a config naming one repository;
- `virtnbdbackup`: the peer without deduplication (libvirt backup API + NBD), `-l copy [-z]`.

A `Bench` holds what they share: the domain, the scratch directory, one passphrase, borg's
BORG_BASE_DIR and restic's cache dir inside the scratch directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BORG, KVM_BORG, RESTIC, ReferenceDomain, run, tree_bytes

PASSPHRASE = "bench-passphrase"
REPO_ROOT = Path(__file__).resolve().parents[1]
FIXED_CHUNKER = "fixed,4194304"  # kvm-borg's default
BORG_DEFAULT_CHUNKER = "buzhash,19,23,21,4095"


@dataclass
class Bench:
    domain: ReferenceDomain
    workdir: Path
    uri: str = "qemu:///system"
    counter: int = 0
    env: dict = field(default_factory=dict)
    passfile: Path | None = None

    def __post_init__(self):
        base = self.workdir / "borg-base"
        base.mkdir(exist_ok=True)
        cache = self.workdir / "restic-cache"
        cache.mkdir(exist_ok=True)
        self.passfile = self.workdir / "passphrase"
        self.passfile.write_text(PASSPHRASE)
        os.chmod(self.passfile, 0o600)
        # PYTHONPATH: kvm-borg can import the benchmark's plugins (bench.writer_plugin).
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        inherited = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as in production
        self.env = {**inherited, "BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": str(base),
                    "RESTIC_PASSWORD_FILE": str(self.passfile), "RESTIC_CACHE_DIR": str(cache),
                    "PYTHONPATH": pythonpath}

    def next_id(self) -> int:
        self.counter += 1
        return self.counter


# --- repositories ------------------------------------------------------------------------------


def init_borg(bench: Bench, repo: Path) -> Path:
    run(BORG, "init", "--encryption", "repokey-blake2", repo, env=bench.env)
    return repo


def init_restic(bench: Bench, repo: Path) -> Path:
    run(RESTIC, "init", "-q", env={**bench.env, "RESTIC_REPOSITORY": str(repo)}, ok=(0,))
    return repo


def kvm_borg_config(bench: Bench, repo: Path, kind: str, *, chunker: str | None = None,
                    plugins: tuple[str, ...] = ()) -> Path:
    """Given a repository path and its type (borg|restic), write a kvm-borg config for it; return its path."""
    entry = {"name": "bench", "type": kind, "passphrase_file": str(bench.passfile)}
    if kind == "borg":
        entry["path"] = str(repo)
        if chunker:
            entry["chunker_params"] = chunker
    else:
        entry["url"] = str(repo)
    config = repo.with_name(repo.name + ".config.yaml")
    config.write_text(json.dumps({"state_dir": str(bench.workdir / "state"), "quiesce": "off", "method": "snapshot",
                                  "libvirt_uri": bench.uri, "plugins": list(plugins),
                                  "repositories": [entry]}))
    return config


# --- the variants ------------------------------------------------------------------------------


def read_image(bench: Bench) -> dict:
    """`cat IMAGE > /dev/null`."""
    with open(os.devnull, "wb") as sink:
        subprocess.run(["cat", str(bench.domain.disk)], stdout=sink, check=True)
    return {}


def _snapshot(bench: Bench, tag: str) -> Path:
    overlay = bench.domain.disk.with_name(f"{bench.domain.disk.name}.{tag}.overlay")
    run("virsh", "-c", bench.uri, "snapshot-create-as", bench.domain.name, "--name", tag, "--disk-only",
        "--atomic", "--no-metadata", "--diskspec", f"vda,file={overlay}")
    return overlay


def _commit(bench: Bench, overlay: Path) -> None:
    run("virsh", "-c", bench.uri, "blockcommit", bench.domain.name, "vda", "--active", "--pivot", "--wait")
    overlay.unlink()


def _plain_sequence(bench: Bench, store) -> dict:
    """snapshot, store(), commit; return the seconds of each step."""
    marks = [time.perf_counter()]
    overlay = _snapshot(bench, f"plain-{bench.next_id()}")
    marks.append(time.perf_counter())
    try:
        store()
        marks.append(time.perf_counter())
    finally:
        _commit(bench, overlay)
    marks.append(time.perf_counter())
    return {"snapshot_s": marks[1] - marks[0], "store_s": marks[2] - marks[1], "commit_s": marks[3] - marks[2]}


def plain_borg(bench: Bench, repo: Path, chunker: str = FIXED_CHUNKER) -> dict:
    """snapshot, `borg create` with kvm-borg's options (lz4, the chunker, no --sparse), commit."""
    archive = f"plain-{bench.counter + 1}"
    return _plain_sequence(bench, lambda: run(BORG, "create", "--compression", "lz4", "--chunker-params", chunker,
                                              f"{repo}::{archive}", bench.domain.disk, env=bench.env))


def plain_restic(bench: Bench, repo: Path) -> dict:
    """snapshot, `restic backup IMAGE` (default compression, like kvm-borg's), commit."""
    return _plain_sequence(bench, lambda: run(RESTIC, "backup", "-q", bench.domain.disk,
                                              env={**bench.env, "RESTIC_REPOSITORY": str(repo)}, ok=(0,)))


def kvm_borg_backup(bench: Bench, config: Path, extra_env: dict | None = None) -> dict:
    """`kvm-borg backup DOMAIN --json`; return its domain result (commit_seconds, stores, ...)."""
    env = {**bench.env, **(extra_env or {})}
    proc = subprocess.run([KVM_BORG, "--config", str(config), "-q", "backup", bench.domain.name, "--json"],
                          env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    try:
        [result] = json.loads(proc.stdout)["domains"]
    except (ValueError, KeyError):
        raise RuntimeError(f"kvm-borg backup exited {proc.returncode}: {proc.stderr[-2000:]}") from None
    if not result["ok"]:
        raise RuntimeError(f"kvm-borg backup failed: {result.get('error')}: {proc.stderr[-2000:]}")
    return result


def virtnbdbackup_available() -> str | None:
    """Return None when virtnbdbackup can run here, else why not."""
    if not shutil.which("virtnbdbackup"):
        return "virtnbdbackup is not installed (Debian: apt-get install virtnbdbackup)"
    return None


def virtnbdbackup(bench: Bench, output: Path, compress: bool) -> dict:
    """`virtnbdbackup -d DOMAIN -l copy [-z] -o OUTPUT`: a full copy through the backup API and NBD."""
    # QEMU (user libvirt-qemu) creates the NBD socket and the scratch file: a sticky, world-writable dir.
    scratch = bench.workdir / "nbd"
    scratch.mkdir(exist_ok=True)
    os.chmod(scratch, 0o1777)
    argv = ["virtnbdbackup", "-U", bench.uri, "-d", bench.domain.name, "-l", "copy", "-o", str(output), "-n",
            "-S", str(scratch), "-f", str(scratch / f"{bench.next_id()}.sock")]
    if compress:
        argv.append("-z")
    run(*argv, ok=(0,))
    return {}


# --- one timed call ----------------------------------------------------------------------------


def measure(fn, *args, size_of: Path | None = None, **kwargs) -> dict:
    """Call a variant; return {seconds, bytes added to `size_of` (a repository), its result}."""
    before = tree_bytes(size_of) if size_of is not None else 0
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - started
    out = {"seconds": seconds}
    if size_of is not None:
        out["added"] = tree_bytes(size_of) - before
    if result:
        out["result"] = result
    return out
