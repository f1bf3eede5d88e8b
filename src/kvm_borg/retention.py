"""Retention policies: which archives `kvm-borg prune` keeps. Pure functions, no I/O.

A policy is a dict with borg's rule names (`keep_within`, `keep_last`, `keep_hourly`,
`keep_daily`, `keep_weekly`, `keep_monthly`, `keep_yearly`). The most specific policy given is
taken whole, never mixed: `domains_retention: {DOMAIN: {...}}` for that domain, else the
configuration's `retention:`, else the default (7 daily, 4 weekly, 6 monthly). Rules not named
are off. The borg backend hands the policy to `borg prune` (its --keep-* flags are built in
`kvm_borg.backends.borg.commands`); `kept_archives` restates borg's algorithm so the semantics
are written down and tested here, and the restic backend applies it per archive.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from kvm_borg.errors import ConfigError

COUNT_RULES = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
RULES = ("keep_within",) + COUNT_RULES
DEFAULT_POLICY = {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6}

# keep_within: a whole number and one of borg's units (H hours, d days, w weeks, m months of 31
# days, y years of 365 days).
_WITHIN = re.compile(r"^([1-9][0-9]*)([Hdwmy])$")
_WITHIN_HOURS = {"H": 1, "d": 24, "w": 24 * 7, "m": 24 * 31, "y": 24 * 365}

# The period an archive falls into for each counting rule (borg's PRUNING_PATTERNS, in UTC:
# kvm-borg runs borg with TZ=UTC). keep_last counts every archive (borg's "secondly").
_PERIODS: dict[str, Callable[[datetime], object]] = {
    "keep_last": lambda t: t.strftime("%Y-%m-%d %H:%M:%S"),
    "keep_hourly": lambda t: t.strftime("%Y-%m-%d %H"),
    "keep_daily": lambda t: t.strftime("%Y-%m-%d"),
    "keep_weekly": lambda t: t.strftime("%G-%V"),
    "keep_monthly": lambda t: t.strftime("%Y-%m"),
    "keep_yearly": lambda t: t.strftime("%Y"),
}


def check_rules(value: Any, key: str) -> dict:
    """Given a `retention:`-style mapping from the config, return it checked (only the rules given); ConfigError names the key."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping of keep_* rules, got {type(value).__name__}")
    result = {}
    for name, rule in value.items():
        if name not in RULES:
            raise ConfigError(f"{key}.{name}: unknown retention rule (known: {', '.join(RULES)})")
        if name == "keep_within":
            if rule is None or rule == 0:
                result[name] = None
            elif not isinstance(rule, str) or not _WITHIN.match(rule.strip()):
                raise ConfigError(f"{key}.{name}: expected a number and a unit H, d, w, m or y (e.g. 2d), got {rule!r}")
            else:
                result[name] = rule.strip()
        elif isinstance(rule, bool) or not isinstance(rule, int) or rule < 0:
            raise ConfigError(f"{key}.{name}: expected a whole number ≥ 0, got {rule!r}")
        else:
            result[name] = rule
    return result


def merge_policy(*layers: Mapping[str, Any]) -> dict:
    """Given rule mappings from general to specific, return the complete policy (every rule, 0/None when off)."""
    policy: dict[str, Any] = {name: 0 for name in COUNT_RULES}
    policy["keep_within"] = None
    for layer in layers:
        policy.update(layer)
    return policy


def policy_for(domain: str, retention: Mapping[str, Any], domains_retention: Mapping[str, Mapping[str, Any]]) -> dict:
    """Given a domain name and the config's `retention` and `domains_retention`, return its complete policy:
    the domain's own if it has one, else `retention` if given, else DEFAULT_POLICY (one whole, never mixed)."""
    return merge_policy(domains_retention.get(domain) or retention or DEFAULT_POLICY)


def is_empty(policy: Mapping[str, Any]) -> bool:
    """Given a complete policy, return whether it keeps nothing (prune would then delete every archive)."""
    return not policy.get("keep_within") and not any(policy.get(name) for name in COUNT_RULES)


def empty_policy_refusal(domain: str, policy: Mapping[str, Any]) -> str | None:
    """Given a domain and its complete policy, return why a prune of it is refused (the policy keeps nothing,
    so every archive would go), or None when it may run."""
    if is_empty(policy):
        return f"the retention policy of domain '{domain}' keeps nothing: refusing to prune"
    return None


def describe(policy: Mapping[str, Any]) -> str:
    """Given a complete policy, return it as one short line, e.g. 'within 2d, daily 7, weekly 4'."""
    parts = [f"within {policy['keep_within']}"] if policy.get("keep_within") else []
    parts += [f"{name[5:]} {policy[name]}" for name in COUNT_RULES if policy.get(name)]
    return ", ".join(parts) or "nothing"


def within_hours(within: str) -> int:
    """Given a keep_within value, return it in hours the way borg counts (m = 31 days, y = 365 days)."""
    match = _WITHIN.match(within)
    if not match:
        raise ValueError(f"not a keep_within value: {within!r}")
    return int(match.group(1)) * _WITHIN_HOURS[match.group(2)]


def kept_archives(times: Mapping[str, datetime], policy: Mapping[str, Any], now: datetime | None = None) -> dict[str, str]:
    """Given {archive name: UTC time} and a complete policy, return {kept archive: rule that keeps it}.

    Borg's algorithm: keep_within first; then each counting rule from keep_last to keep_yearly
    walks the archives newest first and keeps the newest one of each period not yet kept by an
    earlier rule, up to its count; a rule that runs out of archives also keeps the oldest one."""
    now = now or datetime.now(timezone.utc)
    ordered: Sequence[tuple[str, datetime]] = sorted(times.items(), key=lambda item: item[1], reverse=True)
    kept: dict[str, str] = {}
    if policy.get("keep_within"):
        limit = now - timedelta(hours=within_hours(policy["keep_within"]))
        for name, when in ordered:
            if when > limit:
                kept[name] = "within"
    for rule in COUNT_RULES:
        count = policy.get(rule) or 0
        if not count:
            continue
        period_of, last, chosen = _PERIODS[rule], None, 0
        for name, when in ordered:
            period = period_of(when)
            if period != last:
                last = period
                if name not in kept:
                    kept[name] = rule
                    chosen += 1
                    if chosen == count:
                        break
        if ordered and chosen < count and ordered[-1][0] not in kept:
            kept[ordered[-1][0]] = rule + " (oldest)"
    return kept
