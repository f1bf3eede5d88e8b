"""A real restic REST server for tests: Debian's rclone, `rclone serve restic --append-only`, on 127.0.0.1 with
a free port the kernel picks, HTTP basic auth, serving the repositories below one directory (`rest:` URL
path `/NAME/` is the directory `root/NAME`). Append-only: restic may create files, never delete them
(its lock files excepted), as a fleet's shared backup server would be run."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from harness.sshd import stop_process

RCLONE = shutil.which("rclone")
_SERVING = re.compile(r"Serving restic REST API on http://127\.0\.0\.1:(\d+)/")


class RcloneRestServer:
    """`rclone serve restic --append-only` over `root`, started by `start()`, ended by `stop()`."""

    def __init__(self, root: Path, user: str = "kbtest"):
        self.root = Path(root)
        self.user = user
        self.password = secrets.token_hex(8)
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.log = self.root.parent / f"{self.root.name}-rclone.log"

    def start(self, timeout: float = 30) -> "RcloneRestServer":
        """Start the server and return self once it says where it listens (AssertionError with its log if not)."""
        assert RCLONE, "rclone is not installed: run scripts/setup.sh (Debian package rclone)"
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "RCLONE_CONFIG": "/dev/null"}  # no rclone.conf of the host's
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [RCLONE, "serve", "restic", "--append-only", "--addr", "127.0.0.1:0", "--user", self.user,
                 "--pass", self.password, str(self.root)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            match = _SERVING.search(self.log.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return self
            time.sleep(0.05)
        log_text = self.log.read_text(errors="replace")
        self.stop()
        raise AssertionError(f"rclone serve restic did not start:\n{log_text}")

    def url(self, name: str) -> str:
        """Given a repository name, return its `rest:` URL (with the credentials, as restic takes them)."""
        return f"rest:http://{self.user}:{self.password}@127.0.0.1:{self.port}/{name}/"

    def directory(self, name: str) -> Path:
        """Given a repository name, return the directory on the server that holds it."""
        return self.root / name

    def stop(self) -> None:
        """End the server (SIGTERM, SIGKILL after 10 s) and wait for it."""
        if self.process is not None:
            stop_process(self.process)
