"""run_command: a child whose stdout is streamed (on_stdout) gets a larger pipe, so it waits less."""

from __future__ import annotations

import sys

from kvm_borg.execute import STREAM_PIPE_BYTES, run_command

# The parent enlarges the pipe right after starting the child: the child looks until it sees a
# change or `wait` seconds have passed, then reports the size.
REPORT_PIPE_SIZE = """
import fcntl, sys, time
deadline = time.monotonic() + float(sys.argv[1])
size = fcntl.fcntl(1, fcntl.F_GETPIPE_SZ)
while size == 65536 and time.monotonic() < deadline:
    time.sleep(0.01)
    size = fcntl.fcntl(1, fcntl.F_GETPIPE_SZ)
sys.stdout.write(str(size))
"""


def _pipe_size_seen_by_child(stream: bool) -> int:
    chunks: list[bytes] = []
    result = run_command([sys.executable, "-c", REPORT_PIPE_SIZE, "10" if stream else "0.3"],
                         on_stdout=chunks.append if stream else None)
    return int(b"".join(chunks) if stream else result.stdout)


def test_a_streamed_stdout_gets_the_large_pipe_and_a_collected_one_keeps_the_default():
    with open("/proc/sys/fs/pipe-max-size") as handle:
        limit = int(handle.read())
    assert _pipe_size_seen_by_child(stream=True) == min(STREAM_PIPE_BYTES, limit)
    assert _pipe_size_seen_by_child(stream=False) == 65536
