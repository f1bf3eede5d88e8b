"""The incremental benchmark's disk: a qcow2 (v3) image of a large virtual size holding an ext4 file
system full of real files, built once and cached.

    build_dataset(cache_dir, data_mib, disk_mib) -> Dataset   (cached: a second call only checks it)

The image is made as a sparse raw file, `mkfs.ext4`, loop-mounted (losetup), filled with regular
files copied from /usr/lib and /usr/share (real data: executables, libraries, text) and, when those
run out, generated files (half pseudo-random bytes that neither compress nor deduplicate, half
text made of shuffled lines of real text files), unmounted, then converted to qcow2 (compat 1.1,
so it can hold persistent dirty bitmaps). A JSON manifest beside the image says what it holds; a
cached image whose manifest does not match the requested sizes is rebuilt. Each benchmark run
copies the cached image (writes change it), see `working_copy`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import MiB, copy_real_files, run

RECIPE = 1  # bump when the recipe changes
DEFAULT_CACHE = Path("/var/tmp/kvm-borg-bench-cache")
GENERATED_FILE = 64 * MiB


@dataclass
class Dataset:
    image: Path  # the cached qcow2 (never handed to a domain: see working_copy)
    data_bytes: int  # bytes of regular files in the file system
    real_bytes: int  # of which copied from /usr
    disk_bytes: int  # virtual size
    image_bytes: int  # size of the qcow2 file


def _key(data_mib: int, disk_mib: int) -> str:
    return f"incremental-r{RECIPE}-{data_mib}m-{disk_mib}m"


def _generated_files(destination: Path, budget: int, seed: int = 15) -> int:
    """Write files of GENERATED_FILE bytes (alternately random bytes and shuffled real text) until
    `budget` bytes; return the bytes written."""
    destination.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines: list[bytes] = []
    for source in sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright"))[:400]:
        try:
            lines.extend(source.read_bytes().splitlines(keepends=True))
        except OSError:
            continue
    lines = [line for line in lines if line.strip()] or [b"kvm-borg benchmark text line\n"]
    written, index = 0, 0
    while written < budget:
        size = min(GENERATED_FILE, budget - written)
        path = destination / f"generated-{index:04d}.{'bin' if index % 2 == 0 else 'txt'}"
        with open(path, "wb") as handle:
            if index % 2 == 0:
                handle.write(rng.randbytes(size))
            else:
                left = size
                while left > 0:
                    block = b"".join(rng.choices(lines, k=2048))[:left]
                    handle.write(block)
                    left -= len(block)
        written += size
        index += 1
    return written


def build_dataset(cache_dir: Path, data_mib: int, disk_mib: int, real_fraction: float = 0.85) -> Dataset:
    """Given a cache directory and sizes (MiB of files, MiB of virtual disk), return the cached dataset,
    building it first if it is missing or was made with other sizes."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cache_dir, 0o755)
    key = _key(data_mib, disk_mib)
    image, manifest = cache_dir / f"{key}.qcow2", cache_dir / f"{key}.json"
    if image.exists() and manifest.exists():
        meta = json.loads(manifest.read_text())
        if meta.get("image_bytes") == image.stat().st_size:
            return Dataset(image, meta["data_bytes"], meta["real_bytes"], meta["disk_bytes"], meta["image_bytes"])
    image.unlink(missing_ok=True)
    manifest.unlink(missing_ok=True)
    raw = cache_dir / f"{key}.raw.tmp"
    mountpoint = Path(tempfile.mkdtemp(prefix="kvm-borg-bench-dataset-", dir=cache_dir))
    loop = None
    mounted = False
    try:
        with open(raw, "wb") as handle:
            handle.truncate(disk_mib * MiB)
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", raw, ok=(0,))
        loop = run("losetup", "--find", "--show", raw, ok=(0,)).stdout.strip()
        run("mount", loop, mountpoint, ok=(0,))
        mounted = True
        real = copy_real_files(mountpoint / "real", int(data_mib * MiB * real_fraction))
        generated = _generated_files(mountpoint / "generated", data_mib * MiB - real)
        run("sync", "-f", mountpoint, ok=(0,))
    finally:
        if mounted:
            run("umount", mountpoint, ok=(0,))
        if loop:
            run("losetup", "-d", loop, ok=(0,))
        shutil.rmtree(mountpoint, ignore_errors=True)
    try:
        tmp = image.with_suffix(".qcow2.tmp")
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", raw, tmp, ok=(0,))
        tmp.rename(image)
    finally:
        raw.unlink(missing_ok=True)
    os.chmod(image, 0o644)
    dataset = Dataset(image, real + generated, real, disk_mib * MiB, image.stat().st_size)
    manifest.write_text(json.dumps({"data_bytes": dataset.data_bytes, "real_bytes": real,
                                    "disk_bytes": dataset.disk_bytes, "image_bytes": dataset.image_bytes,
                                    "recipe": RECIPE}) + "\n")
    return dataset


def working_copy(dataset: Dataset, destination: Path) -> Path:
    """Copy the cached image to `destination` (readable by QEMU) and return it."""
    subprocess.run(["cp", "--sparse=always", str(dataset.image), str(destination)], check=True)
    os.chmod(destination, 0o644)
    return destination


if __name__ == "__main__":  # python -m bench.dataset DATA_MIB DISK_MIB: build (or check) the cache
    import sys

    d = build_dataset(DEFAULT_CACHE, int(sys.argv[1]), int(sys.argv[2]))
    print(d)
