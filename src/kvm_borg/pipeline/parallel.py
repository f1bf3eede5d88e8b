"""Several domains of one backup run at once (`backup --jobs N`): N worker threads take the domains in the
run's order, each backs one up at a time with the same `backup_domain` a sequential run calls.

Only the main thread receives signals, so it only waits here. Interrupted (SIGTERM, SIGINT, SIGHUP), it
stops handing out domains, asks every worker to stop (`signals.request_stop`: each raises Interrupted
at its next check, so its own `finally` merges its domain back), stops the borg/restic children the
workers started (their ChildScope: SIGTERM, SIGKILL after a grace period), waits until every worker
has ended, however long its merge takes (a second signal does not cut the wait short), and re-raises
the interrupt. The decisions (how many workers, which domain next, the order of the results) are
kvm_borg.parallel_plan's."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from kvm_borg import parallel_plan, signals
from kvm_borg.errors import Interrupted
from kvm_borg.execute import TERMINATE_GRACE_SECONDS, ChildScope

log = logging.getLogger(__name__)

def backup_in_parallel(domains: Sequence[str], jobs: int, backup_one: Callable[[str], object],
                       on_finished: Callable[[int, object], None] | None = None) -> list:
    """Given the run's domain names in order, `jobs` (> 1), a function that backs one domain up and returns
    its DomainResult (it catches its own failures) and an optional `on_finished(index, result)` called in
    this thread as each domain finishes (in any order), back the domains up `jobs` at a time; return their
    results in the order of `domains`. An interrupt propagates (as Interrupted) once every started domain
    has ended, a domain interrupted before its end reports nothing (as in a sequential run): a caller
    that needs the finished ones after an interrupt keeps them from `on_finished`."""
    scope = ChildScope()
    messages: queue.SimpleQueue = queue.SimpleQueue()
    handed = {"started": 0}
    handing = threading.Lock()

    def take() -> int | None:
        with handing:
            index = parallel_plan.next_domain(handed["started"], len(domains),
                                              signals.stop_requested() is not None)
            if index is not None:
                handed["started"] += 1
            return index

    def work() -> None:
        try:
            while (index := take()) is not None:
                try:
                    messages.put((index, scope.call(backup_one, domains[index]), None))
                except BaseException as exc:  # Interrupted at a check, or a bug: told to the main thread
                    messages.put((index, None, exc))
        finally:  # counted by the worker itself: no signal in the main thread can lose it
            with handing:
                alive["count"] -= 1

    workers = parallel_plan.worker_count(jobs, len(domains))
    finished: dict[int, object] = {}
    failures: list[BaseException] = []
    alive = {"count": workers}

    def running() -> bool:
        with handing:
            return alive["count"] > 0 or not messages.empty()

    def receive(timeout: float) -> None:
        index, result, error = messages.get(timeout=timeout)
        if error is not None:
            if not isinstance(error, Interrupted):
                failures.append(error)
            return
        finished[index] = result
        if on_finished is not None:
            on_finished(index, result)

    for number in range(workers):
        threading.Thread(target=work, name=f"kvm-borg-domain-{number}", daemon=True).start()
    try:
        while running():
            try:
                receive(0.2)
            except queue.Empty:
                continue
    except Interrupted as exc:
        log.warning("interrupted: no further domain starts; the running ones are stopped and merged back")
        signals.request_stop(exc.signum)
        scope.stop()
        _wait_for_workers(receive, running, scope)
        raise
    finally:
        signals.clear_stop()
    if failures:
        raise failures[0]
    return parallel_plan.in_run_order(domains, finished)


def _wait_for_workers(receive: Callable[[float], None], running: Callable[[], bool], scope: ChildScope) -> None:
    """Wait until every worker has ended (their merges included, however long they take); SIGKILL the
    process groups of the stopped children (their ssh helpers) once the workers ended or
    TERMINATE_GRACE_SECONDS passed, as a sequential run does. Further signals are ignored."""
    killed = False
    stopped_at = time.monotonic()
    while running():
        if not killed and time.monotonic() - stopped_at >= TERMINATE_GRACE_SECONDS:
            scope.kill()
            killed = True
        try:
            receive(0.2)
        except queue.Empty:
            continue
        except Interrupted:  # a second signal: the merges still have to end
            continue
    if not killed:
        scope.kill()
