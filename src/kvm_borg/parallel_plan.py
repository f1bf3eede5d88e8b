"""The decisions of a parallel backup run (`backup --jobs N`), apart from the threads that carry them out
(kvm_borg.pipeline.parallel): how many workers, which domain comes next, the order of the summary and the
line shown when a domain is done. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def worker_count(jobs: int, domains: int) -> int:
    """Given the configured `jobs` and how many domains the run takes, return how many workers to start
    (at least 1, never more than there are domains)."""
    return max(1, min(int(jobs), int(domains)))


def next_domain(started: int, domains: int, stopping: bool) -> int | None:
    """Given how many domains were handed out so far, how many the run takes and whether the run is being
    stopped (an interrupt), return the index of the next domain to start, in the run's order, or None
    (none left, or none may start any more)."""
    if stopping or started >= domains:
        return None
    return started


def in_run_order(domains: Sequence[str], finished: Mapping[int, object]) -> list:
    """Given the run's domains in order and {index: result} of those that finished (in any order),
    return the results in the order of the domains, the sequential run's order; domains that did not
    finish (never started, or interrupted) are left out."""
    return [finished[index] for index in range(len(domains)) if index in finished]


def shows_progress_bars(jobs: int, progress: bool) -> bool:
    """Given `jobs` and whether progress is wanted (a terminal, no --json/--no-progress), return whether
    borg/restic progress bars are drawn: only with one domain at a time (bars of several domains would
    interleave); with jobs > 1 a line per finished domain is shown instead (`finished_line`)."""
    return progress and jobs <= 1


def finished_line(done: int, total: int, result) -> str:
    """Given how many domains are done, how many the run takes and the DomainResult just finished, return
    the line shown for it: `[2/5] web: ok (12.3s)` or `[3/5] db: FAILED (1.0s): <error>`."""
    status = "ok" if result.ok else "FAILED"
    line = f"[{done}/{total}] {result.domain}: {status} ({result.seconds:.1f}s)"
    return f"{line}: {result.error}" if result.error and not result.ok else line
