# shellcheck shell=bash
# Shared helpers for scripts/setup.sh and scripts/test.sh.  Source it, don't run it.
#
# Environment knobs (all optional):
#   KVM_BORG_VENV          venv location (default /opt/kvm-borg/venv)
#   KVM_BORG_PYTHON        interpreter used to create the venv (default: python3 on PATH
#                          if >= 3.11, else /usr/bin/python3 if >= 3.11)
#   KVM_BORG_LIBVIRT_URI   libvirt URI to check (default qemu:///system)
#   KVM_BORG_DAEMON_WAIT   seconds to wait for libvirtd to answer (default 60)

KB_VENV="${KVM_BORG_VENV:-/opt/kvm-borg/venv}"
KB_URI="${KVM_BORG_LIBVIRT_URI:-qemu:///system}"
KB_DAEMON_WAIT="${KVM_BORG_DAEMON_WAIT:-60}"
KB_KVM_DEV="${KVM_BORG_KVM_DEV:-/dev/kvm}"  # overridable for testing only
KB_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

kb_log()  { printf '[kvm-borg %s] %s\n' "${KB_STEP:-setup}" "$*"; }
kb_warn() { printf '[kvm-borg %s] WARNING: %s\n' "${KB_STEP:-setup}" "$*" >&2; }
kb_die()  { printf '[kvm-borg %s] ERROR: %s\n' "${KB_STEP:-setup}" "$*" >&2; exit 1; }

kb_is_root() { [ "$(id -u)" -eq 0 ]; }

kb_have_systemd() { [ -d /run/systemd/system ]; }

# True when libvirtd answers on $KB_URI.
kb_libvirt_ok() {
    command -v virsh >/dev/null 2>&1 || return 1
    timeout 20 virsh -c "$KB_URI" version >/dev/null 2>&1
}

# Start virtlogd and libvirtd if they are not answering, then wait (bounded) until
# libvirtd answers.  Works with and without systemd as PID 1.
kb_ensure_daemons() {
    if kb_libvirt_ok; then
        kb_log "libvirtd answers on $KB_URI"
        return 0
    fi
    kb_is_root || kb_die "libvirtd does not answer on $KB_URI and I am not root to start it (use sudo)"
    command -v libvirtd >/dev/null 2>&1 || kb_die "libvirtd is not installed: run 'sudo bash scripts/setup.sh' first"

    if kb_have_systemd; then
        kb_log "starting virtlogd and libvirtd with systemctl"
        systemctl start virtlogd.socket virtlogd.service >/dev/null 2>&1 || systemctl start virtlogd || true
        systemctl start libvirtd.service || kb_warn "systemctl start libvirtd failed"
    fi
    # The daemons fork into the background and close stdio themselves; their
    # early output still goes to a file so that nothing keeps our stdout open.
    local start_log=/var/log/libvirt/kvm-borg-daemon-start.log
    mkdir -p /var/log/libvirt
    if ! pgrep -x virtlogd >/dev/null 2>&1; then
        kb_log "starting virtlogd -d"
        virtlogd -d </dev/null >>"$start_log" 2>&1 || { tail -20 "$start_log" >&2; kb_die "could not start virtlogd (see $start_log)"; }
    fi
    if ! pgrep -x libvirtd >/dev/null 2>&1; then
        kb_log "starting libvirtd -d"
        libvirtd -d </dev/null >>"$start_log" 2>&1 || { tail -20 "$start_log" >&2; kb_die "could not start libvirtd (see $start_log)"; }
    fi

    local waited=0
    until kb_libvirt_ok; do
        if [ "$waited" -ge "$KB_DAEMON_WAIT" ]; then
            kb_die "libvirtd did not answer on $KB_URI within ${KB_DAEMON_WAIT}s (see /var/log/libvirt/ or run 'libvirtd -v' in the foreground)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    kb_log "libvirtd answers on $KB_URI (after ${waited}s)"
}

# Make /dev/kvm usable by QEMU (user libvirt-qemu, group kvm) when it exists.
# Only widens permissions when the libvirt-qemu user cannot already open it.
# libvirt runs swtpm_setup as user tss (qemu.conf swtpm_user); its local CA must stay tss's. A
# swtpm_setup run by hand as root leaves root-owned files there and every later vTPM fails to start
# ("Need read/write rights on /var/lib/swtpm-localca/.lock.swtpm-localca for user tss").
kb_fix_swtpm_localca() {
    local dir=/var/lib/swtpm-localca
    [ -d "$dir" ] && id tss >/dev/null 2>&1 || return 0
    if [ -n "$(find "$dir" ! -user tss -print -quit 2>/dev/null)" ]; then
        chown -R tss "$dir"
        kb_log "$dir handed back to user tss (swtpm's local CA)"
    fi
}

kb_fix_kvm() {
    if [ ! -e "$KB_KVM_DEV" ]; then
        kb_log "${KB_KVM_DEV} does not exist: domains will use TCG (virt type 'qemu')"
        return 0
    fi
    local qemu_user=libvirt-qemu
    if ! id "$qemu_user" >/dev/null 2>&1; then
        kb_warn "user $qemu_user does not exist; leaving $KB_KVM_DEV as it is"
        return 0
    fi
    if runuser -u "$qemu_user" -- test -r "$KB_KVM_DEV" -a -w "$KB_KVM_DEV" 2>/dev/null; then
        kb_log "${KB_KVM_DEV} is usable by $qemu_user ($(stat -c '%U:%G %a' "$KB_KVM_DEV"))"
        return 0
    fi
    kb_is_root || { kb_warn "${KB_KVM_DEV} is not usable by $qemu_user and I am not root to fix it"; return 0; }
    getent group kvm >/dev/null 2>&1 || groupadd --system kvm
    id -nG "$qemu_user" | tr ' ' '\n' | grep -qx kvm || usermod -a -G kvm "$qemu_user"
    chgrp kvm "$KB_KVM_DEV"
    chmod g+rw "$KB_KVM_DEV"
    kb_log "${KB_KVM_DEV} is now $(stat -c '%U:%G %a' "$KB_KVM_DEV")"
}

# Make Debian's libnbd Python bindings (python3-libnbd: nbd.py and libnbdmod<EXT_SUFFIX>, built for
# Debian's Python 3.11; not on PyPI) importable in the venv by symlinking them into its purelib.
# Only when the venv's Python has the module's ABI (its EXT_SUFFIX, e.g. .cpython-311-x86_64-linux-gnu.so);
# otherwise a warning that the bitmap method is unavailable, and links made before are removed.
# Re-runnable. KVM_BORG_DIST_PACKAGES overrides Debian's directory (for testing only).
KB_DIST_PACKAGES="${KVM_BORG_DIST_PACKAGES:-/usr/lib/python3/dist-packages}"
kb_link_libnbd() {
    local py="$KB_VENV/bin/python" purelib suffix version name libnbd
    purelib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || kb_die "cannot ask $py for its site-packages"
    suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ -e "$KB_DIST_PACKAGES/nbd.py" ] && [ -e "$KB_DIST_PACKAGES/libnbdmod$suffix" ]; then
        for name in nbd.py "libnbdmod$suffix"; do
            ln -sfn "$KB_DIST_PACKAGES/$name" "$purelib/$name"
        done
        if libnbd=$("$py" -c 'import nbd; print(nbd.NBD().get_version())' 2>/dev/null); then
            kb_log "libnbd $libnbd importable in $KB_VENV (linked from $KB_DIST_PACKAGES): the bitmap method can run"
            return 0
        fi
        kb_unlink_libnbd "$purelib"
        kb_warn "Debian's libnbd bindings do not import into $KB_VENV (Python $version): the bitmap method is unavailable"
        return 0
    fi
    kb_unlink_libnbd "$purelib"
    if "$py" -c 'import nbd' >/dev/null 2>&1; then
        kb_log "libnbd importable in $KB_VENV: the bitmap method can run"
    elif [ ! -e "$KB_DIST_PACKAGES/nbd.py" ]; then
        kb_warn "python3-libnbd is not installed ($KB_DIST_PACKAGES/nbd.py missing): the bitmap method is unavailable"
    else
        kb_warn "the venv runs Python $version, but Debian's python3-libnbd is built for Python 3.11" \
                "($(cd "$KB_DIST_PACKAGES" && echo libnbdmod*.so)): the bitmap method is unavailable;" \
                "make the venv with Python 3.11 (KVM_BORG_PYTHON=/usr/bin/python3.11, after removing $KB_VENV)"
    fi
}

# Remove, from the given site-packages, the libnbd links kb_link_libnbd made (never a real file).
kb_unlink_libnbd() {
    local link
    for link in "$1/nbd.py" "$1"/libnbdmod*.so; do
        if [ -L "$link" ] && [ "$(dirname "$(readlink "$link")")" = "$KB_DIST_PACKAGES" ]; then rm -f "$link"; fi
    done
}
