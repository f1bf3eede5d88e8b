"""Built-in plugin: after every backup run, remember the results, prune if configured, write the metrics.

Registered like any plugin (plugins.DEFAULT_PLUGINS). After `kvm-borg backup`:
1. the RunSummary goes into the run state (kvm_borg.run_state), read by `kvm-borg status`;
2. with `prune_after_backup: true`, each domain that succeeded is pruned in the repositories it
   was stored in (kvm_borg.actions.prune);
3. with `metrics_file:` set, the Prometheus textfile is rewritten from the whole run state, so
   domains this run did not touch keep their series.
`kvm-borg prune` and `kvm-borg check` go through `update_state` too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kvm_borg import metrics, run_state
from kvm_borg.hookspecs import hookimpl

log = logging.getLogger(__name__)


def write_metrics(settings, state: dict) -> None:
    """Given the Settings and the run state, rewrite the metrics textfile if one is configured (errors are logged)."""
    if not settings.metrics_file:
        return
    try:
        metrics.write_textfile(settings.metrics_file, metrics.render(state))
    except OSError as exc:
        log.warning("cannot write metrics_file %s: %s", settings.metrics_file, exc.strerror or exc)


def update_state(settings, change: Callable[[dict], dict]) -> dict:
    """Given the Settings and a state -> state function, record it in the run state and rewrite the metrics."""
    state = run_state.update(settings.state_dir, change)
    write_metrics(settings, state)
    return state


@hookimpl
def kvm_borg_backup_finished(summary, settings):
    """Record the run, prune after it if configured, and rewrite the metrics."""
    if settings is None:
        return
    configured = [repo["name"] for repo in settings.repositories]
    update_state(settings, lambda state: run_state.record_backup(state, summary, configured))
    if settings.prune_after_backup and any(result.ok for result in summary.domains):
        from kvm_borg.actions.common import make_context
        from kvm_borg.actions.prune import prune_after_backup

        ctx = make_context(settings)
        try:
            for outcome in prune_after_backup(ctx, summary):
                for result in outcome["results"]:
                    if result.ok:
                        log.info("pruned domain '%s' in %s: %d kept, %d deleted", result.domain,
                                 outcome["repository"], len(result.kept), len(result.pruned))
                    else:
                        log.warning("prune after backup: domain '%s' in %s: %s", result.domain,
                                    outcome["repository"], result.error)
                if outcome["error"]:
                    log.warning("prune after backup: repository %s: %s", outcome["repository"], outcome["error"])
        finally:
            ctx.close()
