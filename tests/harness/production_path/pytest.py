"""Not pytest: on the PYTHONPATH of the programs the tests start (kvm-borg, borg), so that there, as in a
production venv, pytest cannot be imported (see harness.cli.PRODUCTION_PATH). Never on the test process's path."""

raise ImportError("pytest is hidden from the programs the tests run (tests/harness/production_path)")
