"""The value formats of the configuration schema (its ``format`` keywords): each a pure function
that takes the value as YAML gave it and its key, and returns the normalized value (seconds, bytes,
a resolved path) or raises a ConfigError naming the key.

The schema checks a value's structure (type, keys, ranges); a format parses what is inside a string
(``26h``, ``1GiB``, ``zstd,3``). ``config_validate`` applies them once the structure is valid.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from typing import Any, Callable

from kvm_borg import priority
from kvm_borg.backends.borg import specs as borg_specs
from kvm_borg.errors import ConfigError

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2,
               "g": 1024**3, "gib": 1024**3, "t": 1024**4, "tib": 1024**4,
               "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = 366 * 86400.0  # longer is a typo (and overflows timers), not a wish
MAX_SIZE = 2**60  # 1 EiB
# A state_dir that is one of these would have kvm-borg chmod and fill a system directory.
SYSTEM_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
    "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib",
    "/usr/local", "/usr/sbin", "/usr/share", "/var", "/var/lib", "/var/lib/libvirt", "/var/log", "/var/run",
    "/var/tmp", "/var/cache", "/var/spool",
})


def quote_hint(value: Any) -> str:
    """Given a scalar YAML did not read as a string, return the hint to quote it (else '')."""
    if isinstance(value, (bool, int, float)):
        return " (quote it if you mean the text, e.g. \"off\" or \"123\")"
    return ""


def parse_size(value: Any, key: str) -> int:
    """Given an int (bytes) or a string like '1GiB' / '500M', return bytes; ConfigError names `key`."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 1GiB, got {value!r}")
    if isinstance(value, int) and value >= 0:
        size: float = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise ConfigError(f"{key}: expected a size like 1GiB or 500M, got {value!r}")
        size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not size <= MAX_SIZE:  # also catches inf
        raise ConfigError(f"{key}: {value!r} is too large (at most 1EiB)")
    return int(size)


SEGMENT_ALIGN = 64 * 1024
MAX_SEGMENT = 1024**3


def segment_size(value: Any, key: str) -> int:
    """Given a size for the bitmap method's segments, return bytes: a multiple of 64KiB from 64KiB to 1GiB
    (the granularity of QEMU's dirty bitmaps on a default qcow2 cluster)."""
    size = parse_size(value, key)
    if size % SEGMENT_ALIGN or not SEGMENT_ALIGN <= size <= MAX_SEGMENT:
        raise ConfigError(f"{key}: expected a multiple of 64KiB from 64KiB to 1GiB, got {value!r}")
    return size


def parse_duration(value: Any, key: str) -> float:
    """Given seconds or a string like '90s', '30m', '26h', '7d', return seconds; ConfigError names `key`."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like 30m or 26h, got {value!r}")
    if isinstance(value, (int, float)) and value >= 0:
        seconds = float(min(value, 2 * MAX_DURATION))  # a huge int would overflow float()
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value))
        if not match:
            raise ConfigError(f"{key}: expected a duration like 90s, 30m, 26h or 7d, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ConfigError(f"{key}: {value!r} is too long (at most 366d)")
    return seconds


def positive_duration(value: Any, key: str) -> float:
    """Given a duration where zero makes no sense (a timeout, an age), return seconds > 0."""
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(f"{key}: expected a duration greater than zero, got {value!r}")
    return seconds


def absolute_path(value: str, key: str) -> str:
    """Given a path string, return it if absolute."""
    if not os.path.isabs(value):
        raise ConfigError(f"{key}: expected an absolute path, got {value!r}")
    return value


def state_dir(value: str, key: str) -> str:
    """Given the state_dir string, return it normalized (symlinks resolved); a system directory such as
    / or /etc is refused."""
    path = os.path.realpath(absolute_path(value, key))
    if path in SYSTEM_DIRS:
        raise ConfigError(f"{key}: {value!r} is a system directory ({path}); use a directory of its own "
                          f"such as /var/lib/kvm-borg")
    return path


def scratch_dir(value: str, key: str) -> str:
    """Given the scratch_dir string, return it normalized (symlinks resolved); a system directory such as
    /tmp or /var/tmp is refused (the bitmap method opens its per-run directories in it to QEMU)."""
    path = os.path.realpath(absolute_path(value, key))
    if path in SYSTEM_DIRS:
        raise ConfigError(f"{key}: {value!r} is a system directory ({path}); use a directory of its own "
                          f"such as /var/lib/kvm-borg/scratch")
    return path


def ssh_command(value: str, key: str) -> str:
    """Given a shell-quoted command line, return it when it splits (shlex syntax) into at least one word."""
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: cannot split {value!r}: {exc} (unbalanced quotes?)") from None
    if not words:
        raise ConfigError(f"{key}: expected a command, got {value!r}")
    return value


def http_url(value: str, key: str) -> str:
    """Given a URL string, return it when it is http:// or https:// with a host."""
    if not re.match(r"^https?://[^/\s]+", value):
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
    return value


def quiesce(value: Any, key: str) -> str:
    """Given the quiesce mode (already one of the schema's choices), return it; `false` means off."""
    return "off" if value is False else value


def _spec(check: Callable[[str], str]) -> Callable[[str, str], str]:
    """Given a borg_specs checker (ValueError on a bad spec), return it as a format."""
    def convert(value: str, key: str) -> str:
        try:
            return check(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: bad value {value!r}: {exc}") from None

    return convert


def retention_rules(value: Any, key: str) -> dict:
    """Given a `retention:`-style mapping, return it checked by the retention module's own rules."""
    from kvm_borg import retention

    return retention.check_rules(value, key)


def upload_ratelimit(value: Any, key: str) -> int:
    """Given a repository's upload rate (a size per second: `50MiB`, `50MiB/s`, `800k`, or bytes), return it in
    bytes per second; a rate that rounds to 0 KiB/s (borg and restic take whole KiB/s, 0 meaning
    unlimited) is a ConfigError."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.lower().endswith("/s"):
        text = text[:-2]
    rate = parse_size(text, key)
    if rate_kib_per_second(rate) < 1:
        raise ConfigError(f"{key}: {value!r} rounds to 0 KiB/s, which borg and restic read as unlimited; "
                          "give at least 1KiB (or leave the key out for no limit)")
    return rate


def rate_kib_per_second(rate: int) -> int:
    """Given a rate in bytes per second, return it in whole KiB per second (rounded), as borg's
    `--upload-ratelimit` and restic's `--limit-upload` take it."""
    return int(rate / 1024 + 0.5)


def ionice(value: Any, key: str) -> str:
    """Given an `ionice:` value, return it when it is `idle`, `best-effort[:LEVEL]` or `realtime[:LEVEL]` (LEVEL 0-7)."""
    try:
        priority.parse_ionice(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}{quote_hint(value)}") from None
    return str(value).strip()


FORMATS: dict[str, Callable[[Any, str], Any]] = {
    "size": parse_size,
    "segment-size": segment_size,
    "duration": parse_duration,
    "positive-duration": positive_duration,
    "absolute-path": absolute_path,
    "state-dir": state_dir,
    "scratch-dir": scratch_dir,
    "ssh-command": ssh_command,
    "http-url": http_url,
    "quiesce": quiesce,
    "borg-compression": _spec(borg_specs.check_compression),
    "borg-chunker-params": _spec(borg_specs.check_chunker_params),
    "retention-rules": retention_rules,
    "upload-ratelimit": upload_ratelimit,
    "ionice": ionice,
}
