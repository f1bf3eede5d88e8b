"""What the pipeline records of a bitmap-method backup: meta.json's segment fields, the archive's method,
per-disk read reports, directory sizes."""

from kvm_borg import metadata
from kvm_borg.models import DiskReadStats, FreezeResult, FrozenDisk, ReleaseResult
from kvm_borg.pipeline.backup import disk_report
from kvm_borg.sizes import content_size


def _segmented(target="vda"):
    return FrozenDisk(target=target, path=f"/var/lib/kvm-borg/view/u/{target}", driver_type="qcow2",
                      virtual_size=10 << 20, original_source="/img/a.qcow2", layout="segments",
                      segment_size=4 << 20, segment_count=3)


def test_a_segmented_disk_records_its_layout_and_an_image_records_none():
    assert metadata.segment_fields(_segmented()) == {"layout": "segments", "segments": {"size": 4 << 20, "count": 3}}
    image = FrozenDisk(target="vdb", path="/img/b.raw", driver_type="raw", virtual_size=1, original_source="/img/b.raw")
    assert metadata.segment_fields(image) == {}


def test_the_archive_method_is_read_from_the_comment_and_unknown_values_are_not_trusted():
    assert metadata.archive_method({"domain": "web"}) == "snapshot"
    assert metadata.archive_method({"domain": "web", "method": "bitmap"}) == "bitmap"
    assert metadata.archive_method({"domain": "web", "method": "../../etc"}) is None


def test_disk_report_prefers_the_bytes_the_view_served_and_keeps_the_bitmap_reasons(tmp_path):
    image = tmp_path / "b.raw"
    image.write_bytes(b"x" * 1000)
    freeze = FreezeResult(
        disks=[_segmented(), FrozenDisk(target="vdb", path=str(image), driver_type="raw", virtual_size=1000,
                                        original_source=str(image))],
        quiesced=False, consistency="crash-consistent", method="bitmap",
        read_stats=[DiskReadStats("vda", bytes_read=4 << 20, segments_dirty=1, segments_total=3,
                                  full_read_reason=None)],
    )
    report = disk_report(freeze, ReleaseResult(bytes_read={"vda": 123}))
    assert report == [
        {"target": "vda", "bytes_read": 123, "segments_dirty": 1, "segments_total": 3, "full_read_reason": None},
        {"target": "vdb", "bytes_read": 1000, "segments_dirty": None, "segments_total": None,
         "full_read_reason": None},
    ]
    assert disk_report(freeze, ReleaseResult())[0]["bytes_read"] == 4 << 20


def test_content_size_of_a_directory_sums_its_regular_files_without_following_links(tmp_path):
    (tmp_path / "00000000").write_bytes(b"a" * 10)
    (tmp_path / "00000001").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_bytes(b"b" * 5)
    (tmp_path / "link").symlink_to("/etc/passwd")
    assert content_size(str(tmp_path)) == 15


def test_progress_counts_the_bytes_the_source_served_when_it_counts_them():
    from kvm_borg.models import ArchiveRequest
    from kvm_borg.progress import progress_of
    from kvm_borg.pipeline.staging import bytes_to_read

    seen = []
    plain = ArchiveRequest("web", "a", "t", (), (), "{}", 10)
    progress_of(plain, seen.append)(7)
    served = ArchiveRequest("web", "a", "t", (), (), "{}", 10, bytes_served=lambda: 3)
    progress_of(served, seen.append)(7)
    assert seen == [7, 3]
    freeze = FreezeResult(disks=[_segmented()], quiesced=False, consistency="crash-consistent", method="bitmap",
                          read_stats=[DiskReadStats("vda", bytes_read=4 << 20)])
    assert bytes_to_read(freeze) == 10 << 20  # nothing counts what is served: the virtual size
    freeze.bytes_served = lambda: 0
    assert bytes_to_read(freeze) == 4 << 20  # only the changed segments are read
