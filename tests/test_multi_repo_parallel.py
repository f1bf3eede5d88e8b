"""Several repositories from one snapshot, without libvirt: `store_all` writes distinct
repositories at the same time, keeps going past a failing one, and an interrupt stops every
child process the store threads started."""

from __future__ import annotations

import signal
import sys
import threading
import time

import pytest

from kvm_borg.pipeline.store import store_all
from kvm_borg.actions.common import Context
from kvm_borg.errors import KvmBorgError
from kvm_borg.execute import ChildScope, CommandError, call_in_parallel, run_command
from kvm_borg.models import ArchiveRequest, StoreResult
from kvm_borg.plugins import make_plugin_manager

REQUEST = ArchiveRequest(domain="d", archive_name="d-20260101T000000Z", timestamp="20260101T000000Z",
                         files=("/x",), block_devices=(), comment="{}", total_bytes=1)


class SleepingBackend:
    """A backend whose store runs `sleep SECONDS` as a child process (so it can be stopped)."""

    exclusive_writes = False

    def __init__(self, name, location, seconds=1.0, fail=None, stop_signal=signal.SIGTERM):
        self.name, self.location, self.seconds, self.fail = name, location, seconds, fail
        self.stop_signal = stop_signal
        self.started = self.ended = None
        self.returncode = None

    def store(self, request):
        self.started = time.monotonic()
        if self.fail == "raise-kvm":
            raise KvmBorgError(f"repository {self.name!r}: unreachable")
        if self.fail == "raise-bug":
            raise RuntimeError("a bug")
        try:
            result = run_command(["sleep", str(self.seconds)], stop_signal=self.stop_signal)
        except CommandError as exc:
            return StoreResult(self.name, ok=False, error=exc.message)
        finally:
            self.ended = time.monotonic()
        self.returncode = result.returncode
        if result.returncode != 0:
            return StoreResult(self.name, ok=False, error=f"sleep exited {result.returncode}")
        return StoreResult(self.name, ok=True, archive=request.archive_name)


def context():
    return Context(settings=_Settings(None), pm=make_plugin_manager(entry_points=False))


def repos(*backends):
    return [({"name": b.name}, b) for b in backends]


def test_distinct_repositories_are_written_at_the_same_time():
    a, b = SleepingBackend("a", "/srv/a"), SleepingBackend("b", "sftp:u@h:/b")
    results = store_all(context(), "d", repos(a, b), REQUEST)
    assert [r.repository for r in results] == ["a", "b"] and all(r.ok for r in results)
    assert max(a.started, b.started) < min(a.ended, b.ended)  # overlapping: both ran at the same time


def test_repositories_sharing_a_location_are_written_one_after_the_other():
    a, b = SleepingBackend("a", "/srv/same", 0.5), SleepingBackend("b", "/srv/same/", 0.5)
    c = SleepingBackend("c", "/srv/other", 0.5)
    results = store_all(context(), "d", repos(a, b, c), REQUEST)
    assert [r.repository for r in results] == ["a", "b", "c"] and all(r.ok for r in results)
    first, second = sorted((a, b), key=lambda x: x.started)
    assert second.started >= first.ended


def test_a_failing_repository_does_not_fail_the_others():
    good = SleepingBackend("good", "/srv/good", 0.2)
    refused = SleepingBackend("refused", "/srv/refused", fail="raise-kvm")
    buggy = SleepingBackend("buggy", "/srv/buggy", fail="raise-bug")
    results = {r.repository: r for r in store_all(context(), "d", repos(refused, good, buggy), REQUEST)}
    assert results["good"].ok
    assert not results["refused"].ok and "unreachable" in results["refused"].error
    assert not results["buggy"].ok and "a bug" in results["buggy"].error


def test_after_store_hook_runs_in_the_calling_thread_once_per_repository():
    seen = []

    class Recorder:
        from kvm_borg.hookspecs import hookimpl

        @hookimpl
        def kvm_borg_after_store(self, domain, repository, result):
            seen.append((repository, result.ok, threading.current_thread() is threading.main_thread()))

    ctx = context()
    ctx.pm.register(Recorder())
    store_all(ctx, "d", repos(SleepingBackend("a", "/a", 0.1), SleepingBackend("b", "/b", 0.1)), REQUEST)
    assert sorted(seen) == [("a", True, True), ("b", True, True)]


class _Alarm(BaseException):
    pass


def _raise_alarm(signum, frame):
    raise _Alarm()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_in_the_main_thread_stops_every_child_of_the_store_threads(stop_signal):
    backends = [SleepingBackend(n, f"/srv/{n}", 60, stop_signal=stop_signal) for n in ("a", "b", "c")]
    # As in kvm-borg, where kvm_borg.signals handles SIGINT while a backup runs: a handled signal is reset to
    # its default in every child. Without it, pytest started as a shell's background job (SIGINT ignored,
    # as POSIX wants for `cmd &` without job control) would pass the ignored SIGINT on to the children.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.signal(signal.SIGALRM, _raise_alarm)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(_Alarm):
            store_all(context(), "d", repos(*backends), REQUEST)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGINT, previous_int)
    assert all(b.ended is not None for b in backends)  # every store returned: its child was reaped
    # ... stopped by its stop signal (or never started), not after sleeping its 60 s (returncode 0).
    assert all(b.returncode in (None, -stop_signal) for b in backends)


def test_a_stopped_scope_refuses_new_children():
    scope = ChildScope()
    scope.stop()
    with pytest.raises(CommandError, match="interrupted"):
        scope.call(run_command, ["true"])
    assert run_command(["true"]).returncode == 0  # outside the scope nothing changed


def test_a_child_ignoring_its_stop_signal_is_killed():
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', file=sys.stderr, flush=True); time.sleep(60)")
    scope = ChildScope()
    outcome = {}
    ready = threading.Event()

    def work():
        outcome["result"] = scope.call(run_command, [sys.executable, "-c", code],
                                       on_stderr_line=lambda line: ready.set())

    thread = threading.Thread(target=work)
    thread.start()
    assert ready.wait(60), "the child never started"  # bounded: started and ignoring SIGTERM now
    scope.stop()
    thread.join(0.5)
    assert thread.is_alive()  # SIGTERM ignored
    scope.kill()
    thread.join(60)
    assert not thread.is_alive() and outcome["result"].returncode == -signal.SIGKILL


class _Settings:
    def __init__(self, store_timeout):  # None: no bound
        self.store_timeout = store_timeout


@pytest.mark.parametrize("locations", [("/srv/a",), ("/srv/a", "/srv/b"), ("/srv/same", "/srv/same")],
                         ids=["one repository", "two at once", "two one after the other"])
def test_store_timeout_stops_the_writes_and_names_itself(locations):
    backends = [SleepingBackend(f"r{i}", location, 60) for i, location in enumerate(locations)]
    ctx = Context(settings=_Settings(1.0), pm=make_plugin_manager(entry_points=False))
    results = store_all(ctx, "d", repos(*backends), REQUEST)  # returns: the 60 s sleeps were stopped
    assert [r.repository for r in results] == [b.name for b in backends]
    for result in results:
        assert not result.ok and result.error.startswith("store_timeout 1s passed"), result.error
    assert backends[0].returncode == -signal.SIGTERM  # stopped cleanly (borg releases its lock)
    # A repository that was next in line is not even started once the limit passed.
    assert all(b.returncode in (None, -signal.SIGTERM) for b in backends[1:])


def test_repositories_done_before_store_timeout_keep_their_archive():
    fast, slow = SleepingBackend("fast", "/srv/fast", 0.1), SleepingBackend("slow", "/srv/slow", 60)
    ctx = Context(settings=_Settings(10.0), pm=make_plugin_manager(entry_points=False))
    results = {r.repository: r for r in store_all(ctx, "d", repos(fast, slow), REQUEST)}
    assert results["fast"].ok and results["fast"].archive == REQUEST.archive_name
    assert not results["slow"].ok and "store_timeout 10s passed" in results["slow"].error


def test_call_in_parallel_returns_results_in_order_and_reraises_a_calls_error():
    assert call_in_parallel([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]
    with pytest.raises(ValueError):
        call_in_parallel([lambda: 1, lambda: (_ for _ in ()).throw(ValueError("x"))])
