"""The config keys of a `type: borg` repository, contributed through `kvm_borg_config_schema`."""

from __future__ import annotations

from kvm_borg.config_schema import (
    PASSPHRASE_KEYS, PASSPHRASE_NOT_BOTH, SSH_COMMAND, STRING, UPLOAD_RATELIMIT, any_of_keys, key, one_of, optional, whole_number,
)
from kvm_borg.backends.borg.defaults import (
    DEFAULT_CHUNKER_PARAMS, DEFAULT_COMPRESSION, DEFAULT_ENCRYPTION, DEFAULT_LOCK_WAIT, ENCRYPTION_MODES, MAX_LOCK_WAIT,
)
from kvm_borg.hookspecs import hookimpl

BORG_REPOSITORY = {
    "properties": {
        "path": key(STRING, "a local path or `ssh://user@host:port/path`"),
        "encryption": key({**one_of(*ENCRYPTION_MODES), "x-message": "unknown borg encryption mode {value!r}"},
                          "borg's `--encryption` for `kvm-borg init`", default=DEFAULT_ENCRYPTION),
        **PASSPHRASE_KEYS,
        "compression": key({**STRING, "format": "borg-compression"},
                           "none, lz4, zstd[,1-22], zlib[,0-9], lzma[,0-9], auto,C[,L], obfuscate,SPEC,C[,L]",
                           default=DEFAULT_COMPRESSION),
        "chunker_params": key({**STRING, "format": "borg-chunker-params"},
                              "fixed,BLOCK[,HEADER] (4 MiB fixed blocks suit disk images) or "
                              "buzhash,MIN_EXP,MAX_EXP,MASK_BITS,WINDOW", default=DEFAULT_CHUNKER_PARAMS),
        "lock_wait": key(whole_number(0, MAX_LOCK_WAIT), "seconds to wait for the repository lock",
                         default=DEFAULT_LOCK_WAIT),
        "ssh_command": key(optional(SSH_COMMAND), "the ssh borg runs (default `ssh -o BatchMode=yes`, keepalives added)"),
        "remote_path": key(optional(STRING), "borg on the server (`--remote-path`)"),
        "upload_ratelimit": UPLOAD_RATELIMIT,
    },
    "required": ["path"],
    "allOf": [
        PASSPHRASE_NOT_BOTH,
        {"if": {"properties": {"encryption": {"not": {"const": "none"}}}},
         "then": any_of_keys(("passphrase_file", "passphrase_command"),
                             "an encrypted repository needs passphrase_file or passphrase_command")},
    ],
    "examples": [{"name": "local", "type": "borg", "path": "/srv/backup/kvm-borg", "encryption": "repokey-blake2",
                  "passphrase_file": "/etc/kvm-borg/passphrase", "compression": "lz4",
                  "chunker_params": "fixed,4194304", "lock_wait": 60}],
}


@hookimpl
def kvm_borg_config_schema():
    """Return the keys of a borg repository."""
    return {"repository_types": {"borg": BORG_REPOSITORY}}
