"""borg_specs accepts only what borg 1.4 itself accepts (cross-checked with borg's own parsers,
installed in the venv), and refuses everything borg refuses."""

import argparse

import pytest
from borg import compress  # borgbackup is a dependency of kvm-borg: in every venv
from borg.helpers import parseformat

from kvm_borg.backends.borg import specs as borg_specs

COMPRESSION = ["none", "lz4", "zstd", "zstd,1", "zstd,22", "zstd,0", "zstd,23", "zlib", "zlib,0", "zlib,9",
               "zlib,10", "lzma", "lzma,6", "lzma,10", "auto,lz4", "auto,zstd,3", "auto,lzma,9", "auto",
               "auto,auto,lz4", "obfuscate,1,none", "obfuscate,6,zstd,3", "obfuscate,110,auto,zstd,10",
               "obfuscate,123,lz4", "obfuscate,250,none", "obfuscate,0,lz4", "obfuscate,7,lz4", "obfuscate,124,lz4",
               "obfuscate,1", "LZ4", "gzip", "zstd,", "zstd,x", "", "auto,obfuscate,1,lz4"]
CHUNKER = ["default", "fixed,4194304", "fixed,64", "fixed,63", "fixed,4194304,4096", "fixed,20971479",
           "fixed,20971480", "fixed,4096,20971480", "buzhash,19,23,21,4095", "buzhash,6,6,6,1", "buzhash,5,23,21,4095",
           "buzhash,19,24,21,4095", "buzhash,19,23,24,4095", "buzhash,19,23,21,4096", "fixed", "fixed,1,2,3",
           "buzhash,19,23,21", "default,1", "fixed,4M", "rabin,19,23,21,4095", ""]


def _borg_accepts(parse, spec):
    try:
        parse(spec)
    except (argparse.ArgumentTypeError, ValueError, TypeError, KeyError):
        return False
    return True


def _ours_accepts(check, spec):
    try:
        assert check(spec) == spec
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("spec", COMPRESSION)
def test_compression_matches_borg(spec):
    assert _ours_accepts(borg_specs.check_compression, spec) == _borg_accepts(compress.CompressionSpec, spec)


@pytest.mark.parametrize("spec", CHUNKER)
def test_chunker_params_match_borg(spec):
    assert _ours_accepts(borg_specs.check_chunker_params, spec) == _borg_accepts(parseformat.ChunkerParams, spec)
