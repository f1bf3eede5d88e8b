"""The configuration schema: kvm-borg's own top-level keys, the building blocks plugins use for theirs,
and `combined_schema`, which joins the keys and repository types every plugin contributes through
the `kvm_borg_config_schema` hook into one JSON schema (draft 7).

The schema is the one source for validation, defaults (``default``), the `kvm-borg config generate`
sample and the README's key table (``description``, ``examples``). Besides standard JSON schema it
uses a few annotations that `config_validate` reads:

- ``format``: a kvm-borg format from `config_formats.FORMATS` (``duration``, ``size``, ...), applied
  after the structure is valid; it parses the value and normalizes it (``26h`` -> 93600.0);
- ``x-expected``: what the error says was expected (``expected a list of strings, got ...``);
- ``x-message``: the whole error message of a rule (``{value!r}`` is the offending value);
- ``x-unique``: ``{"key": ..., "message": ...}`` on an array of mappings whose ``key`` must differ;
- ``x-default-text``: how the README and the sample describe a default that is not a plain value.
"""

from __future__ import annotations

from typing import Any

from kvm_borg.errors import ConfigError

# --- building blocks ------------------------------------------------------------------------


def key(schema: dict, description: str, **annotations: Any) -> dict:
    """Given a value schema, its description and further keywords (default, examples...), return the key's schema."""
    return {**schema, "description": description, **annotations}


def optional(schema: dict) -> dict:
    """Given a value schema, return it also accepting null, with null as its default (the key is unset)."""
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None], "default": None}
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return {**schema, "type": [*types, "null"], "default": None}


def whole_number(minimum: int, maximum: int = 2**31 - 1) -> dict:
    """Return the schema of an integer in [minimum, maximum]."""
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def one_of(*choices: str) -> dict:
    """Return the schema of a string that is one of `choices`."""
    return {"enum": list(choices), "x-expected": f"one of {', '.join(choices)}"}


STRING = {"type": "string", "minLength": 1}
BOOLEAN = {"type": "boolean"}
ABSOLUTE_PATH = {**STRING, "format": "absolute-path"}
HTTP_URL = {**STRING, "format": "http-url"}
SSH_COMMAND = {**STRING, "format": "ssh-command"}
STRING_LIST = {"type": "array", "items": {**STRING, "x-expected": "a string"}, "x-expected": "a list of strings"}
# A duration: seconds, or a number and a unit (90s, 30m, 26h, 7d, 2w).
DURATION = {"type": ["string", "number"], "format": "duration"}
POSITIVE_DURATION = {"type": ["string", "number"], "format": "positive-duration"}
SIZE = {"type": ["string", "integer"], "format": "size"}
# A repository's upload rate: a size per second (50MiB, 50MiB/s), normalized to bytes per second.
UPLOAD_RATELIMIT = key(optional({"type": ["string", "integer"], "format": "upload-ratelimit"}),
                       "upload rate limit, a size per second (`50MiB`); borg's `--upload-ratelimit` (ssh "
                       "repositories only), restic's `--limit-upload`", examples=["50MiB"],
                       **{"x-default-text": "unset: no limit"})


def named_mapping(values: dict, expected: str = "a mapping") -> dict:
    """Given the schema of each value, return the schema of a mapping from names (domains) to such values."""
    return {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": values,
            "x-expected": expected}


def mapping(properties: dict, required: tuple[str, ...] = (), **extra: Any) -> dict:
    """Given the schemas of a mapping's keys (and which are required), return a schema that refuses other keys."""
    schema = {"type": "object", "properties": properties, "additionalProperties": False, **extra}
    if required:
        schema["required"] = list(required)
    return schema


_NOT_NULL = {"not": {"type": "null"}}


def any_of_keys(names: tuple[str, ...], message: str) -> dict:
    """Return a rule: at least one of `names` is given (not null); else the error is `message`."""
    return {"anyOf": [{"required": [name], "properties": {name: _NOT_NULL}} for name in names],
            "x-message": message}


# The passphrase keys of an encrypted repository, shared by the borg and restic schemas.
PASSPHRASE_KEYS = {
    "passphrase_file": key(optional(ABSOLUTE_PATH), "file holding the passphrase, mode 0600 (read by kvm-borg, "
                                                    "handed over through a pipe)"),
    "passphrase_command": key(optional(STRING), "command printing the passphrase (e.g. `pass show borg`)"),
}
PASSPHRASE_NOT_BOTH = {
    "not": {"required": ["passphrase_file", "passphrase_command"],
            "properties": {"passphrase_file": _NOT_NULL, "passphrase_command": _NOT_NULL}},
    "x-message": "give passphrase_file or passphrase_command, not both",
}

# --- kvm-borg's own keys --------------------------------------------------------------------

REPOSITORY_COMMON_KEYS = {
    "name": key(STRING, "the repository's name (`--repo NAME`)"),
    "type": key(STRING, "which backend stores into it"),
}

CORE_KEYS: dict[str, dict] = {
    "libvirt_uri": key(STRING, "libvirt connection", default="qemu:///system"),
    "state_dir": key({**STRING, "format": "state-dir"},
                     "journal, run state, staging files, overlays of block devices; a directory of its own "
                     "owned by root (never /, /etc, /var, /var/lib ...)", default="/var/lib/kvm-borg"),
    "overlay_dir": key(optional(ABSOLUTE_PATH), "where snapshot overlays are created",
                       examples=["/var/lib/libvirt/overlays"], **{"x-default-text": "unset: next to each image"}),
    "overlay_min_free": key(SIZE, "refuse to start when an overlay directory has less free space", default="1GiB"),
    "method": key(one_of("auto", "snapshot", "bitmap"),
                  "how a domain is backed up: `snapshot` (external snapshot, every image read whole), `bitmap` "
                  "(a libvirt backup job: only the segments changed since the last run are read), `auto` "
                  "(bitmap for a running domain with a qcow2 v3 disk where the bitmap method can run, else snapshot)",
                  default="auto"),
    "domains_method": key(named_mapping(one_of("auto", "snapshot", "bitmap"),
                                        "a mapping of domain names or globs to methods"),
                          "per domain name or glob, the `method` (the exact name first, else the first glob "
                          "that matches)", default={}, examples=[{"db-*": "bitmap", "legacy01": "snapshot"}]),
    "segment_size": key({**SIZE, "format": "segment-size"},
                        "bitmap method: a disk is stored as segment files of this size (a multiple of 64KiB, "
                        "64KiB to 1GiB); changing it reads every disk in full once", default="4MiB"),
    "scratch_dir": key(optional({**STRING, "format": "scratch-dir"}),
                       "bitmap method: where the backup job's scratch files and NBD socket live (must be "
                       "reachable by QEMU; a directory of its own, never /tmp, /var/tmp ...)",
                       **{"x-default-text": "`state_dir/scratch`"}),
    "scratch_min_free": key(SIZE, "bitmap method: refuse to start when scratch_dir has less free space",
                            default="1GiB"),
    "quiesce": key({"enum": ["auto", "required", "off", False], "format": "quiesce",
                    "x-expected": "one of auto, required, off"},
                   "`auto`: quiesce when the guest agent answers, else crash-consistent + warning; `required`; `off`",
                   default="auto"),
    "guest_agent_timeout": key(POSITIVE_DURATION, "how long to wait for the agent's ping", default="10s"),
    "store_timeout": key(POSITIVE_DURATION,
                         "bound on one domain's repository writes: when it passes, borg/restic are stopped "
                         "(cleanly, their locks released), the repositories not done count as failed "
                         "(`store_timeout 12h passed`, exit 2) and the guest is merged back", default="12h"),
    "commit_timeout": key(POSITIVE_DURATION,
                          "bound on the whole merge back, retries included (past it the journal entry stays and "
                          "the message names the `kvm-borg recover` command)", default="1h"),
    "commit_retries": key(whole_number(1, 100), "attempts to merge back", default=5),
    "jobs": key(whole_number(1, 64), "domains `backup` works on at once (`--jobs` overrides it); writes into "
                                     "one borg repository still go one domain at a time", default=1),
    "domains": key(mapping({
        "include": key(STRING_LIST, "globs of the domains `--all` takes", default=["*"]),
        "exclude": key(STRING_LIST, "globs of the domains `--all` leaves out", default=[]),
        "disks_exclude": key(named_mapping(STRING_LIST), "per domain, the disk targets to leave out",
                             default={}, examples=[{"web01": ["vdb"]}]),
    }), "which domains `--all` takes (globs) and disks to leave out per domain",
        default={"include": ["*"], "exclude": [], "disks_exclude": {}}),
    "plugins": key(STRING_LIST, "extra plugin modules (importable names); packages with a `kvm_borg` entry point "
                                "load by themselves", default=[]),
    "borg_binary": key(optional(ABSOLUTE_PATH), "another borg to run", examples=["/usr/bin/borg"],
                       **{"x-default-text": "the borg installed with kvm-borg"}),
    "restic_binary": key(optional(ABSOLUTE_PATH), "another restic to run", examples=["/usr/local/bin/restic"],
                         **{"x-default-text": "`restic` on PATH"}),
    "hostname": key(optional(STRING), "recorded in `meta.json` and the archive comment", examples=["kvm01"],
                    **{"x-default-text": "the host name"}),
    "repositories": None,  # filled in by combined_schema from the repository types the plugins claim
    "retention": key({"type": "object", "format": "retention-rules", "x-expected": "a mapping of keep_* rules"},
                     "borg-style `keep_*` rules (`keep_within`, `keep_last`, `keep_hourly`, `keep_daily`, "
                     "`keep_weekly`, `keep_monthly`, `keep_yearly`; in UTC) for `kvm-borg prune`; a rule not "
                     "named is off; see docs/operations.md",
                     default={}, examples=[{"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6}],
                     **{"x-default-text": "7 daily, 4 weekly, 6 monthly"}),
    "domains_retention": key(named_mapping({"type": "object", "format": "retention-rules",
                                            "x-expected": "a mapping of keep_* rules"}),
                             "per domain, rules that replace `retention` whole", default={},
                             examples=[{"scratch-vm": {"keep_last": 3}}]),
    "prune_after_backup": key(BOOLEAN, "prune each domain right after its successful backup (then compact)",
                              default=False),
    "max_age": key(POSITIVE_DURATION, "`kvm-borg status` fails for a domain whose newest backup is older",
                   default="26h"),
    "nice": key(optional(whole_number(0, 19)),
                "CPU priority (niceness) of every child that reads disks or writes repositories (borg, restic, "
                "qemu-img, qemu-nbd, the segment view)", examples=[10],
                **{"x-default-text": "unset: kvm-borg's own"}),
    "ionice": key(optional({**STRING, "format": "ionice"}),
                  "I/O class of the same children: `idle`, `best-effort[:LEVEL]`, `realtime[:LEVEL]` (LEVEL 0-7, "
                  "0 highest); the BFQ and mq-deadline I/O schedulers honour it", examples=["idle"],
                  **{"x-default-text": "unset: kvm-borg's own"}),
    "metrics_file": key(optional(ABSOLUTE_PATH), "node_exporter textfile-collector file written after every run",
                        examples=["/var/lib/prometheus/node-exporter/kvm-borg.prom"]),
}


# --- joining the plugins' contributions -----------------------------------------------------


def repository_variant(kind: str, type_schema: dict) -> dict:
    """Given a repository type and the schema of its keys, return the if/then rule that applies it to
    a repository whose `type` is `kind` (the common keys `name` and `type` added, other keys refused)."""
    then = mapping({**REPOSITORY_COMMON_KEYS, **type_schema.get("properties", {})},
                   ("name", "type", *type_schema.get("required", ())))
    if "examples" in type_schema:
        then["examples"] = type_schema["examples"]
    if "allOf" in type_schema:  # checked after the keys themselves (a validator takes allOf before properties)
        then = {"allOf": [then, *type_schema["allOf"]]}
    return {"if": {"properties": {"type": {"const": kind}}, "required": ["type"]}, "then": then}


def variant_keys(then: dict) -> dict:
    """Given the ``then`` of a repository_variant, return the schemas of its keys."""
    return then["allOf"][0] if "allOf" in then else then


def repositories_schema(types: dict[str, dict]) -> dict:
    """Given {repository type: schema of its keys}, return the schema of the `repositories:` list."""
    known = ", ".join(types)
    item = {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"type": "string", "enum": list(types),
                                "x-message": f"unknown repository type {{value!r}} (known: {known})"}},
        "allOf": [repository_variant(kind, schema) for kind, schema in types.items()],
        "x-required": {"type": f"one of {known}"},
    }
    first_examples = [schema["examples"][0] for schema in types.values() if schema.get("examples")][:1]
    return key({"type": "array", "minItems": 1, "items": item, "x-expected": "a non-empty list of repositories",
                "x-unique": {"key": "name", "message": "duplicate repository name {value!r}"}},
               "a list of repositories (each `type:` a backend plugin claims)", default=None,
               examples=[first_examples], **{"x-default-text": "the embedded default", "x-sample-active": True})


def merge_contributions(contributions: list[tuple[str, dict]]) -> tuple[dict, dict, dict]:
    """Given [(plugin name, what its kvm_borg_config_schema returned)], return ({key: schema},
    {repository type: schema}, {top-level key: the plugin that contributed it}); a key or type two plugins claim is a ConfigError."""
    keys: dict[str, dict] = {}
    types: dict[str, dict] = {}
    owner: dict[str, str] = {}
    for plugin, contribution in contributions:
        unknown = set(contribution) - {"keys", "repository_types"}
        if unknown:
            raise ConfigError(f"plugin {plugin}: kvm_borg_config_schema returned unknown part {sorted(unknown)[0]!r} "
                              "(known: keys, repository_types)")
        for part, target, what in (("keys", keys, "config key"), ("repository_types", types, "repository type")):
            for name, schema in contribution.get(part, {}).items():
                claimed = owner.get(f"{part}:{name}") or ("kvm_borg" if part == "keys" and name in CORE_KEYS else None)
                if claimed:
                    raise ConfigError(f"plugin {plugin}: {what} {name!r} is already claimed by {claimed}")
                target[name] = schema
                owner[f"{part}:{name}"] = plugin
    return keys, types, {name[len("keys:"):]: plugin for name, plugin in owner.items() if name.startswith("keys:")}


def combined_schema(contributions: list[tuple[str, dict]]) -> dict:
    """Given [(plugin name, kvm_borg_config_schema result)], return the whole configuration's schema."""
    keys, types, _ = merge_contributions(contributions)
    properties = {name: repositories_schema(types) if name == "repositories" else schema
                  for name, schema in CORE_KEYS.items()}
    properties.update(keys)
    return mapping(properties)
