"""Load, validate and normalize the YAML configuration.

The order is fixed: read the YAML -> load the plugins it names under `plugins:` (with the built-in and
entry-point ones) -> validate against the schema those plugins complete (`config_schema`,
`config_validate`). Validation is strict: an unknown key, a wrong type or a bad value is a
ConfigError whose one-line message names the key (``repositories[1].path: required``). With no file
at all, the embedded default backs up into an encrypted borg repository under ``state_dir``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvm_borg import config_cache, config_schema, config_validate
from kvm_borg.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/kvm-borg/config.yaml")
CONFIG_ENV = "KVM_BORG_CONFIG"


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
    plugin_config: dict = field(default_factory=dict)  # {key a plugin contributed: its normalized value}
    retention: dict = field(default_factory=dict)  # rules overriding retention.DEFAULT_POLICY
    domains_retention: dict = field(default_factory=dict)  # {domain: rules overriding `retention`}
    prune_after_backup: bool = False
    max_age: float = 26 * 3600.0  # `kvm-borg status` exits 2 past this age
    metrics_file: str | None = None  # node_exporter textfile written after every run
    store_timeout: float = 12 * 3600.0  # bound on one domain's repository writes; then merged back
    method: str = "auto"  # auto | snapshot | bitmap (method_choice.choose_method decides per domain)
    domains_method: dict = field(default_factory=dict)  # {domain name or glob: method}
    segment_size: int = 4 * 1024**2  # bitmap method: bytes per segment file
    scratch_dir_setting: Path | None = None  # `scratch_dir` as configured; None: state_dir/scratch
    scratch_min_free: int = 1024**3  # bitmap method: refuse to start with less free space in scratch_dir
    full_read: bool = False  # `backup --full`: read every segment this run (CLI only)
    jobs: int = 1  # domains backed up at once (`backup --jobs N` overrides it)
    nice: int | None = None  # niceness of every child (None: kvm-borg's own)
    ionice: str | None = None  # I/O class of every child: idle | best-effort[:N] | realtime[:N] (None: inherit)

    @property
    def child_priority(self):
        """The kvm_borg.priority.ChildPriority of `nice` and `ionice`."""
        from kvm_borg.priority import child_priority

        return child_priority(self.nice, self.ionice)

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

    @property
    def scratch_dir(self) -> Path:
        """The bitmap method's scratch files and NBD sockets: `scratch_dir`, else state_dir/scratch."""
        return self.scratch_dir_setting or self.state_dir / "scratch"


def plugin_schema_contributions(pm) -> list[tuple[str, dict]]:
    """Given a PluginManager, return [(plugin name, what its kvm_borg_config_schema returned)]."""
    hook = pm.hook.kvm_borg_config_schema
    return [(impl.plugin_name, impl.function() or {}) for impl in hook.get_hookimpls()]


def schema_for(pm) -> dict:
    """Given a PluginManager, return the configuration schema: kvm-borg's keys plus every plugin's."""
    return config_schema.combined_schema(plugin_schema_contributions(pm))


def plugin_manager_for(document: dict, cache_dir: Path | None = None):
    """Given the parsed YAML mapping (and the validated-config cache, if any), return the PluginManager
    with the plugins its `plugins:` names (checked against the schema's `plugins` key first) beside the
    built-in and entry-point ones."""
    from kvm_borg.plugins import make_plugin_manager

    names = config_validate.validate_value(config_schema.CORE_KEYS["plugins"], document.get("plugins", []),
                                           "plugins", cache_dir)
    return make_plugin_manager(names)


def embedded_default_repository(state_dir: str, schema: dict) -> dict:
    """Given the state dir and the schema, return the zero-config repository (local borg, encrypted,
    created on first use) with the borg type's defaults."""
    repositories = schema["properties"]["repositories"]
    [repo] = config_validate.normalize(repositories, [{
        "name": "local", "type": "borg", "path": os.path.join(state_dir, "repository"),
        "passphrase_file": os.path.join(state_dir, "passphrase"),
    }], "repositories")
    return {**repo, "auto_init": True}


def validate(data: Any, pm=None) -> dict:
    """Given the parsed YAML document and the PluginManager (default: one with the plugins the document
    names), return the normalized config dict or raise ConfigError."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return config_validate.validate(schema_for(pm or plugin_manager_for(data)), data)


def _yaml_error(exc, source: str) -> ConfigError:
    """Given a ruamel.yaml error, return the one-line ConfigError (a duplicate key is named)."""
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import MarkedYAMLError

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
    duplicate keys refused; a malformed document is a one-line ConfigError.

    ruamel.yaml is imported here, only when a text is parsed (see parse_config_text)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    loader = YAML(typ="safe", pure=True)
    loader.version = (1, 2)
    loader.allow_duplicate_keys = False
    try:
        return loader.load(text)
    except YAMLError as exc:
        raise _yaml_error(exc, source) from None
    except RecursionError:  # deeply nested flow collections
        raise ConfigError(f"{source}: malformed YAML: nested too deeply") from None


def parse_config_text(text: str, source: str, cache_dir: Path | None = None) -> Any:
    """Given a config file's text, its name for messages and the parsed-document cache (None: none), return
    the parsed document as load_yaml does; a text parsed before comes from the cache (config_cache), so
    the YAML parser is not even imported, and a newly parsed one is remembered there."""
    if cache_dir is not None:
        hit, document = config_cache.parsed_document(text, cache_dir)
        if hit:
            return document
    document = load_yaml(text, source)
    if cache_dir is not None:
        config_cache.remember_document(text, document, cache_dir)
    return document


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


def load_config(cli_path: str | None = None, *, progress: bool = False):
    """Given --config (or None), read the configuration, load the plugins it names and validate it
    against their combined schema; return (Settings, PluginManager).

    An explicitly named file that is missing is an error; a missing default file means the
    embedded default (a local encrypted borg repository under state_dir)."""
    path, explicit = config_path_from(cli_path)
    from_file = explicit or path.exists()
    embedded = not from_file
    document: Any = {}
    if from_file:
        document = parse_config_text(read_config_file(path), str(path), config_cache.PARSED_DIR)
        if document is None:
            raise ConfigError(f"{path}: config file has no settings (only comments)")
    if not isinstance(document, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(document).__name__}")
    pm = plugin_manager_for(document, config_cache.VALIDATED_DIR)
    schema = schema_for(pm)
    data = config_validate.validate(schema, document, config_cache.VALIDATED_DIR)
    check_state_dir_owner(data["state_dir"])
    if data["repositories"] is None:
        data["repositories"] = [embedded_default_repository(data["state_dir"], schema)]
        embedded = True
    settings = Settings(
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
        hostname=data["hostname"] or os.uname().nodename,  # = socket.gethostname() on Linux
        repositories=data["repositories"],
        config_path=path if from_file else None,
        embedded_default=embedded,
        progress=progress,
        plugin_config={name: value for name, value in data.items() if name not in config_schema.CORE_KEYS},
        retention=data["retention"],
        domains_retention=data["domains_retention"],
        prune_after_backup=data["prune_after_backup"],
        max_age=data["max_age"],
        metrics_file=data["metrics_file"],
        store_timeout=data["store_timeout"],
        method=data["method"],
        domains_method=data["domains_method"],
        segment_size=data["segment_size"],
        scratch_dir_setting=Path(data["scratch_dir"]) if data["scratch_dir"] else None,
        scratch_min_free=data["scratch_min_free"],
        jobs=data["jobs"],
        nice=data["nice"],
        ionice=data["ionice"],
    )
    return settings, pm


def select_repositories(settings: Settings, names: list[str] | None) -> list[dict]:
    """Given Settings and --repo names (or None for all), return the chosen repository dicts."""
    if not names:
        return list(settings.repositories)
    known = {r["name"]: r for r in settings.repositories}
    for name in names:
        if name not in known:
            raise ConfigError(f"--repo {name}: no such repository (configured: {', '.join(known)})")
    return [known[name] for name in names]
