"""Exceptions that the CLI turns into one clear line and an exit code."""


class KvmBorgError(Exception):
    """A failure the user can act on; the message is one line. Exit code 2."""

    exit_code = 2


class UsageError(KvmBorgError):
    """Bad input (config, arguments, names): nothing was changed."""


class ConfigError(UsageError):
    """The configuration file is malformed or names a bad value; the message names the key."""


class RefusedError(KvmBorgError):
    """The domain is in a state where a backup would be unsafe; nothing was changed."""


class LockedError(KvmBorgError):
    """Another kvm-borg run holds the lock of this domain."""


class CommitError(KvmBorgError):
    """Overlays could not be merged back; the journal entry stays for `kvm-borg recover`."""


class Interrupted(BaseException):
    """Raised from the SIGTERM/SIGINT handler so every `finally` runs (commit, journal)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class EngineError(KvmBorgError):
    """A call into the virtualization engine (libvirt) failed; the engine raises it in place of its
    own error type, so nothing outside `engine/` handles libvirt errors. The message is the
    engine's, e.g. "libvirt: Domain not found"."""


def exit_code(failed: bool, warned: bool) -> int:
    """Given whether anything failed and whether anything warned, return the documented exit code:
    2 on a failure, else 1 on a warning, else 0."""
    if failed:
        return 2
    return 1 if warned else 0
