"""Remember which configurations already passed the schema, so a run with an unchanged file and
unchanged plugins skips compiling the validator (fastjsonschema: ~40 ms import + ~90 ms compile of
the whole schema on this 2-core host) and pays only for the normalization.

A validated (schema, document) pair is an empty file named by their digest in a private directory
of ours on tmpfs (VALIDATED_DIR, cleared at boot). The directory is trusted only when it is a real
directory owned by us with no access for others; anything else, and any OSError, means "not
cached": the document is then validated in full. Nothing is ever read from a marker but its name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from kvm_borg import __version__

log = logging.getLogger(__name__)

VALIDATED_DIR = Path("/run/kvm-borg/config-validated")


def _canonical(value: Any) -> Any:
    """Given a parsed YAML value, return a form whose repr differs whenever the values differ
    (True vs 'true', 1 vs '1'), mapping order ignored."""
    if isinstance(value, dict):
        return ("map", tuple(sorted(((repr(k), _canonical(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    if isinstance(value, list):
        return ("list", tuple(_canonical(v) for v in value))
    return repr(value)


def digest(schema: dict, document: Any) -> str:
    """Given the schema and the parsed document, return the hex digest that names their validation."""
    text = json.dumps(schema, sort_keys=True, default=repr) + "\0" + repr(_canonical(document)) + "\0" + __version__
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _private(path: Path, create: bool) -> bool:
    """Given a directory path, return whether it is a directory of ours closed to others (creating it 0700
    first when `create`)."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    info = os.lstat(path)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077


def is_validated(name: str, directory: Path = VALIDATED_DIR) -> bool:
    """Given a digest, return whether a validation with that digest succeeded before."""
    try:
        return _private(directory.parent, False) and _private(directory, False) and \
            os.path.isfile(directory / name) and not os.path.islink(directory / name)
    except OSError:
        return False


def remember(name: str, directory: Path = VALIDATED_DIR) -> None:
    """Record that the validation with digest `name` succeeded (best effort: a failure is logged at debug)."""
    try:
        if not (_private(directory.parent, True) and _private(directory, True)):
            return
        os.close(os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        log.debug("cannot remember the validated config in %s: %s", directory, exc)
