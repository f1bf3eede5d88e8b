"""Store: one archive request into every repository of the run, in parallel where they live apart."""

from __future__ import annotations

import logging

from kvm_borg.errors import KvmBorgError
from kvm_borg.execute import ChildScope, call_in_parallel, duration_text, stop_scope_after
from kvm_borg.models import ArchiveRequest, StoreResult
from kvm_borg.plugins import notify

log = logging.getLogger(__name__)


def store_all(ctx, name: str, backends, request: ArchiveRequest) -> list[StoreResult]:
    """Given the run context (settings, plugin manager), a domain name, [(repo dict, backend)] and one
    ArchiveRequest, store it into every repository; return their StoreResults in the given order.

    One failing repository does not stop the others. Repositories at distinct locations are
    written at the same time, one thread each; those sharing a location (a backend's
    `location`) one after the other. An interrupt stops every child process and propagates,
    so the caller still merges the overlays back. When `store_timeout` passes, the children
    still running are stopped (see `execute.stop_scope_after`) and every repository not done
    by then fails with "store_timeout ... passed"."""
    scope = ChildScope()
    timeout = ctx.settings.store_timeout

    def store_one(repo, backend, expired) -> StoreResult:  # expired: the Event set once store_timeout passed
        try:
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
        location = str(backend.location or repo["name"]).rstrip("/")
        groups.setdefault(location, []).append((repo, backend))
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
