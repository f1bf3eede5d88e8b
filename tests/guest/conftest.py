"""Fixtures for tests that need a real booting guest (see build.py, README.md).

Defined in fixtures.py (so test modules outside this directory can import them):
guest_artifacts (session) and guest_factory (function), see there.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guest.fixtures import guest_artifacts, guest_factory  # noqa: E402,F401
