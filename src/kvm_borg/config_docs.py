"""Documentation generated from the configuration schema: the commented sample that
`kvm-borg config generate` prints and the key table of the README's "Configuration" section.

`python -m kvm_borg.config_docs readme-table` prints the table (tests/unit/test_config.py fails when
README.md's table differs from it).
"""

from __future__ import annotations

import io
import json
import sys
import textwrap
from typing import Any

from ruamel.yaml import YAML

from kvm_borg.config_schema import variant_keys

SAMPLE_HEADER = """\
# kvm-borg configuration: /etc/kvm-borg/config.yaml (or --config FILE, or $KVM_BORG_CONFIG).
# Read as YAML 1.2: `off`, `no`, `yes` are plain strings; only true/false are booleans. Quote a
# name that YAML would read as a number ("123"). Each key at most once per mapping.
# Without any file, kvm-borg uses an embedded default: one local borg repository under
# state_dir, encrypted with a generated passphrase kept in state_dir/passphrase (mode 0600).
# Durations: 90s, 30m, 26h, 7d, 2w; sizes: 500M, 1GiB.
"""


def _yaml(value: Any) -> str:
    """Given a value, return it as block-style YAML 1.2 text."""
    out = io.StringIO()
    dumper = YAML(typ="safe", pure=True)
    dumper.default_flow_style = False
    dumper.sort_base_mapping_type_on_output = False  # the schema's order, not the alphabet
    dumper.indent(mapping=2, sequence=4, offset=2)
    dumper.dump(value, out)
    return out.getvalue()


def _comment(text: str, indent: str = "") -> list[str]:
    """Given a description, return it as wrapped `# ` comment lines."""
    return textwrap.wrap(text, 98 - len(indent), initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")


def sample_value(schema: dict) -> tuple[Any, bool]:
    """Given a key's schema, return (the value the sample shows, whether the sample sets it): its default,
    else its first example, commented out unless the schema marks the example as active."""
    if schema.get("default") is not None:
        return schema["default"], True
    examples = schema.get("examples") or [None]
    return examples[0], bool(schema.get("x-sample-active"))


def _repository_keys(schema: dict) -> list[str]:
    """Given the `repositories` schema, return comment lines listing every type's keys."""
    lines = ["# The keys of each repository type (besides name and type):"]
    for variant in schema["items"]["allOf"]:
        kind = variant["if"]["properties"]["type"]["const"]
        then = variant_keys(variant["then"])
        lines.append(f"#   type: {kind}")
        for name, sub in then["properties"].items():
            if name in ("name", "type"):
                continue
            default = "required" if name in then.get("required", ()) else (
                f"default {sub['default']}" if sub.get("default") is not None else "optional")
            lines.append(f"#     {name} ({default}): {sub.get('description', '')}")
    return lines


def sample_config(schema: dict, owners: dict[str, str]) -> str:
    """Given the schema and {key a plugin contributed: plugin name}, return the commented sample
    configuration: every key with its description, set to its default (valid as it stands)."""
    lines = [SAMPLE_HEADER.rstrip("\n")]
    for name, sub in schema["properties"].items():
        lines.append("")
        lines.extend(_comment(sub.get("description", name)))
        value, active = sample_value(sub)
        plugin = owners.get(name)
        if plugin:
            lines.append(f"# (a key of the plugin {plugin}: add it to `plugins:` to use it)")
            active = False
        text = _yaml({name: value}).rstrip("\n").splitlines()
        lines.extend(text if active else [f"# {line}" for line in text])
        if name == "repositories":
            lines.extend(_repository_keys(sub))
    return "\n".join(lines) + "\n"


def _default_text(schema: dict) -> str:
    """Given a key's schema, return its default as the README's table shows it."""
    if "x-default-text" in schema:
        return schema["x-default-text"]
    if schema.get("default") is None:
        return "unset"
    default = schema["default"]
    text = json.dumps(default) if not isinstance(default, str) else default
    return f"`{text}`"


def readme_table(schema: dict, owners: dict[str, str]) -> str:
    """Given the schema and {plugin key: plugin name}, return the README's Markdown key table."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, sub in schema["properties"].items():
        meaning = sub.get("description", "").replace("|", "\\|")
        if name in owners:
            meaning += f" (plugin `{owners[name]}`)"
        rows.append(f"| `{name}` | {_default_text(sub)} | {meaning} |")
    return "\n".join(rows) + "\n"


# The plugins shipped with kvm-borg whose keys the sample and the README document.
SHIPPED_PLUGINS = ("kvm_borg_hooks.webhook", "kvm_borg_hooks.prefreeze")


def documented_schema() -> tuple[dict, dict[str, str]]:
    """Return (the schema of kvm-borg with its built-in and shipped plugins, {plugin key: plugin name})."""
    from kvm_borg import config, config_schema
    from kvm_borg.plugins import make_plugin_manager

    contributions = config.plugin_schema_contributions(make_plugin_manager(SHIPPED_PLUGINS, entry_points=False))
    _, _, owners = config_schema.merge_contributions(contributions)
    return config_schema.combined_schema(contributions), owners


if __name__ == "__main__":
    schema, owners = documented_schema()
    print(readme_table(schema, owners) if sys.argv[1:] == ["readme-table"] else sample_config(schema, owners), end="")
