"""The config keys of a `type: restic` repository, contributed through `kvm_borg_config_schema`."""

from __future__ import annotations

from kvm_borg.config_schema import (
    PASSPHRASE_KEYS, PASSPHRASE_NOT_BOTH, SSH_COMMAND, STRING, UPLOAD_RATELIMIT, STRING_LIST, any_of_keys, key, one_of, optional,
)
from kvm_borg.hookspecs import hookimpl

# restic's `--compression` values. Kept here, not in .commands: every run builds the schema, and a run with no
# restic repository then imports nothing else of restic's.
COMPRESSION_MODES = ("auto", "off", "max")

RESTIC_REPOSITORY = {
    "properties": {
        "url": key(STRING, "the repository as restic takes it: a path, `sftp:user@host:/path`, `rest:...`, `s3:...`"),
        **PASSPHRASE_KEYS,
        "compression": key(optional(one_of(*COMPRESSION_MODES)), "restic's `--compression` (restic's default: auto)"),
        "ssh_command": key(optional(SSH_COMMAND), "the ssh an sftp repository runs"),
        "host": key(optional(STRING), "`--host` of new snapshots (default: hostname)"),
        "hosts": key(optional(STRING_LIST), "whose snapshots list/restore see (default: [host]; \"*\": all)"),
        "upload_ratelimit": UPLOAD_RATELIMIT,
    },
    "required": ["url"],
    "allOf": [
        PASSPHRASE_NOT_BOTH,
        any_of_keys(("passphrase_file", "passphrase_command"),
                    "a restic repository needs passphrase_file or passphrase_command"),
    ],
    "examples": [{"name": "offsite", "type": "restic", "url": "sftp:backup@backup.example.org:/srv/restic/kvm01",
                  "passphrase_file": "/etc/kvm-borg/restic-password"}],
}


@hookimpl
def kvm_borg_config_schema():
    """Return the keys of a restic repository."""
    return {"repository_types": {"restic": RESTIC_REPOSITORY}}
