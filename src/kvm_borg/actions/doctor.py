"""`kvm-borg doctor`: versions, host checks, registered plugins; `--round-trip` proves the whole
chain on a scratch domain (backup into a temporary repository, extract, compare)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from kvm_borg import __version__, journal, method_choice
from kvm_borg.actions.common import Context, backend_for
from kvm_borg.backends.borg import defaults as borg_defaults
from kvm_borg.engine import lifecycle
from kvm_borg.engine.versions import backup_api_problem, binding_version, libvirt_versions
from kvm_borg.errors import EngineError, KvmBorgError
from kvm_borg.plugins import describe_plugins
from kvm_borg.tools import first_line, run_tool

OK, WARN, FAIL = "ok", "warning", "error"

APPARMOR_HINT = (
    "AppArmor is enabled: libvirt's virt-aa-helper must allow QEMU the overlay files; "
    "'Permission denied' on snapshot or block-commit means the profile lacks the overlay or base path "
    "(keep overlays next to the images or add overlay_dir to /etc/apparmor.d/local/abstractions/libvirt-qemu)"
)
SELINUX_HINT = (
    "SELinux is enforcing: overlay_dir must carry the virt_image_t label "
    "(semanage fcontext -a -t virt_image_t 'DIR(/.*)?'; restorecon -R DIR), else QEMU gets 'Permission denied'"
)


def _command_version(argv: list[str]) -> str | None:
    """Given a tool's version argv, return the first line it prints, or None if it is missing or fails."""
    try:
        out = run_tool(argv, timeout=30)
    except KvmBorgError:
        return None
    return first_line(out.stdout or out.stderr)


def security_checks() -> list[tuple[str, str, str]]:
    """Return (check, status, detail) rows for AppArmor and SELinux."""
    rows = []
    apparmor = Path("/sys/module/apparmor/parameters/enabled")
    if apparmor.exists() and apparmor.read_text().strip() == "Y":
        rows.append(("apparmor", WARN, APPARMOR_HINT))
    else:
        rows.append(("apparmor", OK, "not enabled"))
    enforce = Path("/sys/fs/selinux/enforce")
    if enforce.exists() and enforce.read_text().strip() == "1":
        rows.append(("selinux", WARN, SELINUX_HINT))
    else:
        rows.append(("selinux", OK, "not enforcing"))
    return rows


def import_problem(module: str, package: str) -> str | None:
    """Given a module's name and what provides it, return why it does not import here, or None."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # an ImportError, or a broken extension module (OSError, ...)
        return f"{module} does not import ({type(exc).__name__}: {exc}; {package})"
    return None


def bitmap_wanted(settings) -> bool:
    """Given Settings, return whether the configuration insists on the bitmap method anywhere (a `method`
    or `domains_method` of bitmap; `auto` falls back to snapshot where bitmap cannot run)."""
    return settings.method == "bitmap" or "bitmap" in settings.domains_method.values()


def scratch_check(settings) -> tuple[str, str, str]:
    """Given Settings, return the (check, status, detail) row of the bitmap method's scratch_dir: its free
    space (of the nearest existing directory above it when it does not exist yet) against scratch_min_free."""
    path = settings.scratch_dir
    existing = path
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    status = OK if free >= settings.scratch_min_free else WARN
    note = "" if path.exists() else ", created on first bitmap backup"
    return "scratch_dir", status, f"{path} ({free // 2**20} MiB free{note}; scratch_min_free {settings.scratch_min_free // 2**20} MiB)"


def bitmap_method_check(settings, problems: list[str]) -> tuple[str, str, str]:
    """Given Settings and what keeps the bitmap method from running here (empty: nothing), return its
    (check, status, detail) row: a warning only when the configuration asks for it (method or
    domains_method other than snapshot)."""
    if not problems:
        return "bitmap method", OK, "can run (libnbd, pyfuse3, libvirt backup jobs)"
    wanted = bitmap_wanted(settings)
    detail = "cannot run: " + "; ".join(problems)
    fallback = "method auto backs up with snapshot instead" if "auto" in (settings.method, *settings.domains_method.values()) \
        else "not configured: method is snapshot"
    return "bitmap method", WARN if wanted else OK, detail if wanted else f"{detail} ({fallback})"


def bitmap_method_problems(ctx: Context) -> list[str]:
    """Given a Context, return what keeps the bitmap method from running on this host (empty: nothing)."""
    problems = [import_problem(module, source) for module, source in method_choice.BITMAP_MODULES.items()]
    try:
        problems.append(backup_api_problem(ctx.connection.conn))
    except KvmBorgError as exc:  # no connection at all (libvirtd down)
        problems.append(f"libvirt: {exc}")
    return [problem for problem in problems if problem]


def collect_checks(ctx: Context) -> list[tuple[str, str, str]]:
    """Given a Context, return (check, status, detail) rows describing the host."""
    settings = ctx.settings
    rows = [("kvm-borg", OK, __version__), ("libvirt-python", OK, binding_version())]
    try:
        libvirtd, qemu = libvirt_versions(ctx.connection.conn)
        rows.append(("libvirtd", OK, f"{libvirtd} at {settings.libvirt_uri}"))
        rows.append(("qemu", OK, qemu))
    except KvmBorgError as exc:
        rows.append(("libvirtd", FAIL, str(exc)))
    qemu_img = _command_version(["qemu-img", "--version"])
    rows.append(("qemu-img", OK if qemu_img else FAIL, qemu_img or "not found: install qemu-utils"))
    for repo in settings.repositories:
        try:
            backend = backend_for(ctx, repo)
            version = backend.version()
            rows.append((f"repository {repo['name']}", OK, f"{repo['type']} ({version})"))
        except KvmBorgError as exc:
            rows.append((f"repository {repo['name']}", FAIL, str(exc)))
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        rows.append(("/dev/kvm", WARN, "missing: guests run under TCG emulation (slow)"))
    elif kvm.stat().st_mode & 0o066 == 0:
        rows.append(("/dev/kvm", WARN, "only root may open it: QEMU (libvirt-qemu) cannot use KVM"))
    else:
        rows.append(("/dev/kvm", OK, "usable"))
    state = settings.state_dir
    if state.exists():
        free = shutil.disk_usage(state).free
        rows.append(("state_dir", OK, f"{state} ({free // 2**20} MiB free)"))
    else:
        rows.append(("state_dir", OK, f"{state} (created on first backup)"))
    if settings.overlay_dir:
        if settings.overlay_dir.is_dir():
            free = shutil.disk_usage(settings.overlay_dir).free
            status = OK if free >= settings.overlay_min_free else WARN
            rows.append(("overlay_dir", status, f"{settings.overlay_dir} ({free // 2**20} MiB free)"))
        else:
            rows.append(("overlay_dir", FAIL, f"{settings.overlay_dir} does not exist"))
    pending = journal.list_entries(settings.journal_dir)
    if pending:
        names = ", ".join(e.domain for e in pending)
        rows.append(("journal", WARN, f"unfinished backups of {names}: run `kvm-borg recover`"))
    else:
        rows.append(("journal", OK, "no unfinished backup"))
    rows.append(bitmap_method_check(settings, bitmap_method_problems(ctx)))
    if bitmap_wanted(settings):
        rows.append(scratch_check(settings))
    rows.extend(security_checks())
    return rows


# --- round trip -------------------------------------------------------------------------------


def _scratch_domain_xml(name: str, disk: Path, virt_type: str) -> str:
    return f"""<domain type='{virt_type}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_round_trip(ctx: Context) -> tuple[str, str]:
    """Back up a scratch running domain into a temporary borg repository, extract its disk and
    compare it byte for byte; remove everything. Return (status, detail)."""
    from kvm_borg.pipeline.backup import backup_domain  # late: doctor must work without a backend

    settings = ctx.settings
    work = Path(tempfile.mkdtemp(prefix="kvm-borg-doctor-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    name = f"kvm-borg-doctor-{uuid.uuid4().hex[:8]}"
    disk = work / "disk.raw"
    with open(disk, "wb") as handle:
        for i in range(16):
            handle.write(hashlib.sha256(f"{name}-{i}".encode()).digest() * (1 << 15))  # 1 MiB a step
    reference = _sha256(disk)
    passphrase = work / "passphrase"
    passphrase.write_text(uuid.uuid4().hex)
    os.chmod(passphrase, 0o600)
    repo = {"name": "doctor", "type": "borg", "path": str(work / "repo"), "encryption": borg_defaults.DEFAULT_ENCRYPTION,
            "passphrase_file": str(passphrase), "passphrase_command": None,
            "compression": borg_defaults.DEFAULT_COMPRESSION, "chunker_params": borg_defaults.DEFAULT_CHUNKER_PARAMS,
            "lock_wait": 10, "ssh_command": None, "remote_path": None}
    scratch = dataclasses.replace(settings, state_dir=work / "state", repositories=[repo], quiesce="off",
                                  overlay_dir=None)
    scratch_ctx = Context(scratch, ctx.pm, ctx.connection)
    conn = ctx.connection.conn
    dom = None
    try:
        backend = backend_for(scratch_ctx, repo)
        backend.init()
        for virt_type in ("kvm", "qemu"):
            dom = lifecycle.define(conn, _scratch_domain_xml(name, disk, virt_type))
            try:
                lifecycle.start(dom)
                break
            except EngineError:
                lifecycle.remove(conn, name)
                dom = None
        if dom is None:
            return FAIL, "could not start a scratch domain"
        result = backup_domain(scratch_ctx, name, [(repo, backend)], [])
        if not result.ok:
            return FAIL, f"backup failed: {result.error}"
        live = lifecycle.live_xml(dom)
        if ".kvm-borg-" in live:
            return FAIL, "the scratch domain was left on an overlay"
        archive = result.stores[0].archive
        restored = work / "restored.raw"
        backend.extract_file(archive, backend.archive_path(str(disk)), restored)
        if _sha256(restored) != reference:
            return FAIL, "the extracted disk differs from the original"
        return OK, f"backed up, merged back, extracted and compared a 16 MiB disk ({result.seconds:.1f}s)"
    finally:
        if dom is not None:
            lifecycle.remove(conn, name)
        shutil.rmtree(work, ignore_errors=True)


def run_doctor(ctx: Context, round_trip: bool = False, as_json: bool = False) -> int:
    """Print the checks and plugins (and the round trip); return 0, 1 on warnings, 2 on errors."""
    rows = collect_checks(ctx)
    if round_trip:
        rows.append(("round-trip", *run_round_trip(ctx)))
    plugins = describe_plugins(ctx.pm)
    if as_json:
        print(json.dumps({"checks": [{"check": c, "status": s, "detail": d} for c, s, d in rows],
                          "plugins": plugins}, indent=2))
    else:
        for check, status, detail in rows:
            print(f"{status:<8} {check:<22} {detail}")
        print("plugins:")
        for plugin in plugins:
            kind = "built-in" if plugin["builtin"] else "external"
            print(f"  {plugin['name']} ({kind}): {', '.join(plugin['hooks'])}")
    statuses = {s for _, s, _ in rows}
    return 2 if FAIL in statuses else 1 if WARN in statuses else 0


def run_from_args(ctx: Context, args) -> int:
    """Given the Context and the parsed `kvm-borg doctor` arguments, run the checks; return the exit code."""
    return run_doctor(ctx, round_trip=args.round_trip, as_json=args.json)

