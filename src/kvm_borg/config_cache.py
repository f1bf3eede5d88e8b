"""Remember which configurations already passed the schema, so a run with an unchanged file and
unchanged plugins skips compiling the validator (fastjsonschema: ~40 ms import + ~90 ms compile of
the whole schema on this 2-core host) and pays only for the normalization; and remember what the
YAML parser made of a config file's text, so such a run imports no YAML parser either (ruamel.yaml:
~20 ms of CPU).

A validated (schema, document) pair is an empty file named by their digest in a private directory
of ours on tmpfs (VALIDATED_DIR, cleared at boot). The directory is trusted only when it is a real
directory owned by us with no access for others; anything else, and any OSError, means "not
cached": the document is then validated in full. Nothing is ever read from a marker but its name.

A parsed document is a JSON file in PARSED_DIR (same trust rules) named by the digest of the file's
exact text and kvm-borg's version, so an edited config never finds a stale entry: its text names
another file. Only documents JSON keeps exactly (string keys; strings, ints, floats, booleans, null,
lists, mappings) are remembered. An entry is used only when it is a regular file owned by us, not
writable by group or others, and what it holds names the same text digest; anything else (a corrupt,
foreign or truncated file, any OSError) means "not cached" and the text is parsed again. Entries are
0600 in a 0700 directory: no more readable than the config they came from, which may hold secrets
(a password in a repository URL).

Each directory keeps at most KEEP entries: whenever a new one is written, the oldest beyond KEEP go (an
entry pruned while its config is still in use only costs that config one full parse and validation).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from kvm_borg import __version__

try:  # CPython's own SHA-256: `import hashlib` loads OpenSSL's libcrypto first (~3 ms of every start-up)
    from _sha256 import sha256  # Python 3.11
except ImportError:
    try:
        from _sha2 import sha256  # Python 3.12 and later
    except ImportError:  # an interpreter built without them
        from hashlib import sha256

log = logging.getLogger(__name__)

VALIDATED_DIR = Path("/run/kvm-borg/config-validated")
PARSED_DIR = Path("/run/kvm-borg/config-parsed")
# The first line of a parsed-document entry: what it is and for which kvm-borg version.
_PARSED_FORMAT = "kvm-borg parsed config 1"
KEEP = 32  # entries per directory: a host runs a handful of configs, each edit makes a new entry


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
    return sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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


def oldest_beyond(entries: list[tuple[float, str]], keep: int) -> list[str]:
    """Given (mtime, name) of a directory's entries and how many to keep, return the names to remove:
    all but the `keep` newest."""
    return [name for _mtime, name in sorted(entries, reverse=True)[keep:]]


def prune(directory: Path, keep: int | None = None) -> None:
    """Remove the oldest entries of a cache directory of ours beyond `keep` (default KEEP; regular files
    only; best effort: a failure is logged at debug)."""
    keep = KEEP if keep is None else keep
    try:
        with os.scandir(directory) as listing:
            entries = [(entry.stat(follow_symlinks=False).st_mtime, entry.name) for entry in listing
                       if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".")]
        for name in oldest_beyond(entries, keep):
            os.unlink(directory / name)
    except OSError as exc:
        log.debug("cannot prune %s: %s", directory, exc)


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
        prune(directory)
    except FileExistsError:
        pass
    except OSError as exc:
        log.debug("cannot remember the validated config in %s: %s", directory, exc)


def text_digest(text: str) -> str:
    """Given a config file's text, return the hex digest that names its parsed document."""
    return sha256(f"{_PARSED_FORMAT}\0{__version__}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()


def json_exact(value: Any, _seen: set[int] | None = None) -> bool:
    """Given a parsed YAML value, return whether JSON gives it back exactly: same types, same values, and no
    mapping or list that appears twice (a YAML alias: JSON would give two copies, or loop forever on a cycle)."""
    if type(value) in (dict, list):
        seen = set() if _seen is None else _seen
        if id(value) in seen:
            return False
        seen.add(id(value))
        if type(value) is dict:
            return all(type(k) is str and json_exact(v, seen) for k, v in value.items())
        return all(json_exact(v, seen) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def parsed_document(text: str, directory: Path = PARSED_DIR) -> tuple[bool, Any]:
    """Given a config file's text, return (True, the document parsed from it before) or (False, None) when
    no trustworthy entry exists (see the module's docstring)."""
    name = text_digest(text)
    try:
        if not (_private(directory.parent, False) and _private(directory, False)):
            return False, None
        fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
                return False, None
            with os.fdopen(fd, "rb", closefd=False) as handle:
                raw = handle.read(info.st_size + 1)
        finally:
            os.close(fd)
        header, _, body = raw.decode("utf-8").partition("\n")
        entry = json.loads(body)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON
        log.debug("no parsed config from %s: %s", directory / name, exc)
        return False, None
    try:
        if header != _PARSED_FORMAT or type(entry) is not dict or entry.get("text") != name \
                or "document" not in entry or not json_exact(entry["document"]):
            return False, None
    except RecursionError:
        return False, None
    return True, entry["document"]


def remember_document(text: str, document: Any, directory: Path = PARSED_DIR) -> None:
    """Given a config file's text and the document the YAML parser made of it, remember the document
    (best effort: a document JSON cannot keep exactly is not remembered, a failure is logged at debug)."""
    try:
        if not json_exact(document):
            return
        name = text_digest(text)
        data = (_PARSED_FORMAT + "\n" + json.dumps({"text": name, "document": document}, ensure_ascii=False,
                                                    allow_nan=True)).encode("utf-8", "surrogatepass")
    except RecursionError:  # nested too deeply for JSON: parsed again every time
        return
    temp = directory / f".{name}.{os.getpid()}.tmp"
    try:
        if not (_private(directory.parent, True) and _private(directory, True)):
            return
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(temp, directory / name)  # tmpfs, cleared at boot: no fsync needed
        prune(directory)
    except OSError as exc:
        log.debug("cannot remember the parsed config in %s: %s", directory, exc)
        try:
            os.unlink(temp)
        except OSError:
            pass
