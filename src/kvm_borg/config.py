"""Load, validate and normalize the YAML configuration.

Validation is strict: an unknown key, a wrong type or a bad value is a ConfigError whose one-line
message names the key (``repositories[1].path: required``). With no file at all, the embedded
default backs up into an encrypted borg repository under ``state_dir``.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from kvm_borg.backends.borg import specs as borg_specs
from kvm_borg.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/kvm-borg/config.yaml")
CONFIG_ENV = "KVM_BORG_CONFIG"
QUIESCE_MODES = ("auto", "required", "off")

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


def _positive_duration(value: Any, key: str) -> float:
    """A duration where zero makes no sense (a timeout, an age)."""
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(f"{key}: expected a duration greater than zero, got {value!r}")
    return seconds


# --- schema --------------------------------------------------------------------------------
# Each key maps to (checker, default). A checker takes (value, key) and returns the normalized
# value or raises ConfigError naming the key.


def _quote_hint(value: Any) -> str:
    """For a scalar YAML did not read as a string, the hint to quote it."""
    if isinstance(value, (bool, int, float)):
        return " (quote it if you mean the text, e.g. \"off\" or \"123\")"
    return ""


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}{_quote_hint(value)}")
    return value


def _name_key(name: Any, key: str) -> str:
    """Given a mapping key that names something (a domain), return it; a bool/number is refused."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}.{name}: expected a name (a string), got {name!r}{_quote_hint(name)}")
    return name


def _optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda value, key: None if value is None else check(value, key)


def _path(value: Any, key: str) -> str:
    text = _str(value, key)
    if not os.path.isabs(text):
        raise ConfigError(f"{key}: expected an absolute path, got {value!r}")
    return text


def _int(minimum: int, maximum: int = 2**31 - 1) -> Callable[[Any, str], int]:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}: expected a whole number ≥ {minimum}, got {value!r}")
        if value > maximum:
            raise ConfigError(f"{key}: {value!r} is too large (at most {maximum})")
        return value

    return check


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _str_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{key}[{i}]: expected a string, got {item!r}{_quote_hint(item)}")
    return list(value)


def _state_dir(value: Any, key: str) -> str:
    """An absolute path, normalized (symlinks resolved), never a system directory such as / or /etc."""
    path = os.path.realpath(_path(value, key))
    if path in SYSTEM_DIRS:
        raise ConfigError(f"{key}: {value!r} is a system directory ({path}); use a directory of its own "
                          f"such as /var/lib/kvm-borg")
    return path


def _ssh_command(value: Any, key: str) -> str:
    """A shell-quoted command line (shlex syntax) whose words kvm-borg passes on."""
    text = _str(value, key)
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{key}: cannot split {value!r}: {exc} (unbalanced quotes?)") from None
    if not words:
        raise ConfigError(f"{key}: expected a command, got {value!r}")
    return text


def _spec(check: Callable[[str], str]) -> Callable[[Any, str], str]:
    def checker(value: Any, key: str) -> str:
        text = _str(value, key)
        try:
            return check(text)
        except ValueError as exc:
            raise ConfigError(f"{key}: bad value {value!r}: {exc}") from None

    return checker


def _quiesce(value: Any, key: str) -> str:
    if value is False:  # `quiesce: false` (YAML 1.2 reads a bare `off` as the string)
        return "off"
    if not isinstance(value, str) or value not in QUIESCE_MODES:
        raise ConfigError(f"{key}: expected one of auto, required, off, got {value!r}")
    return value


def _one_of(*choices: str) -> Callable[[Any, str], str]:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return value

    return check


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(data: dict, schema: dict, prefix: str) -> dict:
    """Given a mapping and its schema, return it normalized with defaults filled in."""
    unknown = sorted(set(data) - set(schema), key=str)
    if unknown:
        known = ", ".join(sorted(schema))
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known keys: {known})")
    result = {}
    for name, (check, default) in schema.items():
        key = f"{prefix}{name}"
        if name in data:
            result[name] = check(data[name], key)
        elif default is _REQUIRED:
            raise ConfigError(f"{key}: required")
        else:
            result[name] = default() if callable(default) else default
    return result


_REQUIRED = object()


def _domains(value: Any, key: str) -> dict:
    data = _check_keys(_mapping(value, key), _DOMAINS_SCHEMA, f"{key}.")
    excludes = _mapping(data["disks_exclude"], f"{key}.disks_exclude")
    data["disks_exclude"] = {
        _name_key(dom, f"{key}.disks_exclude"): _str_list(targets, f"{key}.disks_exclude.{dom}")
        for dom, targets in excludes.items()
    }
    return data


_DOMAINS_SCHEMA = {
    "include": (_str_list, lambda: ["*"]),
    "exclude": (_str_list, list),
    "disks_exclude": (_mapping, dict),
}

_COMMON_REPOSITORY_SCHEMA = {
    "name": (_str, _REQUIRED),
    "type": (_str, _REQUIRED),
    "passphrase_file": (_optional(_path), None),
    "passphrase_command": (_optional(_str), None),
}

REPOSITORY_SCHEMAS: dict[str, dict] = {
    "borg": {
        **_COMMON_REPOSITORY_SCHEMA,
        "path": (_str, _REQUIRED),
        "encryption": (_str, "repokey-blake2"),
        "compression": (_spec(borg_specs.check_compression), "lz4"),
        "chunker_params": (_spec(borg_specs.check_chunker_params), "fixed,4194304"),
        "lock_wait": (_int(0, 7 * 86400), 60),
        "ssh_command": (_optional(_ssh_command), None),
        "remote_path": (_optional(_str), None),
    },
    "restic": {
        **_COMMON_REPOSITORY_SCHEMA,
        "url": (_str, _REQUIRED),
        "compression": (_optional(_one_of("auto", "off", "max")), None),
        "ssh_command": (_optional(_ssh_command), None),
        "host": (_optional(_str), None),  # --host of new snapshots (default: hostname)
        "hosts": (_optional(_str_list), None),  # whose snapshots list/restore see (default: [host]; "*": all)
    },
}

BORG_ENCRYPTION_MODES = ("none", "authenticated", "authenticated-blake2", "repokey", "keyfile",
                         "repokey-blake2", "keyfile-blake2")


def _repository(value: Any, key: str) -> dict:
    data = _mapping(value, key)
    kind = data.get("type")
    if kind is None:
        raise ConfigError(f"{key}.type: required (one of {', '.join(REPOSITORY_SCHEMAS)})")
    if kind not in REPOSITORY_SCHEMAS:
        raise ConfigError(
            f"{key}.type: unknown repository type {kind!r} (known: {', '.join(REPOSITORY_SCHEMAS)})"
        )
    repo = _check_keys(data, REPOSITORY_SCHEMAS[kind], f"{key}.")
    if repo["passphrase_file"] and repo["passphrase_command"]:
        raise ConfigError(f"{key}: give passphrase_file or passphrase_command, not both")
    if kind == "borg":
        if repo["encryption"] not in BORG_ENCRYPTION_MODES:
            raise ConfigError(f"{key}.encryption: unknown borg encryption mode {repo['encryption']!r}")
        if repo["encryption"] != "none" and not (repo["passphrase_file"] or repo["passphrase_command"]):
            raise ConfigError(f"{key}: an encrypted repository needs passphrase_file or passphrase_command")
    if kind == "restic" and not (repo["passphrase_file"] or repo["passphrase_command"]):
        raise ConfigError(f"{key}: a restic repository needs passphrase_file or passphrase_command")
    return repo


def _repositories(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of repositories")
    repos = [_repository(item, f"{key}[{i}]") for i, item in enumerate(value)]
    names = [r["name"] for r in repos]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"{key}[{i}].name: duplicate repository name {name!r}")
    return repos


def _retention(value: Any, key: str) -> dict:
    from kvm_borg import retention

    return retention.check_rules(value, key)


def _domains_retention(value: Any, key: str) -> dict:
    from kvm_borg import retention

    return {_name_key(dom, key): retention.check_rules(rules, f"{key}.{dom}")
            for dom, rules in _mapping(value, key).items()}


def _url(value: Any, key: str) -> str:
    text = _str(value, key)
    if not re.match(r"^https?://[^/\s]+", text):
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
    return text


def _str_mapping(value: Any, key: str) -> dict:
    data = _mapping(value, key)
    for name, item in data.items():
        if not isinstance(name, str) or not isinstance(item, str):
            raise ConfigError(f"{key}.{name}: expected a string, got {item!r}{_quote_hint(item)}")
    return dict(data)


_WEBHOOK_SCHEMA = {
    "url": (_optional(_url), None),
    "start_url": (_optional(_url), None),
    "success_url": (_optional(_url), None),
    "failure_url": (_optional(_url), None),
    "healthchecks_url": (_optional(_url), None),
    "timeout": (_positive_duration, 10.0),
    "headers": (_str_mapping, dict),
}


def _webhook(value: Any, key: str) -> dict:
    data = _check_keys(_mapping(value, key), _WEBHOOK_SCHEMA, f"{key}.")
    if not any(data[name] for name in ("url", "start_url", "success_url", "failure_url", "healthchecks_url")):
        raise ConfigError(f"{key}: give at least one of url, healthchecks_url, start_url, success_url, failure_url")
    return data


def _guest_commands(value: Any, key: str) -> list:
    """A list of guest commands: each a string (run with /bin/sh -c) or a non-empty list of strings (an argv)."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of commands, got {value!r}")
    for i, command in enumerate(value):
        if isinstance(command, str) and command.strip():
            continue
        if isinstance(command, list) and command and all(isinstance(a, str) for a in command):
            continue
        raise ConfigError(f"{key}[{i}]: expected a command string or a list of strings, got {command!r}")
    return list(value)


_PREFREEZE_DOMAIN_SCHEMA = {
    "before": (_guest_commands, list),
    "after": (_guest_commands, list),
    "timeout": (_positive_duration, 60.0),
    "required": (_bool, False),
}


def _prefreeze(value: Any, key: str) -> dict:
    return {_name_key(dom, key): _check_keys(_mapping(spec, f"{key}.{dom}"), _PREFREEZE_DOMAIN_SCHEMA, f"{key}.{dom}.")
            for dom, spec in _mapping(value, key).items()}


SCHEMA = {
    "libvirt_uri": (_str, "qemu:///system"),
    "state_dir": (_state_dir, "/var/lib/kvm-borg"),
    "overlay_dir": (_optional(_path), None),
    "overlay_min_free": (parse_size, 1024**3),
    "quiesce": (_quiesce, "auto"),
    "guest_agent_timeout": (_positive_duration, 10.0),
    "commit_timeout": (_positive_duration, 3600.0),
    "commit_retries": (_int(1, 100), 5),
    "store_timeout": (_positive_duration, 12 * 3600.0),
    "domains": (_domains, lambda: {"include": ["*"], "exclude": [], "disks_exclude": {}}),
    "plugins": (_str_list, list),
    "borg_binary": (_optional(_path), None),
    "restic_binary": (_optional(_path), None),
    "hostname": (_optional(_str), None),
    "repositories": (_repositories, None),
    "retention": (_retention, dict),
    "domains_retention": (_domains_retention, dict),
    "prune_after_backup": (_bool, False),
    "max_age": (_positive_duration, 26 * 3600.0),
    "metrics_file": (_optional(_path), None),
    "webhook": (_optional(_webhook), None),
    "prefreeze": (_prefreeze, dict),
}


@dataclass
class Settings:
    """The validated configuration plus how it was loaded. Plugins receive this object."""

    libvirt_uri: str
    state_dir: Path
    overlay_dir: Path | None
    overlay_min_free: int
    quiesce: str
    guest_agent_timeout: float
    commit_timeout: float
    commit_retries: int
    domains: dict
    plugins: list[str]
    borg_binary: str | None
    restic_binary: str | None
    hostname: str
    repositories: list[dict]
    config_path: Path | None = None
    embedded_default: bool = False
    progress: bool = False
    extra: dict = field(default_factory=dict)
    retention: dict = field(default_factory=dict)  # rules overriding retention.DEFAULT_POLICY
    domains_retention: dict = field(default_factory=dict)  # {domain: rules overriding `retention`}
    prune_after_backup: bool = False
    max_age: float = 26 * 3600.0  # `kvm-borg status` exits 2 past this age
    metrics_file: str | None = None  # node_exporter textfile written after every run
    webhook: dict | None = None  # kvm_borg_hooks.webhook
    prefreeze: dict = field(default_factory=dict)  # kvm_borg_hooks.prefreeze: {domain: {before, after, ...}}
    store_timeout: float = 12 * 3600.0  # bound on one domain's repository writes; then merged back

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / "journal"

    @property
    def lock_dir(self) -> Path:
        """Host-wide, whatever the config: two configs must still exclude each other per domain."""
        from kvm_borg.locks import LOCK_DIR

        return LOCK_DIR

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / "staging"


def embedded_default_repository(state_dir: str) -> dict:
    """Given the state dir, return the zero-config repository: local, encrypted, created on first use."""
    return {
        "name": "local",
        "type": "borg",
        "path": os.path.join(state_dir, "repository"),
        "encryption": "repokey-blake2",
        "passphrase_file": os.path.join(state_dir, "passphrase"),
        "passphrase_command": None,
        "compression": "lz4",
        "chunker_params": "fixed,4194304",
        "lock_wait": 60,
        "ssh_command": None,
        "remote_path": None,
        "auto_init": True,
    }


def validate(data: Any) -> dict:
    """Given the parsed YAML document, return the normalized config dict or raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return _check_keys(data, SCHEMA, "")


def _yaml_error(exc: YAMLError, source: str) -> ConfigError:
    """Given a ruamel.yaml error, return the one-line ConfigError (a duplicate key is named)."""
    mark = exc.problem_mark if isinstance(exc, MarkedYAMLError) else None
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if isinstance(exc, DuplicateKeyError):
        found = re.search(r'found duplicate key "(.*?)"', exc.problem or "")
        name = found.group(1) if found else "?"
        return ConfigError(f"{source}: duplicate key {name!r}{where} (each key may appear once per mapping)")
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError(f"{source}: malformed YAML{where}: {problem}")


def load_yaml(text: str, source: str = "config") -> Any:
    """Given YAML text, return the parsed document with YAML 1.2 scalars (`off`, `no` stay strings) and
    duplicate keys refused; a malformed document is a one-line ConfigError."""
    loader = YAML(typ="safe", pure=True)
    loader.version = (1, 2)
    loader.allow_duplicate_keys = False
    try:
        return loader.load(text)
    except YAMLError as exc:
        raise _yaml_error(exc, source) from None
    except RecursionError:  # deeply nested flow collections
        raise ConfigError(f"{source}: malformed YAML: nested too deeply") from None


def parse_text(text: str, source: str = "config") -> dict:
    """Given YAML text, return the normalized config dict; malformed YAML is a one-line ConfigError."""
    return validate(load_yaml(text, source))


def read_config_file(path: Path) -> str:
    """Given the path of an explicitly named config file, return its text; anything that is not a
    readable, non-empty UTF-8 file is a one-line ConfigError."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{path}: config file is a directory") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line})") from None
    if not text.strip():
        raise ConfigError(f"{path}: config file is empty (delete it to use the embedded default)")
    return text


def check_state_dir_owner(state_dir: str, euid: int | None = None) -> None:
    """Given the normalized state_dir, refuse it (ConfigError) when we run as root and it, or the
    nearest existing directory above it, is not owned by root: another user could swap overlays,
    journal entries or the passphrase under us."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return
    path = state_dir
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    owner = os.lstat(path).st_uid
    if owner != 0:
        what = "state_dir" if path == state_dir else f"state_dir's parent {path}"
        raise ConfigError(f"state_dir: {what} is owned by uid {owner}, not root; refusing to use it")


def config_path_from(cli_path: str | None) -> tuple[Path, bool]:
    """Given --config (or None), return (path, explicit): flag, then $KVM_BORG_CONFIG, then /etc."""
    if cli_path:
        return Path(cli_path), True
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]), True
    return DEFAULT_CONFIG_PATH, False


def load_settings(cli_path: str | None = None, *, progress: bool = False) -> Settings:
    """Given --config (or None), read and validate the configuration and return Settings.

    An explicitly named file that is missing is an error; a missing default file means the
    embedded default (a local encrypted borg repository under state_dir)."""
    path, explicit = config_path_from(cli_path)
    embedded = False
    from_file = explicit or path.exists()
    if from_file:
        document = load_yaml(read_config_file(path), str(path))
        if document is None:
            raise ConfigError(f"{path}: config file has no settings (only comments)")
        data = validate(document)
    else:
        data, embedded = validate({}), True
    check_state_dir_owner(data["state_dir"])
    if data["repositories"] is None:
        data["repositories"] = [embedded_default_repository(data["state_dir"])]
        embedded = True
    return Settings(
        libvirt_uri=data["libvirt_uri"],
        state_dir=Path(data["state_dir"]),
        overlay_dir=Path(data["overlay_dir"]) if data["overlay_dir"] else None,
        overlay_min_free=data["overlay_min_free"],
        quiesce=data["quiesce"],
        guest_agent_timeout=data["guest_agent_timeout"],
        commit_timeout=data["commit_timeout"],
        commit_retries=data["commit_retries"],
        domains=data["domains"],
        plugins=data["plugins"],
        borg_binary=data["borg_binary"],
        restic_binary=data["restic_binary"],
        hostname=data["hostname"] or socket.gethostname(),
        repositories=data["repositories"],
        config_path=path if from_file else None,
        embedded_default=embedded,
        progress=progress,
        retention=data["retention"],
        domains_retention=data["domains_retention"],
        prune_after_backup=data["prune_after_backup"],
        max_age=data["max_age"],
        metrics_file=data["metrics_file"],
        webhook=data["webhook"],
        prefreeze=data["prefreeze"],
        store_timeout=data["store_timeout"],
    )


def select_repositories(settings: Settings, names: list[str] | None) -> list[dict]:
    """Given Settings and --repo names (or None for all), return the chosen repository dicts."""
    if not names:
        return list(settings.repositories)
    known = {r["name"]: r for r in settings.repositories}
    for name in names:
        if name not in known:
            raise ConfigError(f"--repo {name}: no such repository (configured: {', '.join(known)})")
    return [known[name] for name in names]
