"""The borg backend's defaults: the one place they are written down.

The config schema, the zero-config repository, `doctor --round-trip` and the backend itself take
them from here.
"""

from __future__ import annotations

# `borg init --encryption` of a repository kvm-borg creates, unless `encryption:` says otherwise.
DEFAULT_ENCRYPTION = "repokey-blake2"
# The `--encryption` modes borg 1.4 accepts.
ENCRYPTION_MODES = ("none", "authenticated", "authenticated-blake2", "repokey", "keyfile",
                    "repokey-blake2", "keyfile-blake2")
DEFAULT_COMPRESSION = "lz4"
# A fixed 4 MiB chunker: a guest write moves no chunk boundary, so unchanged blocks deduplicate.
DEFAULT_CHUNKER_PARAMS = "fixed,4194304"
# Seconds borg waits for a repository lock (`--lock-wait`); the config allows 0..MAX_LOCK_WAIT.
DEFAULT_LOCK_WAIT = 60
MAX_LOCK_WAIT = 7 * 86400
