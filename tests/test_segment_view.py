"""The NBD client and the FUSE segment view on the real stack (qemu-nbd, FUSE, borg, restic; no libvirt).

A 16 MiB qcow2 gets data, then a persistent bitmap, then more writes; `qemu-nbd -r --bitmap`
exports it. The promises: the dirty map and the allocation read through nbd_client are exactly
what was written; every segment of the view holds the image's bytes (zero segments are 0 bytes);
borg's files cache and restic's parent snapshot skip every segment whose stamp did not change, so
the view reads only the changed one; the `files` view stitches a segment directory back into the
image; start failures name their reason; a leftover view is cleaned up.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from array import array
from pathlib import Path

import pytest

from harness import RESTIC_BIN, restic_env, run_borg
from kvm_borg import mountinfo, nbd_client
from kvm_borg.errors import KvmBorgError
from kvm_borg.segment_view import control
from kvm_borg.segment_view import spec as S
from kvm_borg.segments import dirty_segments, segment_inode, segment_name, zero_segments

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
SEG = 256 * KiB
COUNT = SIZE // SEG
BITMAP = "kbview-b1"
CHAIN = 0x5EC7
# Written after the bitmap was added: (offset, length); the last one writes zeros.
DIRTY_WRITES = [(4 * MiB, 64 * KiB), (9 * MiB + 128 * KiB, 256 * KiB), (12 * MiB, 256 * KiB)]
DIRTY_SEGMENTS = {16, 36, 37, 48}
DATA_SEGMENTS = {0, 1, 2, 3, 16, 24, 25, 36, 37}  # everything else reads as zeros


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


@pytest.fixture
def image(tmp_path) -> tuple[Path, bytes]:
    """A 16 MiB qcow2 with data, a bitmap, and DIRTY_WRITES after it; and its raw content."""
    path = tmp_path / "kbview.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)], check=True)
    qemu_io(path, "write -P 0x11 0 1M", "write -P 0x33 6M 512K")
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), BITMAP], check=True)
    qemu_io(path, "write -P 0x22 4M 64K", f"write -P 0x44 {9 * MiB + 128 * KiB} 256K", "write -z 12M 256K")
    raw = tmp_path / "kbview.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)], check=True)
    return path, raw.read_bytes()


@pytest.fixture
def export(nbd_server):
    """The socket path of `nbd_server`."""
    return nbd_server[0]


@pytest.fixture
def nbd_server(tmp_path, image):
    """`qemu-nbd -r -t -e 4 --bitmap` of the image on a unix socket; yields (socket path, its Popen)."""
    socket = tmp_path / "kbview-nbd.sock"
    server = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "4", "--socket", str(socket), "-f", "qcow2",
                               "--bitmap", BITMAP, str(image[0])], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not socket.exists():
            assert server.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        yield str(socket), server
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.fixture
def views(tmp_path):
    """Start views with `views.start(spec)`; every one is stopped and unmounted after the test."""
    class Views:
        started: list[control.ViewProcess] = []

        def start(self, spec: S.ViewSpec, name: str = "run", **kw) -> control.ViewProcess:
            run = tmp_path / name
            run.mkdir(exist_ok=True)
            view = control.start_view(spec, run / "spec.json", **kw)
            self.started.append(view)
            return view

    registry = Views()
    yield registry
    for view in registry.started:
        control.stop_leftover(view.mountpoint, view.pid)
        assert mountinfo.entry_at(view.mountpoint) is None


def mountpoint(tmp_path, name="kbview-mnt") -> str:
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    return str(path)


def nbd_view_spec(socket: str, mnt: str, stamps, zero: set[int], now_ns: int) -> S.ViewSpec:
    disk = S.NbdDisk(target="vda", socket=socket, export="", virtual_size=SIZE, segment_size=SEG, chain=CHAIN,
                     disk_index=0, stamps=array("Q", stamps), zero=bytes(int(i in zero) for i in range(COUNT)),
                     manifest={"kvm_borg_segments": 1, "target": "vda", "virtual_size": SIZE, "segment_size": SEG,
                               "segment_count": COUNT, "format": "qcow2"}, connections=2)
    return S.ViewSpec(kind="nbd", mountpoint=mnt, disks=(disk,), now_ns=now_ns)


def read_all(directory: str) -> int:
    """Read every file below `directory` to its end; return the bytes read."""
    total = 0
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as handle:
            total += len(handle.read())
    return total


# --- nbd_client ------------------------------------------------------------------------------


def test_the_dirty_map_and_the_allocation_are_what_was_written(export):
    handle = nbd_client.open_export(export, "", ["base:allocation", f"qemu:dirty-bitmap:{BITMAP}"])
    try:
        size = nbd_client.size(handle)
        dirty = nbd_client.extents(handle, f"qemu:dirty-bitmap:{BITMAP}", size)
        allocation = nbd_client.extents(handle, "base:allocation", size)
        data = nbd_client.read(handle, 4 * MiB - 1, 3)
    finally:
        nbd_client.close(handle)
    assert size == SIZE
    assert [(o, n) for o, n, flags in dirty if flags & nbd_client.STATE_DIRTY] == DIRTY_WRITES
    for extents in (dirty, allocation):
        assert extents[0][0] == 0 and sum(n for _, n, _ in extents) == SIZE
    assert zero_segments(allocation, SEG, COUNT, SIZE) == set(range(COUNT)) - DATA_SEGMENTS
    assert dirty_segments([(o, n, bool(f & 1)) for o, n, f in dirty], SEG, COUNT) == DIRTY_SEGMENTS
    assert data == b"\x00\x22\x22"


def test_maps_of_a_disk_past_4_gib_are_read_in_pieces_to_its_end(tmp_path):
    big = tmp_path / "kbview-big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(big), "9G"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(big), BITMAP], check=True)
    qemu_io(big, f"write -P 0x55 {8 * 1024 * MiB + 64 * KiB} 64K")  # past any single 4 GiB request
    socket = tmp_path / "kbview-big.sock"
    server = subprocess.Popen(["qemu-nbd", "-r", "-t", "--socket", str(socket), "-f", "qcow2", "--bitmap", BITMAP,
                               str(big)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not socket.exists():
            assert server.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        handle = nbd_client.open_export(str(socket), "", ["base:allocation", f"qemu:dirty-bitmap:{BITMAP}"])
        size = nbd_client.size(handle)
        dirty = nbd_client.extents(handle, f"qemu:dirty-bitmap:{BITMAP}", size)
        allocation = nbd_client.extents(handle, "base:allocation", size)
        nbd_client.close(handle)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert size == 9 * 1024 * MiB
    written = (8 * 1024 * MiB + 64 * KiB, 64 * KiB)
    assert [(o, n) for o, n, f in dirty if f & nbd_client.STATE_DIRTY] == [written]
    assert [(o, n) for o, n, f in allocation if not f & nbd_client.STATE_ZERO] == [written]
    assert sum(n for _, n, _ in dirty) == sum(n for _, n, _ in allocation) == size


def test_a_context_the_server_does_not_offer_is_an_error(export):
    with pytest.raises(nbd_client.NbdError, match="offers no 'qemu:dirty-bitmap:nosuch'"):
        nbd_client.open_export(export, "", ["qemu:dirty-bitmap:nosuch"])


# --- the nbd view ----------------------------------------------------------------------------


def test_every_segment_holds_the_images_bytes_and_zero_segments_are_empty(tmp_path, image, export, views):
    raw = image[1]
    zero = set(range(COUNT)) - DATA_SEGMENTS
    stamps = [1_000 + i for i in range(COUNT)]
    mnt = mountpoint(tmp_path)
    view = views.start(nbd_view_spec(export, mnt, stamps, zero, now_ns=5_000))
    disk_dir = os.path.join(mnt, "vda")
    names = os.listdir(disk_dir)
    assert names == [segment_name(i, COUNT) for i in range(COUNT)] + ["manifest.json"]  # index order
    for i in range(COUNT):
        path = os.path.join(disk_dir, segment_name(i, COUNT))
        st = os.stat(path)
        assert (st.st_ino, st.st_mtime_ns, st.st_ctime_ns) == (segment_inode(CHAIN, 0, i), stamps[i], stamps[i])
        content = Path(path).read_bytes()
        if i in zero:
            assert st.st_size == 0 and content == b""
            assert raw[i * SEG:(i + 1) * SEG] == bytes(SEG)
        else:
            assert st.st_size == SEG and content == raw[i * SEG:(i + 1) * SEG], f"segment {i}"
    manifest = os.path.join(disk_dir, "manifest.json")
    assert json.loads(Path(manifest).read_text())["segment_count"] == COUNT
    assert os.stat(manifest).st_mtime_ns == os.stat(manifest).st_ctime_ns == 5_000
    with pytest.raises(OSError) as refused:
        open(os.path.join(disk_dir, "00000000"), "r+b")
    assert refused.value.errno == errno.EROFS
    deadline = time.monotonic() + 10  # the live count (progress bars) follows within PROGRESS_SECONDS
    while view.bytes_served() != len(DATA_SEGMENTS) * SEG and time.monotonic() < deadline:
        time.sleep(0.1)
    assert view.bytes_served() == len(DATA_SEGMENTS) * SEG
    stats = view.stop()
    assert stats.clean and stats.bytes_read == {"vda": len(DATA_SEGMENTS) * SEG}
    assert mountinfo.entry_at(mnt) is None


def test_the_next_segments_changed_in_this_run_are_fetched_ahead_once_and_no_others(tmp_path, image, export, views):
    """A reader of a changed segment gets the next changed data segments fetched meanwhile (borg and restic
    read them next); segments of earlier runs (the reader skips them) and zero segments are never fetched
    ahead, and nothing is fetched twice."""
    raw = image[1]
    zero = set(range(COUNT)) - DATA_SEGMENTS
    changed = {16, 20, 24, 25}  # 20 reads as zeros
    stamps = [3_000 if i in changed else 1_000 for i in range(COUNT)]
    mnt = mountpoint(tmp_path)
    spec = nbd_view_spec(export, mnt, stamps, zero, now_ns=4_000)
    view = views.start(S.ViewSpec(kind="nbd", mountpoint=mnt, disks=spec.disks, now_ns=4_000, run_stamp=3_000))
    disk_dir = Path(mnt, "vda")
    assert (disk_dir / "00000016").read_bytes() == raw[16 * SEG:17 * SEG]
    deadline = time.monotonic() + 10  # 24 and 25 come in the background (the live count is 0.5 s behind)
    while view.bytes_served() < 3 * SEG and time.monotonic() < deadline:
        time.sleep(0.1)
    assert view.bytes_served() == 3 * SEG
    for i in (24, 25, 0):  # 24 and 25 from what was fetched ahead; 0 (an earlier run's) on demand
        assert (disk_dir / segment_name(i, COUNT)).read_bytes() == raw[i * SEG:(i + 1) * SEG], f"segment {i}"
    assert view.stop().bytes_read == {"vda": 4 * SEG}


def test_a_read_the_nbd_server_cannot_answer_is_eio_never_zeros(tmp_path, nbd_server, views):
    socket, server = nbd_server
    mnt = mountpoint(tmp_path)
    view = views.start(nbd_view_spec(socket, mnt, [1] * COUNT, set(), now_ns=2))
    assert len(Path(mnt, "vda", "00000000").read_bytes()) == SEG
    server.kill()
    server.wait()
    with pytest.raises(OSError) as failed:
        Path(mnt, "vda", "00000002").read_bytes()
    assert failed.value.errno == errno.EIO
    assert view.stop().clean


def test_two_disks_get_their_own_directories_inodes_and_counts(tmp_path, image, export, views):
    one = nbd_view_spec(export, mountpoint(tmp_path), [1] * COUNT, set(), now_ns=2)
    other = dataclasses.replace(one.disks[0], target="vdb", disk_index=1)
    view = views.start(dataclasses.replace(one, disks=(one.disks[0], other)))
    mnt = one.mountpoint
    assert sorted(os.listdir(mnt)) == ["vda", "vdb"]
    a, b = Path(mnt, "vda", "00000001"), Path(mnt, "vdb", "00000001")
    assert (a.stat().st_ino, b.stat().st_ino) == (segment_inode(CHAIN, 0, 1), segment_inode(CHAIN, 1, 1))
    assert a.read_bytes() == b.read_bytes() == image[1][SEG:2 * SEG]
    assert Path(mnt, "vdb", "00000002").read_bytes() == image[1][2 * SEG:3 * SEG]
    assert view.stop().bytes_read == {"vda": SEG, "vdb": 2 * SEG}


def borg_changes(output: str) -> dict[str, str]:
    """Given borg create --list output, return {file name: status}."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"^([AMEUd-]) (/?\S.*)$", line)
        if match and match.group(1) in "AME":
            found[os.path.basename(match.group(2))] = match.group(1)
    return found


def test_borg_reads_only_the_segment_whose_stamp_changed(tmp_path, image, export, views, borg_repo):
    """...and (sharing the repository, to save a borg run) a files view over `borg mount` of the
    first archive gives back the image."""
    zero = set(range(COUNT)) - DATA_SEGMENTS
    stamps = [1_000] * COUNT
    mnt = mountpoint(tmp_path)
    disk_dir = os.path.join(mnt, "vda")

    view = views.start(nbd_view_spec(export, mnt, stamps, zero, now_ns=2_000))
    first = run_borg("create", "--list", "--filter=AME", f"{borg_repo.path}::one", disk_dir, env=borg_repo.env)
    assert view.stop().bytes_read == {"vda": len(DATA_SEGMENTS) * SEG}
    assert set(borg_changes(first.stderr).values()) == {"A"}
    assert len(borg_changes(first.stderr)) == COUNT + 1

    stamps[16] = 3_000  # the next run: segment 16 changed
    view = views.start(nbd_view_spec(export, mnt, stamps, zero, now_ns=4_000))
    second = run_borg("create", "--list", "--filter=AME", f"{borg_repo.path}::two", disk_dir, env=borg_repo.env)
    assert view.stop().bytes_read == {"vda": SEG}
    # manifest.json carries now_ns, the newest time of its run: borg never memorizes the newest file of a
    # run, so it is always "A"; that is what lets borg memorize segment 16, the newest segment.
    assert borg_changes(second.stderr) == {"00000016": "M", "manifest.json": "A"}

    view = views.start(nbd_view_spec(export, mnt, stamps, zero, now_ns=6_000))  # a run without changes
    third = run_borg("create", "--list", "--filter=AME", f"{borg_repo.path}::three", disk_dir, env=borg_repo.env)
    assert view.stop().bytes_read == {"vda": 0}
    assert borg_changes(third.stderr) == {"manifest.json": "A"}

    archive_mnt = mountpoint(tmp_path, "kbview-borg-mount")
    # borg_env gives BORG_FUSE_IMPL=none (as kvm-borg's own non-mount borg runs): a mount needs pyfuse3 back
    run_borg("mount", f"{borg_repo.path}::one", archive_mnt, env={**borg_repo.env, "BORG_FUSE_IMPL": "pyfuse3"})
    try:
        stitched = mountpoint(tmp_path, "kbview-stitched")
        view = views.start(files_spec(Path(archive_mnt, disk_dir.lstrip("/")), stitched), name="stitch")
        assert Path(stitched, "vda.raw").read_bytes() == image[1]
        assert view.stop().bytes_read == {"vda": len(DATA_SEGMENTS) * SEG}
    finally:
        run_borg("umount", archive_mnt, env=borg_repo.env)


def restic_backup(env, repo: Path, path: str, parent: str | None = None) -> dict:
    argv = [str(RESTIC_BIN), "-r", str(repo), "backup", "--json", "--host", "kbview", path]
    if parent:
        argv += ["--parent", parent]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    return [json.loads(line) for line in proc.stdout.splitlines() if '"summary"' in line][-1]


def test_restic_reads_only_the_segment_whose_stamp_changed(tmp_path, export, views):
    env = restic_env(cache_dir=tmp_path / "restic-cache")
    repo = tmp_path / "restic-repo"
    subprocess.run([str(RESTIC_BIN), "-r", str(repo), "init"], env=env, check=True, capture_output=True)
    zero = set(range(COUNT)) - DATA_SEGMENTS
    stamps = [1_000] * COUNT
    mnt = mountpoint(tmp_path)
    disk_dir = os.path.join(mnt, "vda")

    view = views.start(nbd_view_spec(export, mnt, stamps, zero, now_ns=2_000))
    first = restic_backup(env, repo, disk_dir)
    assert view.stop().bytes_read == {"vda": len(DATA_SEGMENTS) * SEG}
    assert first["files_new"] == COUNT + 1

    stamps[36] = 3_000
    view = views.start(nbd_view_spec(export, mnt, stamps, zero, now_ns=4_000))
    second = restic_backup(env, repo, disk_dir, parent=first["snapshot_id"])
    assert view.stop().bytes_read == {"vda": SEG}
    assert (second["files_new"], second["files_changed"], second["files_unmodified"]) == (0, 2, COUNT - 1)


# --- the files view --------------------------------------------------------------------------


def segment_directory(directory: Path, raw: bytes) -> Path:
    """Write `raw` as a segment directory (0-byte files for all-zero segments) and return it."""
    directory.mkdir()
    for i in range(COUNT):
        part = raw[i * SEG:(i + 1) * SEG]
        (directory / segment_name(i, COUNT)).write_bytes(b"" if part == bytes(len(part)) else part)
    (directory / "manifest.json").write_text(json.dumps({"kvm_borg_segments": 1, "virtual_size": SIZE,
                                                         "segment_size": SEG, "segment_count": COUNT}))
    return directory


def files_spec(directory: Path, mnt: str) -> S.ViewSpec:
    return S.ViewSpec(kind="files", mountpoint=mnt, disks=(S.FilesDisk("vda", str(directory), SIZE, SEG),))


def test_a_files_view_stitches_the_segments_into_the_image(tmp_path, image, views):
    raw = image[1]
    directory = segment_directory(tmp_path / "kbview-segs", raw)
    mnt = mountpoint(tmp_path)
    view = views.start(files_spec(directory, mnt))
    stitched = os.path.join(mnt, "vda.raw")
    assert os.listdir(mnt) == ["vda.raw"]
    assert os.stat(stitched).st_size == SIZE
    assert hashlib.sha256(Path(stitched).read_bytes()).digest() == hashlib.sha256(raw).digest()
    with open(stitched, "rb") as handle:  # a read across a segment boundary
        handle.seek(4 * MiB - 100)
        assert handle.read(200) == raw[4 * MiB - 100:4 * MiB + 100]
    stats = view.stop()
    assert stats.clean and stats.bytes_read == {"vda": len(DATA_SEGMENTS) * SEG}  # zero segments cost nothing

    view = views.start(files_spec(directory, mnt), name="again")
    (directory / "00000001").write_bytes(raw[SEG:SEG + 100])  # shorter than the view was started with
    with open(stitched, "rb") as handle:
        handle.seek(SEG + 4096)
        with pytest.raises(OSError) as failed:
            handle.read(4096)
    assert failed.value.errno == errno.EIO  # never zeros
    view.stop()


def test_a_segment_of_the_wrong_size_stops_the_files_view_from_starting(tmp_path, image, views):
    directory = segment_directory(tmp_path / "kbview-segs", image[1])
    (directory / "00000003").write_bytes(b"x" * 1000)
    mnt = mountpoint(tmp_path)
    with pytest.raises(KvmBorgError, match=r"segment .*00000003 is not a regular file of 0 or 262144 bytes"):
        views.start(files_spec(directory, mnt))
    assert mountinfo.entry_at(mnt) is None


# --- start, stop, leftovers ------------------------------------------------------------------


def test_a_view_that_cannot_start_says_why_and_leaves_nothing_mounted(tmp_path, views):
    mnt = mountpoint(tmp_path)
    spec = nbd_view_spec(str(tmp_path / "no-such.sock"), mnt, [1] * COUNT, set(), now_ns=2)
    with pytest.raises(KvmBorgError, match=r"segment view at .*: cannot open NBD export '' at .*no-such.sock"):
        views.start(spec)
    assert mountinfo.entry_at(mnt) is None


def test_a_killed_view_is_cleaned_up_by_stop_leftover(tmp_path, export, views):
    mnt = mountpoint(tmp_path)
    view = views.start(nbd_view_spec(export, mnt, [1] * COUNT, set(), now_ns=2), outlive_parent=True)
    os.kill(view.pid, signal.SIGKILL)
    view.process.wait()
    assert mountinfo.entry_at(mnt) is not None  # a dead FUSE server leaves its mount
    control.stop_leftover(mnt, view.pid)
    assert mountinfo.entry_at(mnt) is None


def test_a_view_that_does_not_stop_is_killed_and_unmounted(tmp_path, export, views):
    mnt = mountpoint(tmp_path)
    view = views.start(nbd_view_spec(export, mnt, [1] * COUNT, set(), now_ns=2))
    os.kill(view.pid, signal.SIGSTOP)  # as if stuck in a read the NBD server never answers
    stats = view.stop(timeout=1)
    assert view.process.returncode == -signal.SIGKILL
    assert mountinfo.entry_at(mnt) is None
    assert not stats.clean


START_AND_EXIT = textwrap.dedent("""
    import json, sys
    from array import array
    from kvm_borg.segment_view import control, spec as S
    data = json.loads(sys.argv[1])
    view = control.start_view(S.parse(data), sys.argv[2], outlive_parent=sys.argv[3] == "outlive")
    print(view.pid, flush=True)
""")


def start_from_a_parent_that_exits(spec: S.ViewSpec, spec_path: Path, mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", START_AND_EXIT, json.dumps(S.to_json(spec)), str(spec_path), mode],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[0])


def test_a_freeze_view_outlives_its_parent_and_a_backup_view_does_not(tmp_path, export, views):
    outliving = mountpoint(tmp_path, "kbview-freeze")
    (tmp_path / "freeze").mkdir()
    pid = start_from_a_parent_that_exits(nbd_view_spec(export, outliving, [1] * COUNT, set(), now_ns=2),
                                         tmp_path / "freeze" / "spec.json", "outlive")
    try:
        time.sleep(0.5)
        assert control.is_view_process(pid)
        assert len(Path(outliving, "vda", "00000000").read_bytes()) == SEG
    finally:
        control.stop_leftover(outliving, pid)
    assert mountinfo.entry_at(outliving) is None and not control.is_view_process(pid)

    backup = mountpoint(tmp_path, "kbview-backup")
    (tmp_path / "backup").mkdir()
    pid = start_from_a_parent_that_exits(nbd_view_spec(export, backup, [1] * COUNT, set(), now_ns=2),
                                         tmp_path / "backup" / "spec.json", "backup")
    try:
        deadline = time.monotonic() + 20
        while (control.is_view_process(pid) or mountinfo.entry_at(backup) is not None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not control.is_view_process(pid) and mountinfo.entry_at(backup) is None
        assert json.loads((tmp_path / "backup" / "stats.json").read_text())["clean"] is True
    finally:
        control.stop_leftover(backup, pid)


def read_as_nobody(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", path],
                          capture_output=True)


def test_allow_other_lets_another_user_read_a_files_view(tmp_path, image_dir, image, views):
    raw = image[1]
    directory = segment_directory(tmp_path / "kbview-segs", raw)
    shared = mountpoint(image_dir, "kbview-shared")  # image_dir is traversable by other users (0755)
    views.start(S.ViewSpec(kind="files", mountpoint=shared, allow_other=True,
                           disks=(S.FilesDisk("vda", str(directory), SIZE, SEG),)), name="shared")
    private = mountpoint(image_dir, "kbview-private")
    views.start(files_spec(directory, private), name="private")
    assert read_as_nobody(os.path.join(shared, "vda.raw")).stdout == raw
    refused = read_as_nobody(os.path.join(private, "vda.raw"))
    assert refused.returncode != 0 and b"Permission denied" in refused.stderr
