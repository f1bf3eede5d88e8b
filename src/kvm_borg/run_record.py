"""Remember results between runs: update the run state (kvm_borg.run_state) and rewrite the
Prometheus textfile from it (kvm_borg.metrics), so domains a run did not touch keep their series.

Used by the backup pipeline's explicit steps and by `kvm-borg prune`, `check` and `status --refresh`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kvm_borg import metrics, run_state

log = logging.getLogger(__name__)


def write_metrics(settings, state: dict) -> str | None:
    """Given the Settings and the run state, rewrite the metrics textfile if one is configured; return
    the warning (logged) when it cannot be written, else None."""
    if not settings.metrics_file:
        return None
    try:
        metrics.write_textfile(settings.metrics_file, metrics.render(state))
    except OSError as exc:
        warning = f"cannot write metrics_file {settings.metrics_file}: {exc.strerror or exc}"
        log.warning("%s", warning)
        return warning
    return None


def update_state(settings, change: Callable[[dict], dict]) -> list[str]:
    """Given the Settings and a state -> state function, record it in the run state and rewrite the
    metrics; return the warnings (logged) of the metrics file that could not be written. A run state
    that cannot be written raises OSError."""
    state = run_state.update(settings.state_dir, change)
    warning = write_metrics(settings, state)
    return [warning] if warning else []
