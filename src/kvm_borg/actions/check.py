"""`kvm-borg check`: check the consistency of each repository (and, if asked, its data).

borg: `borg check` (`--verify-data` reads and authenticates every chunk); restic: `restic check`
(`--read-data-subset PCT` reads that share of the pack files). The result of each repository
goes into the run state and the metrics (`kvm_borg_last_check_success`, `..._timestamp_seconds`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict

from kvm_borg import run_record, run_state
from kvm_borg.actions.common import Context, print_json, usable_repositories
from kvm_borg.errors import KvmBorgError, UsageError, exit_code
from kvm_borg.models import CheckResult

log = logging.getLogger(__name__)


def parse_subset(value: str) -> str:
    """Given --read-data-subset's value, return it as restic takes it ("10%", "1/5"); a bad value is a UsageError."""
    text = value.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%?", text)
    if match and 0 < float(match.group(1)) <= 100:
        return match.group(1) + "%"
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if match and 0 < int(match.group(1)) <= int(match.group(2)):
        return text
    raise UsageError(f"--read-data-subset {value}: expected a percentage like 10% or a part like 1/5")


def run_check(ctx: Context, repo_names: list[str] | None, verify_data: bool, subset: str | None) -> list[CheckResult]:
    """Given --repo names (None: all), check each repository; return their CheckResults (recorded in the run state)."""
    results = []
    for repo, backend in usable_repositories(ctx, repo_names):
        log.info("checking repository %s%s", repo["name"],
                 " (verifying all data)" if verify_data else f" (reading {subset} of the data)" if subset else "")
        try:
            result = backend.check(verify_data=verify_data, read_data_subset=subset)
        except KvmBorgError as exc:
            result = CheckResult(repo["name"], ok=False, error=str(exc))
        if not result.ok:
            log.error("repository %s: check failed: %s", repo["name"], result.error)
        results.append(result)
        run_record.update_state(ctx.settings, lambda state, result=result: run_state.record_check(state, result))
    return results


def run_from_args(ctx: Context, args) -> int:
    subset = parse_subset(args.read_data_subset) if args.read_data_subset else None
    results = run_check(ctx, args.repo, args.verify_data, subset)
    if args.json:
        print_json([asdict(r) for r in results])
    else:
        for result in results:
            state = "ok" if result.ok else f"FAILED: {result.error}"
            print(f"{result.repository}: {state} ({result.mode}, {result.seconds:.1f}s)")
            for warning in result.warnings:
                print(f"  warning: {warning}")
    return exit_code(failed=any(not r.ok for r in results), warned=any(r.warnings for r in results))
