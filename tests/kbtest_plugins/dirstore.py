"""A third-party backend plugin for the tests: repositories of `type: directory`.

Each archive is a directory tree `PATH/ARCHIVE/` holding the request's files at their host paths
(relative), and `PATH/ARCHIVE/.archive.json` with the archive's comment, time and sizes. Its own keys
come through `kvm_borg_config_schema`:

    plugins: [kbtest_plugins.dirstore]
    repositories:
      - {name: dirs, type: directory, path: /srv/dirs, keep_sparse: true}

`keep_sparse: true` leaves holes where a file has all-zero blocks. It implements the RepositoryBackend
members a backup, `init` and `list` use (init, exists, store, list_archives, list_paths,
archive_path, extract_file); prune, check and mount are not offered.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from kvm_borg.config_schema import ABSOLUTE_PATH, BOOLEAN, key
from kvm_borg.hookspecs import hookimpl
from kvm_borg.models import ArchiveInfo, BackendBase, StoreResult

BLOCK = 1 << 20
MANIFEST = ".archive.json"

DIRECTORY_REPOSITORY = {
    "properties": {
        "path": key(ABSOLUTE_PATH, "the directory that holds one subdirectory per archive"),
        "keep_sparse": key(BOOLEAN, "leave holes where a file has all-zero blocks", default=True),
    },
    "required": ["path"],
    "examples": [{"name": "dirs", "type": "directory", "path": "/srv/kvm-borg-dirs"}],
}


@hookimpl
def kvm_borg_config_schema():
    """Return the keys of a `type: directory` repository."""
    return {"repository_types": {"directory": DIRECTORY_REPOSITORY}}


@hookimpl
def kvm_borg_repository_backend(repository, settings):
    """Return a DirectoryRepository for a `type: directory` repository."""
    if repository["type"] == "directory":
        return DirectoryRepository(repository, settings)
    return None


def copy_file(source: str, destination: Path, keep_sparse: bool) -> int:
    """Copy `source` (a file or block device) to `destination` block by block, seeking over all-zero
    blocks when `keep_sparse`; return the bytes copied."""
    size = 0
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        while block := reader.read(BLOCK):
            if keep_sparse and block.count(0) == len(block):
                writer.seek(len(block), os.SEEK_CUR)
            else:
                writer.write(block)
            size += len(block)
        writer.truncate(size)
    return size


class DirectoryRepository(BackendBase):
    """Archives as directory trees under the repository's `path`; the optional RepositoryBackend members
    (preflight, version, mount, ...) are BackendBase's defaults, as docs/plugins.md advises."""

    def __init__(self, repository: dict, settings):
        super().__init__(repository, settings)
        self.root = Path(repository["path"])

    def init(self) -> bool:
        existed = self.root.is_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        return not existed

    def exists(self) -> bool:
        return self.root.is_dir()

    def archive_path(self, host_path: str) -> str:
        return host_path.lstrip("/")

    def store(self, request) -> StoreResult:
        started = time.monotonic()
        partial = self.root / f".{request.archive_name}.partial"
        try:
            total = 0
            for path in request.files:
                destination = partial / self.archive_path(path)
                destination.parent.mkdir(parents=True, exist_ok=True)
                total += copy_file(path, destination, self.repository["keep_sparse"])
            comment = json.loads(request.comment)
            (partial / MANIFEST).write_text(json.dumps({
                "domain": request.domain, "timestamp": request.timestamp, "comment": comment, "size": total,
            }))
            partial.rename(self.root / request.archive_name)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            return StoreResult(self.name, ok=False, seconds=time.monotonic() - started, error=str(exc))
        return StoreResult(self.name, ok=True, archive=request.archive_name, original_size=total,
                           deduplicated_size=total, seconds=time.monotonic() - started)

    def list_archives(self, domain: str | None = None) -> list[ArchiveInfo]:
        infos = []
        for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
            data = json.loads(manifest.read_text())
            if domain is not None and data["domain"] != domain:
                continue
            stamp = data["timestamp"]  # 20261126T121638Z
            when = f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}+00:00"
            infos.append(ArchiveInfo(name=manifest.parent.name, domain=data["domain"], time=when,
                                     repository=self.name, original_size=data["size"],
                                     deduplicated_size=data["size"], disks=tuple(data["comment"].get("disks", ())),
                                     host=data["comment"].get("host")))
        return sorted(infos, key=lambda info: info.time)

    def list_paths(self, archive: str) -> list[str]:
        base = self.root / archive
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and p.name != MANIFEST)

    def extract_file(self, archive: str, archive_path: str, destination: Path) -> None:
        copy_file(str(self.root / archive / archive_path), Path(destination), True)
