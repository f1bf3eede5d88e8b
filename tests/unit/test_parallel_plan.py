"""`backup --jobs N`: the pure decisions (workers, which domain next, the summary's order, progress), the
`--jobs` argument, and the pieces the parallel run stands on: inner ChildScopes stopped with their outer
one, `shielded()` in a worker thread, the in-process write lock of a borg-like repository."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from kvm_borg import parallel_plan, signals
from kvm_borg.actions.backup import parse_jobs
from kvm_borg.errors import Interrupted, KvmBorgError, UsageError
from kvm_borg.execute import ChildScope
from kvm_borg.pipeline.store import location_key, repository_writes


def test_never_more_workers_than_domains_and_at_least_one():
    assert parallel_plan.worker_count(4, 10) == 4
    assert parallel_plan.worker_count(4, 2) == 2
    assert parallel_plan.worker_count(3, 0) == 1


def test_domains_start_in_the_run_order_and_none_once_the_run_is_stopping():
    assert [parallel_plan.next_domain(n, 3, False) for n in range(4)] == [0, 1, 2, None]
    assert parallel_plan.next_domain(1, 3, True) is None


def test_results_come_in_the_run_order_whatever_order_they_finished_in():
    finished = {2: "c", 0: "a"}  # b never finished (interrupted)
    assert parallel_plan.in_run_order(["a", "b", "c"], finished) == ["a", "c"]


def test_progress_bars_only_with_one_domain_at_a_time():
    assert parallel_plan.shows_progress_bars(1, True)
    assert not parallel_plan.shows_progress_bars(2, True)
    assert not parallel_plan.shows_progress_bars(1, False)


def test_the_line_of_a_finished_domain():
    ok = SimpleNamespace(domain="web", ok=True, seconds=12.34, error=None)
    failed = SimpleNamespace(domain="db", ok=False, seconds=1.0, error="repository b failed")
    assert parallel_plan.finished_line(2, 5, ok) == "[2/5] web: ok (12.3s)"
    assert parallel_plan.finished_line(3, 5, failed) == "[3/5] db: FAILED (1.0s): repository b failed"


@pytest.mark.parametrize("text", ["1", "2", "64"])
def test_jobs_from_1_to_64(text):
    assert parse_jobs(text) == int(text)


@pytest.mark.parametrize("text", ["0", "65", "-1", "two", "1.5", ""])
def test_other_jobs_are_bad_input_in_one_line(text):
    with pytest.raises(UsageError, match=r"^--jobs .*: expected a whole number from 1 to 64$"):
        parse_jobs(text)


def test_stopping_an_outer_scope_stops_the_inner_ones_even_those_made_later():
    outer = ChildScope()
    inner = outer.call(ChildScope)
    unrelated = ChildScope()
    outer.stop()
    assert inner.stopped and not unrelated.stopped
    assert outer.call(ChildScope).stopped  # made once the run was stopping: starts nothing


def test_shielded_in_a_worker_thread_leaves_the_main_threads_signal_state_alone():
    seen = []

    def worker():
        with signals.shielded():
            seen.append(signals._state["shielded"])

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [0] and signals._state["shielded"] == 0


def test_check_stop_raises_once_a_stop_was_requested_until_cleared():
    signals.check_stop()
    signals.request_stop(15)
    try:
        with pytest.raises(Interrupted) as caught:
            signals.check_stop()
        assert caught.value.signum == 15
    finally:
        signals.clear_stop()
    signals.check_stop()


class Backend:
    def __init__(self, location, exclusive):
        self.location, self.exclusive_writes = location, exclusive


def test_an_exclusive_repository_is_written_by_one_thread_at_a_time_a_shared_one_by_several():
    for exclusive, expected in ((True, 1), (False, 2)):
        backend, scope, guard = Backend(f"/srv/repo-{exclusive}/", exclusive), ChildScope(), threading.Lock()
        state = {"now": 0, "most": 0}

        def write():
            with repository_writes({"name": "r"}, backend, scope):
                with guard:
                    state["now"] += 1
                    state["most"] = max(state["most"], state["now"])
                time.sleep(0.2)
                with guard:
                    state["now"] -= 1

        threads = [threading.Thread(target=write) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert state["most"] == expected


def test_the_wait_for_an_exclusive_repository_ends_when_the_store_is_stopped():
    backend, holder_scope, waiter_scope = Backend("/srv/held", True), ChildScope(), ChildScope()
    held, release = threading.Event(), threading.Event()

    def hold():
        with repository_writes({"name": "r"}, backend, holder_scope):
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    threading.Timer(0.3, waiter_scope.stop).start()
    try:
        with pytest.raises(KvmBorgError, match="repository r: not written: the run is being stopped"):
            with repository_writes({"name": "r"}, Backend("/srv/held/", True), waiter_scope):
                pass
    finally:
        release.set()
        holder.join()


def test_a_location_key_ignores_a_trailing_slash_and_falls_back_to_the_name():
    assert location_key({"name": "r"}, Backend("/srv/a/", True)) == "/srv/a"
    assert location_key({"name": "r"}, Backend("", True)) == "r"
