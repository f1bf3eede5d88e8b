#!/usr/bin/env bash
# The one test command: makes sure libvirtd runs, then runs pytest in the venv.
#
#   sudo bash scripts/test.sh [pytest args...]     e.g. -x -k hmp, or tests/test_harness.py
#
# Needs `sudo bash scripts/setup.sh --dev` first (venv: KVM_BORG_VENV, default
# /opt/kvm-borg/venv).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
KB_STEP=test

PY="$KB_VENV/bin/python"
[ -x "$PY" ] || kb_die "no venv at $KB_VENV: run 'sudo bash scripts/setup.sh --dev' first"
"$PY" -c 'import pytest' 2>/dev/null || kb_die "pytest is not installed in $KB_VENV: run 'sudo bash scripts/setup.sh --dev'"

if kb_is_root; then kb_fix_kvm; kb_fix_swtpm_localca; fi
kb_ensure_daemons

cd "$KB_REPO_ROOT"
# Compile the sources once up front. The venv's install is editable, so nothing compiled them, and
# where PYTHONDONTWRITEBYTECODE is set (as on CI) no import writes a .pyc either: every kvm-borg
# process the tests start would compile its ~200 modules again (~0.15 s of CPU each, thousands of
# processes). compileall writes the caches whatever that variable says; unchanged files are skipped.
"$PY" -m compileall -q -j 0 src hooks tests >/dev/null || kb_die "cannot compile the sources (a syntax error?)"
# Run the whole tests/ tree unless the arguments name test paths themselves
# (e.g. tests/test_harness.py or tests/test_x.py::test_y).
paths=(tests)
for arg in "$@"; do
    case "$arg" in -*) continue ;; esac
    if [ -e "${arg%%::*}" ]; then paths=(); break; fi
done
kb_log "$PY -m pytest ${paths[*]} $*"
set +e
"$PY" -m pytest "${paths[@]}" "$@"
rc=$?
set -e
case "$rc" in
    0) kb_log "tests passed" ;;
    5) kb_log "pytest collected no tests (exit 5): treating that as a failure" >&2; exit 1 ;;
    *) kb_log "pytest failed with exit code $rc" >&2 ;;
esac
exit "$rc"
