"""The `kvm-borg` command line: parse arguments, run one action, map the outcome to an exit code.

The arguments are defined in kvm_borg.cli_args (argparse only); each verb names its
`run(ctx, args) -> exit code` as "module:function", imported here only when that verb runs, so
`--help` and `--version` import no action, backend or libvirt.

Exit codes: 0 success, 1 success with warnings, 2 error (bad input, refused, failed), 130 when
interrupted by a signal (after the overlays were merged back).

No command prints a traceback for an error: a libvirt error or any other unexpected exception
becomes one line and exit 2; the traceback is printed only with `-v` or `--debug`. This module
does not import libvirt (start-up time): a libvirt error is recognised by its class's name.
"""

from __future__ import annotations

import gc
import importlib
import logging
import sys
import traceback

from kvm_borg.cli_args import build_parser
from kvm_borg.errors import Interrupted, KvmBorgError
from kvm_borg.redact import RedactingFilter, RedactingStream, redact_text

def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="kvm-borg: %(levelname)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # no log line shows a password from a repository URL
        handler.addFilter(RedactingFilter())


def libvirt_error_message(exc: BaseException) -> str | None:
    """Given an exception, return libvirt's one-line message if it is a libvirt.libvirtError (or a subclass),
    else None. Recognised by class name and module, so libvirt is never imported here."""
    if not any(cls.__name__ == "libvirtError" and cls.__module__ == "libvirt" for cls in type(exc).__mro__):
        return None
    getter = getattr(exc, "get_error_message", None)
    return one_line(str(exc) or (getter() if callable(getter) else None) or "libvirt error")


def one_line(text: str) -> str:
    """Given a message, return it on one line (line breaks and runs of blanks become one space)."""
    return " ".join(str(text).split())


def error_line(exc: BaseException) -> str:
    """Given an exception that escaped an action, return the one line the user sees for it."""
    message = libvirt_error_message(exc)
    if message is not None:
        return f"kvm-borg: error: {message}"
    detail = one_line(str(exc))
    return (f"kvm-borg: error: unexpected {type(exc).__name__}{': ' + detail if detail else ''} "
            "(run with --debug for the traceback)")


def resolve_run(dotted: str):
    """Given a verb's "module:function" name, import the module and return the function."""
    module, _, function = dotted.partition(":")
    return getattr(importlib.import_module(module), function)


def _run(args) -> int:
    run = resolve_run(args.run)
    if not getattr(args, "needs_settings", True):
        return run(None, args)
    from kvm_borg.actions.common import Context
    from kvm_borg.config import load_config
    from kvm_borg.execute import set_child_priority
    from kvm_borg.plugins import bind_settings

    progress = sys.stderr.isatty() and not getattr(args, "no_progress", False) and not getattr(args, "json", False)
    ctx = Context(*load_config(args.config, progress=progress))
    bind_settings(ctx.pm, ctx.settings)
    set_child_priority(ctx.settings.child_priority)
    _start_up_done()
    try:
        return run(ctx, args)
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    arguments = sys.argv[1:] if argv is None else argv
    args = build_parser(arguments).parse_args(arguments)
    _setup_logging(args.verbose, args.quiet)
    stdout = sys.stdout
    sys.stdout = RedactingStream(stdout)  # no output shows a password from a repository URL
    try:
        return _run(args)
    except KvmBorgError as exc:
        print(f"kvm-borg: error: {redact_text(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        done = "overlays were merged back" if args.command in ("backup", "freeze", "thaw") else "cleaned up"
        if isinstance(exc.__cause__, KvmBorgError):  # the merge failed: its message names `kvm-borg recover`
            done = f"but {redact_text(str(exc.__cause__))}"
        print(f"kvm-borg: {exc}; {done}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a SIGINT outside any signals.interruptible() block
        print("kvm-borg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a libvirt error or a bug: one line, exit 2; the traceback on request
        if args.debug or args.verbose:  # a traceback quotes messages and locals' reprs: redacted like a log line
            print(redact_text(traceback.format_exc()), end="", file=sys.stderr)
        print(redact_text(error_line(exc)), file=sys.stderr)
        return 2
    finally:
        sys.stdout = stdout


def _start_up_done() -> None:
    """End the start-up of a `kvm-borg` process whose collector console_main paused: freeze what the
    imports, the config and the plugins allocated (gc.freeze: later collections never walk it again)
    and let the collector run again."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def console_main() -> None:
    """The `kvm-borg` process: run main() on sys.argv and exit with its code.

    The garbage collector is paused from here until the config and plugins are loaded (see
    _start_up_done): the ~200 modules a backup imports allocate enough objects to trigger a dozen
    collections that find no garbage (~55 ms of the start-up on this 2-core host).

    Before the exit every object left is frozen (gc.freeze), so the interpreter's final garbage
    collections skip them: they would walk every object of every imported module (~0.2 s on a busy
    2-core host) for memory the OS frees anyway. By then main() has closed its files, connections
    and children; atexit handlers and the flushing of stdout/stderr still run."""
    gc.disable()
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
