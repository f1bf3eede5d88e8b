"""Validate a parsed configuration document against the schema (`config_schema`) and normalize it.

Two steps, both driven by the schema alone: fastjsonschema checks the structure (types, keys,
required keys, ranges, the rules of a repository type); then `normalize` fills in the defaults and
applies the ``format`` of each value (`config_formats`). Every error is a one-line ConfigError that
names the key as the user wrote it (``repositories[0].path: required``).

fastjsonschema is imported only when a structure check runs: a document whose validation
`config_cache` remembers is only normalized.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kvm_borg import config_cache
from kvm_borg.config_formats import FORMATS, quote_hint
from kvm_borg.config_schema import variant_keys
from kvm_borg.errors import ConfigError

# Keywords only the documentation reads: left out of the compiled validator (its code embeds the
# schema of every rule it checks).
_DOCUMENTATION = frozenset({"description", "examples", "default", "x-default-text", "x-sample-active"})
_compiled: dict[str, Any] = {}


def without_documentation(schema: Any) -> Any:
    """Given a schema, return a copy without the keywords only the documentation reads."""
    if isinstance(schema, dict):
        return {k: without_documentation(v) for k, v in schema.items() if k not in _DOCUMENTATION}
    if isinstance(schema, list):
        return [without_documentation(v) for v in schema]
    return schema


def check_structure(schema: dict, document: dict) -> None:
    """Given the schema and the document, raise a ConfigError naming the key if the document's structure
    does not fit (the validator is compiled once per process and schema)."""
    import fastjsonschema

    key = config_cache.digest(schema, None)
    if key not in _compiled:
        _compiled[key] = fastjsonschema.compile(without_documentation(schema), use_default=False, use_formats=False)
    try:
        _compiled[key](document)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise ConfigError(error_message(exc, document)) from None


def validate(schema: dict, document: Any, cache_dir: Path | None = None) -> dict:
    """Given the schema and the parsed YAML document (a mapping), return the normalized config dict
    (defaults filled in, formats applied); anything invalid is a ConfigError naming the key. With
    `cache_dir`, a document validated before against the same schema skips the structure check, and a
    valid one is remembered there."""
    if not isinstance(document, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(document).__name__}")
    digest = config_cache.digest(schema, document) if cache_dir else None
    cached = digest is not None and config_cache.is_validated(digest, cache_dir)
    if not cached:
        check_structure(schema, document)
    data = normalize(schema, document, "")
    if digest is not None and not cached:
        config_cache.remember(digest, cache_dir)
    return data


def validate_value(schema: dict, value: Any, name: str, cache_dir: Path | None = None) -> Any:
    """Given the schema of one top-level key, its value and its name (and `cache_dir` as for `validate`),
    return the value normalized."""
    return validate({"type": "object", "properties": {name: schema}}, {name: value}, cache_dir)[name]


# --- error messages -------------------------------------------------------------------------


def key_path(path: list[str], document: Any) -> str:
    """Given fastjsonschema's path (['data', 'repositories', '0', 'path']) and the document, return the
    key as the user reads it (``repositories[0].path``): list positions in brackets, mapping keys dotted."""
    text, node = "", document
    for part in path[1:]:
        if isinstance(node, list):
            text, node = f"{text}[{part}]", node[int(part)]
        else:
            match = next((k for k in node if str(k) == part), part)
            text, node = (f"{text}.{match}" if text else str(match)), node.get(match)
    return text


def expected(definition: dict, value: Any) -> str:
    """Given the schema a value failed and the value, return 'expected ..., got ...'."""
    if "x-expected" in definition:
        what = definition["x-expected"]
        got = type(value).__name__ if what.startswith("a mapping") and not isinstance(value, dict) else repr(value)
        return f"expected {what}, got {got}{quote_hint(value) if what == 'a string' else ''}"
    types = definition.get("type", [])
    types = types if isinstance(types, list) else [types]
    if "string" in types:
        return f"expected a non-empty string, got {value!r}{quote_hint(value)}"
    if "integer" in types:
        return f"expected a whole number ≥ {definition.get('minimum', 0)}, got {value!r}"
    if "boolean" in types:
        return f"expected true or false, got {value!r}"
    if "object" in types:
        return f"expected a mapping, got {type(value).__name__}"
    return f"expected {' or '.join(types) or 'another value'}, got {value!r}"


def error_message(exc, document: Any) -> str:
    """Given a fastjsonschema JsonSchemaValueException and the document, return the one-line message naming the key."""
    where, rule, definition, value = key_path(exc.path, document), exc.rule, exc.definition or {}, exc.value
    prefix = f"{where}." if where else ""
    if "x-message" in definition and rule in ("not", "anyOf", "oneOf", "enum", "const", "pattern"):
        return f"{where or 'config'}: {definition['x-message'].format(value=value)}"
    if rule == "required":
        missing = next(name for name in definition["required"] if name not in value)
        hint = definition.get("x-required", {}).get(missing)
        return f"{prefix}{missing}: required" + (f" ({hint})" if hint else "")
    if rule == "additionalProperties":
        known = definition.get("properties", {})
        unknown = sorted((k for k in value if k not in known), key=str)[0]
        return f"{prefix}{unknown}: unknown key (known keys: {', '.join(sorted(known))})"
    if rule == "propertyNames":
        name = next(k for k in value if not isinstance(k, str))
        return f"{prefix}{name}: expected a name (a string), got {name!r}{quote_hint(name)}"
    if rule == "maximum":
        return f"{where}: {value!r} is too large (at most {definition['maximum']})"
    if rule == "enum":
        choices = ", ".join(str(c) for c in definition["enum"] if c is not None)
        return f"{where}: expected {definition.get('x-expected', f'one of {choices}')}, got {value!r}"
    if rule in ("type", "minLength", "minimum", "minItems", "items"):
        return f"{where}: {expected(definition, value)}"
    return f"{where or 'config'}: {exc.message.removeprefix('data').lstrip('.')}"


# --- defaults and formats -------------------------------------------------------------------


def _matches(condition: dict, value: Any) -> bool:
    """Given an ``if`` of the form {"properties": {k: {"const": v}}} and a value, return whether it holds."""
    return isinstance(value, dict) and all(
        value.get(name) == rule["const"] for name, rule in condition.get("properties", {}).items()
    )


def normalize(schema: dict, value: Any, where: str) -> Any:
    """Given a schema, a value already valid against it and its key, return the value with the schema's
    defaults filled in and its formats applied (a new object; `value` is not changed)."""
    types = schema.get("type", ())
    if isinstance(value, dict) and "object" in (types if isinstance(types, list) else [types]):
        value = _normalize_mapping(schema, value, where)
    elif isinstance(value, list) and "items" in schema:
        value = [normalize(schema["items"], item, f"{where}[{i}]") for i, item in enumerate(value)]
        unique = schema.get("x-unique")
        if unique:
            seen = [item[unique["key"]] for item in value]
            for i, name in enumerate(seen):
                if seen.index(name) != i:
                    raise ConfigError(f"{where}[{i}].{unique['key']}: {unique['message'].format(value=name)}")
    if "format" in schema and value is not None:
        value = FORMATS[schema["format"]](value, where)
    return value


def _normalize_mapping(schema: dict, value: dict, where: str) -> dict:
    """The mapping case of `normalize`: its keys, the values of a named mapping, and the if/then variant
    (a repository type) whose condition the mapping meets."""
    prefix = f"{where}." if where else ""
    properties = dict(schema.get("properties", {}))
    for rule in schema.get("allOf", ()):
        if "if" in rule and "then" in rule and _matches(rule["if"], value):
            properties.update(variant_keys(rule["then"]).get("properties", {}))
    result = {}
    for name, item in value.items():
        sub = properties.get(name, schema.get("additionalProperties"))
        result[name] = normalize(sub, item, f"{prefix}{name}") if isinstance(sub, dict) else item
    for name, sub in properties.items():
        if name not in result and "default" in sub:
            result[name] = normalize(sub, copy.deepcopy(sub["default"]), f"{prefix}{name}")
    return result
