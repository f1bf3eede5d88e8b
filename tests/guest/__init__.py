"""Test guest built from Debian packages: see build.py and README.md.

Import as ``from guest import build`` (tests/ is on sys.path via tests/conftest.py).
"""
