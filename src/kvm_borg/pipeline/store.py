"""Store: one archive request into every repository of the run, in parallel where they live apart."""

from __future__ import annotations

import contextlib
import logging
import threading

from kvm_borg.errors import KvmBorgError
from kvm_borg.execute import ChildScope, call_in_parallel, duration_text, stop_scope_after
from kvm_borg.models import ArchiveRequest, StoreResult
from kvm_borg.plugins import notify

log = logging.getLogger(__name__)

# One lock per repository location whose backend takes one writer at a time (borg): two domains of a
# parallel run (`backup --jobs N`) take turns here instead of racing for borg's own repository lock.
_write_locks: dict[str, threading.Lock] = {}
_write_locks_guard = threading.Lock()
LOCK_POLL_SECONDS = 0.2


def location_key(repo: dict, backend) -> str:
    """Given a repository's config dict and its backend, return the key of where it lives (its
    `location`, else its name, without a trailing slash): repositories with one key are one place."""
    return str(backend.location or repo["name"]).rstrip("/")


@contextlib.contextmanager
def repository_writes(repo: dict, backend, scope: ChildScope):
    """Given a repository, its backend and the store's ChildScope, hold the repository's in-process write
    lock for the block when the backend takes one writer at a time (`exclusive_writes`), else nothing.
    The wait ends with a KvmBorgError when the scope is stopped meanwhile (an interrupt, store_timeout)."""
    if not backend.exclusive_writes:
        yield
        return
    key = location_key(repo, backend)
    with _write_locks_guard:
        lock = _write_locks.setdefault(key, threading.Lock())
    if not lock.acquire(blocking=False):
        log.info("repository %s: waiting until another domain of this run has written it", repo["name"])
        while not lock.acquire(timeout=LOCK_POLL_SECONDS):
            if scope.stopped:
                raise KvmBorgError(f"repository {repo['name']}: not written: the run is being stopped")
    try:
        yield
    finally:
        lock.release()


def store_all(ctx, name: str, backends, request: ArchiveRequest) -> list[StoreResult]:
    """Given the run context (settings, plugin manager), a domain name, [(repo dict, backend)] and one
    ArchiveRequest, store it into every repository; return their StoreResults in the given order.

    One failing repository does not stop the others. Repositories at distinct locations are
    written at the same time, one thread each; those sharing a location (a backend's
    `location`) one after the other. An interrupt stops every child process and propagates,
    so the caller still merges the overlays back. When `store_timeout` passes, the children
    still running are stopped (see `execute.stop_scope_after`) and every repository not done
    by then fails with "store_timeout ... passed".

    A repository whose backend takes one writer at a time (borg) is written by one domain of the run
    at a time (`repository_writes`); the wait for it counts in the domain's store_timeout."""
    scope = ChildScope()
    timeout = ctx.settings.store_timeout

    def store_one(repo, backend, expired) -> StoreResult:  # expired: the Event set once store_timeout passed
        try:
            with repository_writes(repo, backend, scope):
                result = backend.store(request)
        except KvmBorgError as exc:
            result = StoreResult(repository=repo["name"], ok=False, error=str(exc))
        except Exception as exc:  # a backend's bug must not cost the other repositories their archive
            log.exception("domain '%s': repository %s: unexpected error", name, repo["name"])
            result = StoreResult(repository=repo["name"], ok=False, error=f"unexpected error: {exc}")
        if not result.ok and expired.is_set():
            result.error = f"store_timeout {duration_text(timeout)} passed: the repository writes were stopped"
        return result

    def report(repo, result: StoreResult) -> None:
        if not result.ok:
            log.error("domain '%s': repository %s failed: %s", name, repo["name"], result.error)
        else:
            log.info(
                "domain '%s': stored %s in %s (%d bytes read, %d bytes added) in %.1fs",
                name, result.archive, repo["name"], result.original_size, result.deduplicated_size, result.seconds,
            )
        notify(ctx.pm, "kvm_borg_after_store", domain=name, repository=repo["name"], result=result)

    groups: dict[str, list] = {}
    for repo, backend in backends:
        groups.setdefault(location_key(repo, backend), []).append((repo, backend))
    with stop_scope_after(scope, timeout) as expired:
        if len(groups) <= 1:
            results = []
            for repo, backend in backends:
                results.append(scope.call(store_one, repo, backend, expired))
                report(repo, results[-1])
            return results

        group_list = list(groups.values())
        by_name: dict[str, StoreResult] = {}

        def finished(index: int, group_results: list[StoreResult]) -> None:
            for (repo, _backend), result in zip(group_list[index], group_results):
                by_name[repo["name"]] = result
                report(repo, result)

        calls = [lambda group=group: [store_one(repo, backend, expired) for repo, backend in group] for group in group_list]
        call_in_parallel(calls, finished, scope=scope)
        return [by_name[repo["name"]] for repo, _backend in backends]
