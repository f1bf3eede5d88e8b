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
    if ! pgrep -x virtlogd >/dev/null 2>&1; then
        kb_log "starting virtlogd -d"
        virtlogd -d || kb_die "could not start virtlogd"
    fi
    if ! pgrep -x libvirtd >/dev/null 2>&1; then
        kb_log "starting libvirtd -d"
        libvirtd -d || kb_die "could not start libvirtd"
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
kb_fix_kvm() {
    if [ ! -e /dev/kvm ]; then
        kb_log "/dev/kvm does not exist: domains will use TCG (virt type 'qemu')"
        return 0
    fi
    local qemu_user=libvirt-qemu
    if ! id "$qemu_user" >/dev/null 2>&1; then
        kb_warn "user $qemu_user does not exist; leaving /dev/kvm as it is"
        return 0
    fi
    if runuser -u "$qemu_user" -- test -r /dev/kvm -a -w /dev/kvm 2>/dev/null; then
        kb_log "/dev/kvm is usable by $qemu_user ($(stat -c '%U:%G %a' /dev/kvm))"
        return 0
    fi
    kb_is_root || { kb_warn "/dev/kvm is not usable by $qemu_user and I am not root to fix it"; return 0; }
    getent group kvm >/dev/null 2>&1 || groupadd --system kvm
    id -nG "$qemu_user" | tr ' ' '\n' | grep -qx kvm || usermod -a -G kvm "$qemu_user"
    chgrp kvm /dev/kvm
    chmod g+rw /dev/kvm
    kb_log "/dev/kvm is now $(stat -c '%U:%G %a' /dev/kvm)"
}
