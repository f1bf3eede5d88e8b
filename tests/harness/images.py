"""Disk image helpers built on qemu-img / qemu-io.

All reads use ``-U`` (force-share) so they also work on images that a running VM
holds open, and they read the *guest view*: for a qcow2 with a backing chain the
whole chain is read.

Fill modes (``DiskSpec.fill`` / :func:`fill_image`):

``"pattern"`` (default)
    MiB number ``i`` is filled with the byte :func:`mib_byte(seed, i) <mib_byte>`
    (never 0), so every MiB differs from its neighbours and disks with different
    seeds differ.  Fast: one qemu-io process with one ``write -P`` per MiB.
``"zero"`` or ``None``
    nothing written: an empty (sparse / unallocated) image.
``int`` 0..255
    the whole disk filled with that byte.
``"random"``
    seeded pseudo-random bytes (incompressible, no duplicate chunks), reproducible
    from ``seed``.
``"sparse"``
    like ``"pattern"`` but only every other MiB (even MiB numbers) is written; the
    others stay unallocated (read as zeros).
list of ``(pattern, offset, length)``
    explicit ``write -P pattern offset length`` commands on an empty image
    (offset/length in bytes, qemu-io alignment rules apply: use multiples of 512).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence, Union

MiB = 1024 * 1024

Fill = Union[None, str, int, Sequence[tuple[int, int, int]]]

QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
QEMU_IO = shutil.which("qemu-io") or "/usr/bin/qemu-io"


class ImageError(RuntimeError):
    pass


def _run(cmd: list[str], *, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise ImageError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
        )
    return proc


def mib_byte(seed: int, i: int) -> int:
    """Byte used for MiB ``i`` by the ``"pattern"`` fill with ``seed`` (1..255, never 0)."""
    return ((seed * 37 + i * 7) % 255) + 1


def random_mib(seed: int, i: int) -> bytes:
    """The 1 MiB block number ``i`` of the ``"random"`` fill with ``seed``."""
    return random.Random(f"kbtest-{seed}-{i}").randbytes(MiB)


def fill_commands(fill: Fill, size_mib: int, seed: int) -> list[tuple[int, int, int]]:
    """The ``(pattern, offset, length)`` writes that make up a pattern-style fill."""
    if fill is None or fill == "zero":
        return []
    if fill == "pattern":
        return [(mib_byte(seed, i), i * MiB, MiB) for i in range(size_mib)]
    if fill == "sparse":
        return [(mib_byte(seed, i), i * MiB, MiB) for i in range(0, size_mib, 2)]
    if isinstance(fill, bool):
        raise ValueError(f"unsupported fill {fill!r}")
    if isinstance(fill, int):
        if not 0 <= fill <= 255:
            raise ValueError(f"fill byte out of range: {fill}")
        return [(fill, 0, size_mib * MiB)] if fill else []
    if isinstance(fill, (list, tuple)):
        return [(int(p), int(o), int(n)) for p, o, n in fill]
    raise ValueError(f"unsupported fill {fill!r} (see tests/harness/images.py)")


def _qemu_io_batches(cmds: list[str], batch: int = 256) -> Iterable[list[str]]:
    for start in range(0, len(cmds), batch):
        yield cmds[start : start + batch]


def create_image(path: Path | str, fmt: str, size_mib: int, fill: Fill = "pattern", seed: int = 0) -> Path:
    """Create ``path`` (format ``fmt``: qcow2 or raw) of ``size_mib`` MiB with ``fill``."""
    path = Path(path)
    if fmt not in ("qcow2", "raw"):
        raise ValueError(f"unsupported format {fmt!r}")
    if fill == "random":
        _create_random(path, fmt, size_mib, seed)
        return path
    writes = fill_commands(fill, size_mib, seed)
    _run([QEMU_IMG, "create", "-q", "-f", fmt, str(path), f"{size_mib}M"])
    cmds = [f"write -P {p:#04x} {o} {n}" for p, o, n in writes]
    for chunk in _qemu_io_batches(cmds):
        args = [QEMU_IO, "-f", fmt]
        for c in chunk:
            args += ["-c", c]
        proc = _run(args + [str(path)])
        if "error" in proc.stdout.lower() or "failed" in proc.stdout.lower():
            raise ImageError(f"qemu-io write failed on {path}: {proc.stdout[-2000:]}")
    return path


def _create_random(path: Path, fmt: str, size_mib: int, seed: int) -> None:
    raw = path if fmt == "raw" else path.with_name(path.name + ".tmp-raw")
    with open(raw, "wb") as f:
        for i in range(size_mib):
            f.write(random_mib(seed, i))
    if fmt != "raw":
        try:
            _run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path)])
        finally:
            raw.unlink(missing_ok=True)


def image_has_pattern(path: Path | str, fmt: str | None, pattern: int, offset: int, length: int) -> bool:
    """True when the guest view of ``path`` holds byte ``pattern`` in [offset, offset+length).

    Uses ``qemu-io -r -U`` so it works on images in use by a running VM and reads
    through backing chains.  Raises :class:`ImageError` when the read itself fails.
    """
    args = [QEMU_IO, "-r", "-U"]
    if fmt:
        args += ["-f", fmt]
    proc = _run(args + ["-c", f"read -P {pattern:#04x} {offset} {length}", str(path)], check=False)
    out = proc.stdout + proc.stderr
    if "Pattern verification failed" in out:
        return False
    if proc.returncode != 0 or f"read {length}/{length} bytes" not in out:
        raise ImageError(f"qemu-io read failed on {path} ({proc.returncode}): {out[-2000:]}")
    return True


def check_patterns(path: Path | str, fmt: str | None, writes: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Check many ``(pattern, offset, length)`` at once; returns the ones that do NOT match."""
    bad: list[tuple[int, int, int]] = []
    for batch_start in range(0, len(writes), 256):
        batch = list(writes[batch_start : batch_start + 256])
        args = [QEMU_IO, "-r", "-U"]
        if fmt:
            args += ["-f", fmt]
        for p, o, n in batch:
            args += ["-c", f"read -P {p:#04x} {o} {n}"]
        proc = _run(args + [str(path)], check=False)
        out = proc.stdout + proc.stderr
        failed_offsets = set()
        for line in out.splitlines():
            if line.startswith("Pattern verification failed at offset "):
                failed_offsets.add(int(line.split()[5].rstrip(",")))
        reads_done = sum(1 for line in out.splitlines() if line.startswith("read ") and " bytes at offset " in line)
        if reads_done < len(batch) or "read failed" in out:
            raise ImageError(f"qemu-io read failed on {path} ({proc.returncode}): {out[-2000:]}")
        bad += [w for w in batch if w[1] in failed_offsets]
    return bad


def verify_fill(path: Path | str, fmt: str | None, size_mib: int, fill: Fill, seed: int) -> bool:
    """True when the guest view of ``path`` still equals the image created with this fill."""
    if image_virtual_size(path, fmt) != size_mib * MiB:
        return False
    if fill == "random":
        with tempfile.TemporaryDirectory(prefix="kbtest-verify-") as td:
            ref = Path(td) / "ref.raw"
            _create_random(ref, "raw", size_mib, seed)
            return qemu_img_compare(path, ref, fmt_a=fmt, fmt_b="raw")
    writes = fill_commands(fill, size_mib, seed)
    if check_patterns(path, fmt, writes):
        return False
    # Everything not written must read as zeros.
    covered = bytearray(size_mib)  # per-MiB "fully written" flags (good enough for our fills)
    for _, o, n in writes:
        if o % MiB == 0 and n % MiB == 0:
            for i in range(o // MiB, min(size_mib, (o + n) // MiB)):
                covered[i] = 1
    zeros = [(0, i * MiB, MiB) for i in range(size_mib) if not covered[i]]
    if isinstance(fill, (list, tuple)):
        # Explicit writes may be unaligned: only check MiBs no write touches at all.
        touched = set()
        for _, o, n in writes:
            touched.update(range(o // MiB, (o + n + MiB - 1) // MiB))
        zeros = [(0, i * MiB, MiB) for i in range(size_mib) if i not in touched]
    return not check_patterns(path, fmt, zeros)


def qemu_img_compare(a: Path | str, b: Path | str, fmt_a: str | None = None, fmt_b: str | None = None,
                     strict: bool = False) -> bool:
    """``qemu-img compare -U``: True when the guest views are identical.

    A size difference is allowed when the extra part of the larger image reads as
    zeros (qemu-img semantics) unless ``strict``.  Raises on errors (exit code 2).
    """
    args = [QEMU_IMG, "compare", "-U"]
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    if strict:
        args.append("-s")
    proc = _run(args + [str(a), str(b)], check=False)
    if proc.returncode == 0:
        return True
    if proc.returncode == 1:
        return False
    raise ImageError(f"qemu-img compare failed ({proc.returncode}) for {a} vs {b}: {proc.stdout}{proc.stderr}")


def image_info(path: Path | str, fmt: str | None = None, backing_chain: bool = False) -> dict | list:
    """``qemu-img info -U --output=json`` (list of dicts with ``backing_chain``)."""
    import json

    args = [QEMU_IMG, "info", "-U", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    if backing_chain:
        args.append("--backing-chain")
    return json.loads(_run(args + [str(path)]).stdout)


def image_virtual_size(path: Path | str, fmt: str | None = None) -> int:
    return int(image_info(path, fmt)["virtual-size"])


def backing_chain(path: Path | str, fmt: str | None = None) -> list[str]:
    """File names of the chain, top first (``[path, backing, backing-of-backing, ...]``)."""
    return [entry["filename"] for entry in image_info(path, fmt, backing_chain=True)]


def read_guest_bytes(path: Path | str, fmt: str | None, offset: int, length: int) -> bytes:
    """Read guest bytes (converts the whole image to a temporary raw file: small images only)."""
    with tempfile.TemporaryDirectory(prefix="kbtest-read-") as td:
        out = Path(td) / "out.raw"
        args = [QEMU_IMG, "convert", "-U", "-O", "raw"]
        if fmt:
            args += ["-f", fmt]
        _run(args + [str(path), str(out)])
        with open(out, "rb") as f:
            f.seek(offset)
            return f.read(length)


def file_mode_ok_for_qemu(path: Path | str) -> bool:
    """True when every parent directory is world-searchable (QEMU runs as libvirt-qemu)."""
    p = Path(path).resolve()
    dirs = ([p] if p.is_dir() else []) + list(p.parents)
    return all(os.stat(d).st_mode & 0o001 for d in dirs)
