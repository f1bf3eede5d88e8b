#!/usr/bin/env bash
# One-command setup of kvm-borg on a Debian 12 host.
#
#   sudo bash scripts/setup.sh          # install for use
#   sudo bash scripts/setup.sh --dev    # editable install with test dependencies
#
# Installs the Debian packages (skipped when all are present), creates a venv
# (KVM_BORG_VENV, default /opt/kvm-borg/venv), pip-installs this repository into it,
# links kvm-borg into /usr/local/bin and Debian's libnbd bindings into the venv (the
# bitmap method; the venv's Python must be 3.11 for them), starts virtlogd/libvirtd when
# they are not running and makes /dev/kvm usable by QEMU.  Safe to re-run.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
KB_STEP=setup

DEV=0
usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<EOF

Options:
  --dev        editable install (pip install -e '.[test,bench]') and virtnbdbackup (the benchmark's peer)
  -h, --help   this text
Environment:
  KVM_BORG_VENV=$KB_VENV
  KVM_BORG_PYTHON     interpreter for the venv (default: python3 on PATH if >= 3.11)
  KVM_BORG_SKIP_APT=1 do not touch Debian packages
EOF
}
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; kb_die "unknown argument: $arg" ;;
    esac
done

kb_is_root || kb_die "run me as root: sudo bash scripts/setup.sh $*"
START=$(date +%s)

APT_PACKAGES=(
    libvirt-daemon-system libvirt-clients libvirt-dev
    qemu-system-x86 qemu-utils ovmf
    restic openssh-server e2fsprogs procps
    python3-venv python3-dev gcc pkg-config
    liblz4-dev libzstd-dev libxxhash-dev libacl1-dev libssl-dev
    fuse3 libfuse3-dev util-linux swtpm swtpm-tools
    python3-libnbd libnbd-bin   # the bitmap method's NBD client (libnbd's Python bindings; nbdinfo)
    systemd   # systemd-analyze, for the test of contrib/systemd (works without systemd as PID 1)
    prometheus prometheus-node-exporter   # promtool + the monitoring test (services not started: policy-rc.d)
    rclone   # `rclone serve restic --append-only`: a fleet's shared REST repository (docs/repositories.md) and its test
)
# The benchmark suite (python -m bench, tests/test_bench_smoke.py) compares kvm-borg with virtnbdbackup.
if [ "$DEV" = 1 ]; then APT_PACKAGES+=(virtnbdbackup); fi

# ---------------------------------------------------------------- Debian packages
missing_packages() {
    local p status
    for p in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        [ "${status:0:2}" = "ii" ] || printf '%s\n' "$p"
    done
}

POLICY_RC=/usr/sbin/policy-rc.d
REMOVE_POLICY_RC=0
cleanup() {
    if [ "$REMOVE_POLICY_RC" = 1 ]; then rm -f "$POLICY_RC"; fi
}
trap cleanup EXIT

install_packages() {
    if [ "${KVM_BORG_SKIP_APT:-0}" = 1 ]; then
        kb_log "KVM_BORG_SKIP_APT=1: not checking Debian packages"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || kb_die "apt-get not found: this script supports Debian 12 (bookworm)"
    local missing
    missing=$(missing_packages)
    if [ -z "$missing" ]; then
        kb_log "all ${#APT_PACKAGES[@]} Debian packages are installed"
        return 0
    fi
    # shellcheck disable=SC2086
    kb_log "installing Debian packages: $(echo $missing)"
    export DEBIAN_FRONTEND=noninteractive
    # Without systemd, keep package scripts from trying to start services (we
    # start the daemons ourselves below). With systemd, only Prometheus and its
    # node exporter stay stopped: the monitoring test starts its own on loopback
    # and the admin chooses whether this host runs them (policy-rc.d gets the
    # service or unit name as $1).
    if [ ! -e "$POLICY_RC" ]; then
        if kb_have_systemd; then
            printf '#!/bin/sh\ncase "$1" in prometheus|prometheus.*|prometheus-node-exporter*) exit 101 ;; esac\nexit 0\n' >"$POLICY_RC"
        else
            printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        fi
        chmod 0755 "$POLICY_RC"
        REMOVE_POLICY_RC=1
    fi
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
    cleanup
    REMOVE_POLICY_RC=0
    missing=$(missing_packages)
    [ -z "$missing" ] || kb_die "packages still missing after apt-get install: $missing"
}

# ---------------------------------------------------------------- python + venv
py_ok() {  # py_ok INTERPRETER: true when it exists and is >= 3.11 and has venv
    command -v "$1" >/dev/null 2>&1 &&
        "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

pick_python() {
    local cand
    for cand in ${KVM_BORG_PYTHON:-} python3 /usr/bin/python3; do
        if py_ok "$cand"; then
            # Resolve shims (pyenv) to the real interpreter.
            "$cand" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 1
}

make_venv() {
    local py
    if [ -x "$KB_VENV/bin/python" ] && py_ok "$KB_VENV/bin/python" && "$KB_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        kb_log "using existing venv $KB_VENV ($("$KB_VENV/bin/python" --version 2>&1))"
        return 0
    fi
    py=$(pick_python) || kb_die "no Python >= 3.11 with the venv module found (install python3-venv, or set KVM_BORG_PYTHON)"
    if [ -e "$KB_VENV" ]; then
        kb_warn "$KB_VENV exists but is not a usable venv: recreating it"
        rm -rf "$KB_VENV"
    fi
    kb_log "creating venv $KB_VENV with $py ($("$py" --version 2>&1))"
    mkdir -p "$(dirname "$KB_VENV")"
    "$py" -m venv "$KB_VENV"
}

pip_install() {
    local -a target
    local -a pipargs=(--disable-pip-version-check)
    [ -t 0 ] || pipargs+=(--progress-bar off)
    if [ "$DEV" = 1 ]; then
        target=(-e "$KB_REPO_ROOT[test,bench]")   # bench: tests/test_bench_smoke.py draws the plots
    else
        target=("$KB_REPO_ROOT")
    fi
    kb_log "pip install ${target[*]} (building borgbackup from source takes a few minutes the first time)"
    "$KB_VENV/bin/python" -m pip install "${pipargs[@]}" "${target[@]}"
    [ -x "$KB_VENV/bin/kvm-borg" ] || kb_die "pip install did not create $KB_VENV/bin/kvm-borg"
    [ -x "$KB_VENV/bin/borg" ] || kb_die "pip install did not create $KB_VENV/bin/borg"
    ln -sfn "$KB_VENV/bin/kvm-borg" /usr/local/bin/kvm-borg
    kb_log "linked /usr/local/bin/kvm-borg -> $KB_VENV/bin/kvm-borg"
}

install_packages
make_venv
pip_install
kb_link_libnbd
kb_fix_kvm
kb_fix_swtpm_localca
kb_ensure_daemons

kb_log "done in $(( $(date +%s) - START ))s: venv $KB_VENV$([ "$DEV" = 1 ] && echo ' (dev)'), borg $("$KB_VENV/bin/borg" --version 2>/dev/null | awk '{print $2}'), restic $(restic version 2>/dev/null | awk '{print $2}')"
