"""The command runner: secrets through a pipe, stderr line by line, children stopped on interrupt."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import pytest

from kvm_borg import execute
from kvm_borg.execute import CommandError, run_command, summarize_stderr

PY = sys.executable


def python(code: str) -> list[str]:
    return [PY, "-c", code]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_stdout_and_returncode_are_returned():
    result = run_command(python("import sys; print('out'); sys.exit(3)"))
    assert result.returncode == 3
    assert result.stdout == "out\n"


def test_secret_reaches_the_child_through_an_fd_only(caplog):
    caplog.set_level(logging.DEBUG, logger="kvm_borg.execute")
    secret = b"s3cret-passphrase\n"
    code = (
        "import os, sys\n"
        "fd = int(os.environ['SECRET_FD'])\n"
        "data = os.read(fd, 1000)\n"
        "in_env = any(data.strip() in v for v in os.environb.values())\n"
        "print(repr(data), in_env, ' '.join(sys.argv))\n"
    )
    before = open_fds()
    result = run_command(python(code), secret=secret, secret_env="SECRET_FD")
    assert result.returncode == 0
    assert result.stdout.startswith(repr(secret) + " False")
    assert "s3cret" not in caplog.text
    assert open_fds() == before  # neither end of the pipe leaks in the parent


def test_secret_larger_than_a_pipe_buffer_is_delivered():
    secret = b"x" * (1 << 20)
    code = "import os, sys; f = os.fdopen(int(os.environ['FD']), 'rb'); print(len(f.read()))"
    result = run_command(python(code), secret=secret, secret_env="FD")
    assert result.stdout.strip() == str(len(secret))


def test_unread_secret_does_not_hang():
    result = run_command(python("pass"), secret=b"x" * (1 << 20), secret_env="FD")
    assert result.returncode == 0


def test_secret_needs_a_variable_name():
    with pytest.raises(ValueError):
        run_command(python("pass"), secret=b"x")


def test_argv_is_logged_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="kvm_borg.execute")
    run_command(python("pass"))
    assert "running: " in caplog.text and " -c pass" in caplog.text


def test_stderr_lines_arrive_one_by_one_including_carriage_returns():
    lines = []
    code = "import sys; sys.stderr.write('one\\ntwo\\rthree\\n\\nfour')"
    result = run_command(python(code), on_stderr_line=lines.append)
    assert lines == ["one", "two", "three", "four"]
    assert result.stderr_tail == lines


def test_stderr_tail_keeps_the_last_lines():
    code = "import sys\nfor i in range(500): print(i, file=sys.stderr)"
    result = run_command(python(code))
    assert len(result.stderr_tail) == execute.STDERR_TAIL_LINES
    assert result.stderr_tail[-1] == "499"


def test_stdout_can_go_to_a_file(tmp_path):
    target = tmp_path / "out"
    with open(target, "wb") as f:
        result = run_command(python("print('to file')"), stdout=f)
    assert result.stdout == ""
    assert target.read_text() == "to file\n"


def test_env_replaces_the_environment():
    result = run_command(python("import os; print(os.environ.get('ONLY'), 'HOME' in os.environ)"), env={"ONLY": "me"})
    assert result.stdout.split() == ["me", "False"]


def test_stdin_is_empty_by_default():
    result = run_command(python("import sys; print(repr(sys.stdin.read()))"))
    assert result.stdout.strip() == "''"


def test_child_has_no_controlling_terminal():
    code = "import os\ntry:\n    os.open('/dev/tty', os.O_RDWR)\n    print('tty')\nexcept OSError:\n    print('none')"
    assert run_command(python(code)).stdout.strip() == "none"


def test_ok_returncodes_raise_a_one_line_command_error():
    code = "import sys; print('details', file=sys.stderr); print('the real reason', file=sys.stderr); sys.exit(2)"
    with pytest.raises(CommandError) as info:
        run_command(python(code), ok_returncodes=(0, 1))
    assert info.value.returncode == 2
    assert info.value.message == "the real reason"
    assert info.value.argv[0] == PY


def test_missing_binary_is_a_command_error():
    with pytest.raises(CommandError) as info:
        run_command(["/nonexistent/borg", "list"])
    assert info.value.returncode is None
    assert "cannot run /nonexistent/borg" in str(info.value)


def test_summarize_stderr():
    assert summarize_stderr(["a", "  b  c  ", ""], 2) == "b c"
    assert summarize_stderr([], 2) == "exited with code 2"
    assert summarize_stderr([], -9) == "killed by signal 9"
    assert len(summarize_stderr(["x" * 1000], 2)) <= execute.MAX_MESSAGE_CHARS


def _pid_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def alarm():
    """Yield `arm(seconds, exc_type)`: raise exc_type in the main thread after `seconds`, from a signal handler.

    SIGUSR1 rather than SIGALRM, which pytest-timeout uses."""
    previous = signal.getsignal(signal.SIGUSR1)
    timers = []

    def arm(seconds: float, exc_type=KeyboardInterrupt):
        def handler(signum, frame):
            raise exc_type()

        signal.signal(signal.SIGUSR1, handler)
        timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
        timers.append(timer)
        timer.start()

    yield arm
    for timer in timers:
        timer.cancel()
    signal.signal(signal.SIGUSR1, previous)


# Children that print their pid, sleep, and only then (never, when they are stopped) create the
# file named by their first argument: its absence proves the child was stopped, not waited for.
SLEEPER = ("import os, sys, time\nprint(os.getpid(), file=sys.stderr, flush=True)\ntime.sleep(60)\n"
           "open(sys.argv[1], 'w').close()")
STUBBORN = (
    "import os, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print(os.getpid(), file=sys.stderr, flush=True)\ntime.sleep(60)\nopen(sys.argv[1], 'w').close()"
)


def test_child_is_stopped_when_the_caller_gets_keyboard_interrupt(alarm, tmp_path):
    pids = []
    finished = tmp_path / "finished"
    alarm(0.5)
    with pytest.raises(KeyboardInterrupt):
        run_command([*python(SLEEPER), str(finished)], on_stderr_line=lambda line: pids.append(int(line)))
    assert pids and _pid_is_gone(pids[0])
    assert not finished.exists()  # stopped, not waited for


def test_child_is_stopped_on_an_exception_from_a_signal_handler(alarm):
    class Interrupted(BaseException):
        pass

    pids = []
    alarm(0.5, Interrupted)
    with pytest.raises(Interrupted):
        run_command([*python(SLEEPER), "/nonexistent/x"], on_stderr_line=lambda line: pids.append(int(line)))
    assert pids and _pid_is_gone(pids[0])


def test_child_ignoring_sigterm_is_killed(alarm, monkeypatch, tmp_path):
    monkeypatch.setattr(execute, "TERMINATE_GRACE_SECONDS", 0.5)
    pids = []
    finished = tmp_path / "finished"
    alarm(0.5)
    with pytest.raises(KeyboardInterrupt):
        run_command([*python(STUBBORN), str(finished)], on_stderr_line=lambda line: pids.append(int(line)))
    assert pids and _pid_is_gone(pids[0])
    assert not finished.exists()  # SIGKILLed, not waited for


def test_error_in_the_line_callback_stops_the_child():
    pids = []

    def callback(line):
        pids.append(int(line))
        raise RuntimeError("progress bar broke")

    with pytest.raises(RuntimeError):
        run_command([*python(SLEEPER), "/nonexistent/x"], on_stderr_line=callback)
    assert pids and _pid_is_gone(pids[0])


def test_child_gets_sigterm_when_kvm_borg_is_killed(tmp_path):
    """A borg left running after kvm-borg was SIGKILLed would race `kvm-borg recover`."""
    import subprocess
    import sys
    import textwrap

    marker = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from kvm_borg.execute import run_command
        run_command(["sh", "-c", "echo $$ > {marker}; exec sleep 60"])
    """)])
    deadline = time.monotonic() + 10
    while not (marker.exists() and marker.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(marker.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, "the child outlived its killed parent"
        time.sleep(0.05)


# --- time limits: stop_scope_after (store_timeout) --------------------------------------------


def test_duration_text_is_written_like_a_config_duration():
    assert [execute.duration_text(s) for s in (43200, 5, 90, 5400, 86400, 1.5, 0)] == [
        "12h", "5s", "90s", "90m", "1d", "1.5s", "0s"]


def _run_in_scope(scope, argv, outcome: dict) -> threading.Thread:
    """Start a thread that runs `argv` inside `scope`, storing the result or the exception in `outcome`."""

    def work():
        try:
            outcome["result"] = scope.call(run_command, argv, on_stderr_line=lambda line: outcome.setdefault(
                "pid", int(line)))
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_time_limit_stops_the_children_of_the_scope(tmp_path):
    scope = execute.ChildScope()
    finished = tmp_path / "finished"
    outcome: dict = {}
    with execute.stop_scope_after(scope, 0.5) as expired:
        thread = _run_in_scope(scope, [*python(SLEEPER), str(finished)], outcome)
        thread.join(timeout=30)  # bounded: the child would sleep 60 s
    assert not thread.is_alive()
    assert expired.is_set()
    assert outcome["result"].returncode == -signal.SIGTERM  # stopped cleanly first
    assert _pid_is_gone(outcome["pid"]) and not finished.exists()
    with pytest.raises(CommandError, match="not started"):
        scope.call(run_command, python("pass"))  # nothing new starts once the limit passed


def test_time_limit_kills_a_child_that_ignores_its_stop_signal(tmp_path, monkeypatch):
    monkeypatch.setattr(execute, "TERMINATE_GRACE_SECONDS", 0.5)
    scope = execute.ChildScope()
    finished = tmp_path / "finished"
    outcome: dict = {}
    with execute.stop_scope_after(scope, 0.5) as expired:
        thread = _run_in_scope(scope, [*python(STUBBORN), str(finished)], outcome)
        thread.join(timeout=30)
    assert not thread.is_alive() and expired.is_set()
    assert outcome["result"].returncode == -signal.SIGKILL
    assert not finished.exists()


def test_time_limit_kills_the_helpers_a_stopped_child_leaves_behind(tmp_path):
    """borg stopped by SIGTERM must not leave its ssh waiting on a dead server: the group is killed too."""
    scope = execute.ChildScope()
    helper_pid = tmp_path / "helper.pid"
    code = ("import os, subprocess, sys, time\n"
            "helper = subprocess.Popen(['sleep', '60'])\n"
            f"open({str(helper_pid)!r}, 'w').write(str(helper.pid))\n"
            "print(os.getpid(), file=sys.stderr, flush=True)\ntime.sleep(60)")
    outcome: dict = {}
    with execute.stop_scope_after(scope, 0.5):
        thread = _run_in_scope(scope, python(code), outcome)
        thread.join(timeout=30)
    assert not thread.is_alive()
    helper = int(helper_pid.read_text())
    deadline = time.monotonic() + 30
    while not _pid_is_gone(helper) and _proc_state(helper) != "Z":
        assert time.monotonic() < deadline, "the helper outlived the time limit"
        time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_no_time_limit_and_a_block_that_ends_in_time_stop_nothing():
    scope = execute.ChildScope()
    with execute.stop_scope_after(scope, None) as expired:
        assert scope.call(run_command, python("print('ok')")).stdout == "ok\n"
    with execute.stop_scope_after(scope, 3600) as expired_later:
        assert scope.call(run_command, python("print('ok')")).stdout == "ok\n"
    assert not expired.is_set() and not expired_later.is_set() and not scope.stopped
