"""Hostile archives: real kvm-borg archives, edited and stored again (tests/harness/crafted.py), restored.

One small real archive per repository type is made once for the module (a shut-off two-disk
domain, borg and restic) and extracted once; every case crafts a variant of it from a copy of
that extraction. Each attack aims at names that
carry a fresh marker (`kbpwn-<hex>`), so the check "nothing was written outside the target"
is exact even while other tests write to /tmp or /var/lib/libvirt: no path with the marker
may exist under the aimed-at roots afterwards, the quiet roots (/etc/cron.d, /root) and the
target's parent must list the same before and after, and what lands in the target is plain
files only (no symlink, device, FIFO, setuid/setgid or world-writable file).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import DiskSpec, DomainFactory, make_dir, restic_env, run_cli
from harness.crafted import (
    ATTACK_ROOTS,
    QUIET_ROOTS,
    Original,
    Tree,
    borg_original,
    changed,
    craft_borg,
    craft_restic,
    listing,
    marked_paths,
    restic_original,
    special_files,
)
from kvm_borg.restore_plan import safe_file_name
from support import cli_env, write_config, write_passphrase

DISKS = [DiskSpec("vda", "qcow2", 4), DiskSpec("vdb", "raw", 4)]


@dataclass
class Source:
    """The module's real archive: one borg and one restic archive of `domain` (shut off), each
    also extracted once (`borg_original`, `restic_original`: what every craft starts from)."""

    domain: object
    config: Path
    borg_repo: Path
    restic_url: str
    borg_archive: str
    restic_archive: str
    work: Path
    borg_original: Original
    restic_original: Original


@pytest.fixture(scope="module")
def source(libvirt_conn, run_dir, run_id, tmp_path_factory):
    work = make_dir(run_dir / f"hostile-{secrets.token_hex(3)}")
    factory = DomainFactory(libvirt_conn, work, run_id, label="hostile")
    try:
        domain = factory.make(disks=DISKS, running=False, name=f"hostile-{secrets.token_hex(2)}")
        tmp = tmp_path_factory.mktemp("hostile")
        repositories = [
            {"name": "borg", "type": "borg", "path": str(tmp / "borg-repo"),
             "passphrase_file": str(write_passphrase(tmp / "borg.pass"))},
            {"name": "restic", "type": "restic", "url": str(tmp / "restic-repo"),
             "passphrase_file": str(write_passphrase(tmp / "restic.pass"))},
        ]
        config = write_config(work / "kb", repositories)
        proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
        assert proc.returncode == 0, proc.stderr
        stores = {s["repository"]: s["archive"] for s in json.loads(proc.stdout)["domains"][0]["stores"]}
        originals = tmp / "originals"
        yield Source(domain, config, tmp / "borg-repo", str(tmp / "restic-repo"), stores["borg"], stores["restic"],
                     work, borg_original(tmp / "borg-repo", stores["borg"], workdir=originals),
                     restic_original(str(tmp / "restic-repo"), stores["restic"], workdir=originals,
                                     env=restic_env(cache_dir=tmp / "restic-cache")))
    finally:
        errors = factory.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        assert not errors, errors


def craft(source: Source, kind: str, edit, tmp_path: Path, **kw) -> str:
    """Craft a variant of the module's `kind` ("borg"/"restic") archive; return its name."""
    if kind == "borg":
        return craft_borg(source.borg_repo, source.borg_archive, edit, workdir=tmp_path / "craft",
                          original=source.borg_original, **kw)
    return craft_restic(source.restic_url, source.restic_archive, edit, workdir=tmp_path / "craft",
                        env=restic_env(cache_dir=tmp_path / "restic-cache"), original=source.restic_original, **kw)


class Watch:
    """Before/after view of the host paths an attack aims at (see the module docstring)."""

    def __init__(self, marker: str, target: Path):
        self.marker, self.target = marker, target
        self.quiet = (*QUIET_ROOTS, str(target.parent))
        self.before = listing(self.quiet)
        assert marked_paths(marker) == []

    def assert_nothing_outside(self) -> None:
        assert marked_paths(self.marker) == [], f"the attack wrote under {ATTACK_ROOTS}"
        assert changed(self.before, listing(self.quiet)) == [] or \
            changed(self.before, listing(self.quiet)) == [str(self.target)], "a quiet directory changed"

    def assert_target_plain(self) -> None:
        if self.target.exists():
            assert special_files(self.target) == []


def restore(source: Source, kind: str, archive: str, *args):
    return run_cli("restore", source.domain.name, "--repo", kind, "--archive", archive, *args,
                   config=source.config, env=cli_env())


def assert_refused(proc, *words: str) -> str:
    """Exit 2, one line `kvm-borg: error: ...` (no traceback) naming `words`; return that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kvm-borg: error: "), proc.stderr
    for word in words:
        assert word in last, (word, last)
    return last


@pytest.fixture
def marker() -> str:
    return f"kbpwn-{secrets.token_hex(4)}"


# --- the control: an unedited crafted archive restores ------------------------------------------


@pytest.mark.parametrize("kind", ["borg", "restic"])
def test_an_unedited_crafted_archive_restores_like_the_original(source, kind, tmp_path, marker):
    """The harness itself: kvm-borg lists and restores a re-stored archive, so refusals below come from the edits."""
    archive = craft(source, kind, lambda tree: None, tmp_path)
    listed = run_cli("list", source.domain.name, "--repo", kind, "--json", config=source.config, env=cli_env())
    assert archive in [a["name"] for a in json.loads(listed.stdout)], listed.stdout
    target = tmp_path / "target"
    proc = restore(source, kind, archive, "--target-dir", target, "--json")
    assert proc.returncode == 0, proc.stderr
    disks = json.loads(proc.stdout)["disks"]
    assert set(disks) == {"vda", "vdb"}
    for disk, path in disks.items():
        assert Path(path).parent == target
        assert source.domain.verify_fill(disk, path, source.domain.formats[disk])


# --- the crafted archives -------------------------------------------------------------------------


def _staging(tree: Tree) -> str:
    """The archive path of the directory that holds meta.json."""
    return str(tree.meta_path().parent.relative_to(tree.root))


def meta_edit(change):
    """An edit that applies `change(meta, marker, tree)` to meta.json."""
    def edit(tree: Tree, marker: str) -> None:
        meta = tree.meta()
        change(meta, marker, tree)
        tree.write_meta(meta)
    return edit


def _with_nvram(meta, tree, **nvram_fields):
    path = f"{_staging(tree)}/nvram.fd"
    tree.write_file(path, b"VARS" * 1024)
    meta["firmware"] = {**(meta.get("firmware") or {}), "loader": "/usr/share/OVMF/OVMF_CODE_4M.fd",
                        "loader_type": "pflash", "nvram": "/var/lib/libvirt/qemu/nvram/x_VARS.fd"}
    meta["files"]["nvram"] = path
    meta["firmware"].update(nvram_fields)


def _with_tpm(meta, tree, relative="tpm2/tpm2-00.permall", archive_path=None):
    path = f"{_staging(tree)}/tpm/tpm2/tpm2-00.permall"
    tree.write_file(path, b"TPM")
    meta["tpm"] = {"model": "tpm-crb", "version": "2.0"}
    meta["files"]["tpm_state"] = [{"relative": relative, "archive_path": archive_path or path}]


def _backing(meta, tree: Tree | None = None, **layer):
    """Make vdb's image the backing file of vda; with `tree`, vdb also leaves the archived XMLs
    (else the sanitizer rightly drops and warns about a disk that meta.json no longer has)."""
    vdb = next(d for d in meta["disks"] if d["target"] == "vdb")
    meta["disks"][0]["backing_chain"] = [{"path": "/var/lib/libvirt/images/base.raw",
                                          "archive_path": vdb["archive_path"], "format": "raw", **layer}]
    meta["disks"] = [meta["disks"][0]]
    if tree is not None:
        for xml_file in tree.meta_path().parent.glob("domain*.xml"):
            root = ET.fromstring(xml_file.read_text())
            devices = root.find("devices")
            for disk in devices.findall("disk"):
                if disk.find("target").get("dev") == "vdb":
                    devices.remove(disk)
            xml_file.write_text(ET.tostring(root, encoding="unicode"))


def _symlinked_image_dir(tree: Tree) -> None:
    """Move the images' directory out of the tree (beside it) and leave a symlink to it in its place: borg
    stores the symlink, never what lies below it, so the images' paths name nothing stored."""
    directory = tree.path(_image(tree)).parent
    outside = tree.root.parent / f"{tree.root.name}-images-outside"
    shutil.copytree(directory, outside)
    shutil.rmtree(directory)
    os.symlink(outside, directory)


def _image(tree: Tree, target: str = "vda") -> str:
    return next(d["archive_path"] for d in tree.meta()["disks"] if d["target"] == target)


REFUSED = {
    # every path field of meta.json, absolute and with traversal
    "archive_path absolute": ("borg", meta_edit(lambda m, k, t: m["disks"][0].update(
        archive_path=f"/etc/cron.d/{k}")), "absolute"),
    "archive_path traversal": ("restic", meta_edit(lambda m, k, t: m["disks"][0].update(
        archive_path=f"var/lib/../../../../etc/cron.d/{k}")), "outside the archive"),
    "original_source traversal": ("borg", meta_edit(lambda m, k, t: m["disks"][0].update(
        original_source=f"/var/lib/libvirt/images/../../../../etc/cron.d/{k}")), "'..'"),
    "original_source relative": ("borg", meta_edit(lambda m, k, t: m["disks"][0].update(
        original_source=f"../../etc/cron.d/{k}")), "relative"),
    "backing path traversal": ("borg", meta_edit(lambda m, k, t: _backing(
        m, path=f"/var/lib/libvirt/images/../../../etc/cron.d/{k}")), "'..'"),
    "backing archive_path absolute": ("borg", meta_edit(lambda m, k, t: _backing(
        m, archive_path=f"/etc/cron.d/{k}")), "absolute"),
    "backing archive_path traversal": ("restic", meta_edit(lambda m, k, t: _backing(
        m, archive_path=f"../../../../etc/cron.d/{k}")), "outside the archive"),
    "firmware.nvram traversal": ("borg", meta_edit(lambda m, k, t: _with_nvram(
        m, t, nvram=f"/var/lib/libvirt/qemu/nvram/../../../../../etc/cron.d/{k}")), "'..'"),
    "files.nvram absolute": ("borg", meta_edit(lambda m, k, t: (_with_nvram(m, t), m["files"].update(
        nvram=f"/etc/cron.d/{k}"))), "absolute"),
    "files.nvram traversal": ("borg", meta_edit(lambda m, k, t: (_with_nvram(m, t), m["files"].update(
        nvram=f"../../../etc/cron.d/{k}"))), "outside the archive"),
    "tpm relative traversal": ("borg", meta_edit(lambda m, k, t: _with_tpm(
        m, t, relative=f"../../../../etc/cron.d/{k}")), "outside its directory"),
    "tpm relative absolute": ("restic", meta_edit(lambda m, k, t: _with_tpm(
        m, t, relative=f"/etc/cron.d/{k}")), "absolute"),
    "tpm archive_path traversal": ("borg", meta_edit(lambda m, k, t: _with_tpm(
        m, t, archive_path=f"var/../../etc/cron.d/{k}")), "outside the archive"),
    "uuid traversal": ("borg", meta_edit(lambda m, k, t: (_with_tpm(m, t, relative=k), m["domain"].update(
        uuid="../../../../etc/cron.d"))), "UUID"),
    # names
    "format with traversal": ("borg", meta_edit(lambda m, k, t: m["disks"][0].update(
        format=f"raw/../../../etc/cron.d/{k}")), "format"),
    "format with an option": ("restic", meta_edit(lambda m, k, t: m["disks"][0].update(
        format="qcow2 -o backing_file=/etc/shadow")), "format"),
    "backing format bogus": ("borg", meta_edit(lambda m, k, t: _backing(m, format="host_device")), "format"),
    # the archive's files are read as regular files only
    "image is a symlink": ("borg", lambda t, k: t.replace_with_symlink(_image(t), f"/etc/cron.d/{k}"),
                           "not a regular file"),
    "image is a symlink (restic)": ("restic", lambda t, k: t.replace_with_symlink(_image(t), "/etc/shadow"),
                                    "not a regular file"),
    "image is a device node": ("borg", lambda t, k: t.replace_with_device(_image(t, "vdb"), "b", 7, 0),
                               "not a regular file"),
    "image is a device node (restic)": ("restic", lambda t, k: t.replace_with_device(_image(t), "c", 1, 3),
                                        "not a regular file"),
    "image is a hard link to another stored file": ("borg", lambda t, k: (
        t.path(_image(t, "vdb")).unlink(), os.link(t.path(_image(t)), t.path(_image(t, "vdb")))),
        "not a regular file"),
    "image directory is a symlink out of the archive": ("borg", lambda t, k: _symlinked_image_dir(t),
                                                        "archive lacks image of disk"),
    "image is a fifo": ("borg", lambda t, k: t.replace_with_fifo(_image(t)), "not a regular file"),
    "image is a directory": ("borg", lambda t, k: t.replace_with_dir(_image(t)), "not a regular file"),
    "nvram is a symlink": ("borg", lambda t, k: (meta_edit(lambda m, k2, t2: _with_nvram(m, t2))(t, k),
                                                 t.replace_with_symlink(t.meta()["files"]["nvram"],
                                                                        f"/etc/cron.d/{k}")), "not a regular file"),
    "tpm state is a device node": ("restic", lambda t, k: (meta_edit(lambda m, k2, t2: _with_tpm(m, t2))(t, k),
                                                           t.replace_with_device(
                                                               t.meta()["files"]["tpm_state"][0]["archive_path"])),
                                   "not a regular file"),
    "domain xml is a symlink": ("borg", lambda t, k: t.replace_with_symlink(
        t.meta()["files"]["domain_xml"], "/etc/libvirt/qemu.conf"), "not a regular file"),
    "meta.json is a symlink": ("borg", lambda t, k: (t.path(f"{_staging(t)}/real.json").write_text(
        t.meta_path().read_text()), t.replace_with_symlink(f"{_staging(t)}/meta.json", "real.json")),
        "not a regular file"),
    # malformed meta.json
    "meta.json not JSON": ("restic", lambda t, k: t.write_meta(b'{"kvm_borg": 1, "disks": [\xff'), "not valid JSON"),
    "meta.json wrong type": ("borg", meta_edit(lambda m, k, t: m.update(disks={"vda": m["disks"]})), "disks"),
    "meta.json huge number": ("borg", meta_edit(lambda m, k, t: m["disks"][0].update(virtual_size=10 ** 40)),
                              "virtual_size"),
    "meta.json missing key": ("restic", meta_edit(lambda m, k, t: m.pop("files")), "files"),
    "meta.json nested garbage": ("borg", meta_edit(lambda m, k, t: m["disks"][0].update(backing_chain=[[k]])),
                                 "backing_chain"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_archive_is_refused_and_nothing_is_written(source, case, tmp_path, marker):
    kind, edit, words = REFUSED[case]
    archive = craft(source, kind, lambda tree: edit(tree, marker), tmp_path)
    target = tmp_path / "target"
    watch = Watch(marker, target)
    for extra in (("--target-dir", target), ()):  # into a directory, and in place over the local domain
        proc = restore(source, kind, archive, *extra)
        assert_refused(proc, words)
        assert not target.exists()
        watch.assert_nothing_outside()
    assert source.domain.verify_fill("vda") and source.domain.verify_fill("vdb")  # the original is untouched


SANITIZED = {
    # paths that only describe the host the archive came from: shown, never destinations
    "original_source aimed at cron.d": ("borg", meta_edit(lambda m, k, t: m["disks"][0].update(
        original_source=f"/etc/cron.d/{k}"))),
    "backing path aimed at cron.d": ("restic", meta_edit(lambda m, k, t: _backing(m, t, path=f"/etc/cron.d/{k}"))),
    "firmware.nvram aimed at cron.d": ("borg", meta_edit(lambda m, k, t: _with_nvram(
        m, t, nvram=f"/etc/cron.d/{k}"))),
    # modes recorded in meta.json and on the stored file itself are not copied
    "setuid and world-writable modes": ("borg", lambda t, k: (
        t.chmod(_image(t), 0o6777), t.chmod(_image(t, "vdb"), 0o1666),
        meta_edit(lambda m, k2, t2: [d.update(owner={"uid": 0, "gid": 0, "user": "root", "group": "root",
                                                     "mode": 0o6777}) for d in m["disks"]])(t, k))),
    "setuid modes (restic)": ("restic", lambda t, k: (
        t.chmod(_image(t), 0o4755),
        meta_edit(lambda m, k2, t2: m["disks"][0].update(owner={"user": "root", "group": "root",
                                                                "mode": 0o4777}))(t, k))),
}


@pytest.mark.parametrize("case", list(SANITIZED))
def test_hostile_archive_restores_confined_with_local_modes(source, case, tmp_path, marker):
    kind, edit = SANITIZED[case]
    archive = craft(source, kind, lambda tree: edit(tree, marker), tmp_path)
    target = tmp_path / "target"
    watch = Watch(marker, target)
    nvram = f"/var/lib/libvirt/qemu/nvram/{safe_file_name(source.domain.name)}_VARS.fd"
    assert not os.path.lexists(nvram)
    try:
        proc = restore(source, kind, archive, "--target-dir", target, "--json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        watch.assert_nothing_outside()
        watch.assert_target_plain()
        named = list(result["disks"].values()) + [result["xml"]]
        assert all(Path(p).parent == target for p in named), named
        assert result["nvram"] == (nvram if case.startswith("firmware") else None)
        for path in [*target.iterdir()] + ([Path(nvram)] if result["nvram"] else []):
            st = os.lstat(path)  # root's 0600: never the archive's owner or mode
            assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), path
    finally:
        if os.path.lexists(nvram):
            os.unlink(nvram)


def test_the_images_xattrs_and_flags_stay_in_the_archive(source, tmp_path, marker):
    """borg extracts the images itself: of the archive's metadata only the bytes land, never an xattr (a
    capability, a label) or a file flag, whatever the stored file carries; owner and mode are this host's."""
    def edit(tree: Tree) -> None:
        for target in ("vda", "vdb"):
            path = tree.path(_image(tree, target))
            os.setxattr(path, "user.kvm_borg_test", marker.encode())
            os.setxattr(path, "trusted.kvm_borg_test", marker.encode())
            subprocess.run(["chattr", "+d", str(path)], check=True)  # nodump: borg stores Linux flags
            os.chmod(path, 0o4777)

    archive = craft(source, "borg", edit, tmp_path)
    target = tmp_path / "target"
    watch = Watch(marker, target)
    proc = restore(source, "borg", archive, "--target-dir", target, "--json")
    assert proc.returncode == 0, proc.stderr
    disks = json.loads(proc.stdout)["disks"]
    watch.assert_nothing_outside()
    assert sorted(p.name for p in target.iterdir()) == sorted([Path(p).name for p in disks.values()] +
                                                              [f"{source.domain.name}.xml"])  # no leftover
    for disk, path in disks.items():
        assert os.listxattr(path) == [], (disk, os.listxattr(path))
        flags = subprocess.run(["lsattr", "-d", path], capture_output=True, text=True, check=True).stdout.split()[0]
        assert "d" not in flags, flags
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
        assert source.domain.verify_fill(disk, path, source.domain.formats[disk])


@pytest.mark.parametrize("name", ["", "a/b", "../../etc/cron.d/x", "tab\there", "n" * 201])
def test_a_name_libvirt_would_refuse_is_refused_before_anything_is_written(source, name, tmp_path):
    target = tmp_path / "target"
    proc = restore(source, "borg", source.borg_archive, "--name", name, "--target-dir", target, "--define")
    assert_refused(proc, "--name")
    assert not target.exists()
