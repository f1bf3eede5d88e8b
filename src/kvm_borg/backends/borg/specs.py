"""Borg's `--compression` and `--chunker-params` syntax, checked before borg ever runs.

Pure functions mirroring borg 1.4's own parsers (borg.compress.CompressionSpec and
borg.helpers.ChunkerParams) and their limits, so a typo in the config is one line at load time
instead of a failure in the middle of a backup, after the guest went onto its overlay.
"""

from __future__ import annotations

MAX_DATA_SIZE = 20971479  # borg.constants.MAX_DATA_SIZE: the largest chunk borg stores
_LEVELS = {"zstd": (1, 22), "zlib": (0, 9), "lzma": (0, 9)}
_PLAIN = ("none", "lz4")


def _obfuscate_level_ok(level: int) -> bool:
    return 1 <= level <= 6 or 110 <= level <= 123 or level == 250


def _int(text: str, what: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"{what} must be a whole number, got {text!r}")
    return int(text)


def _plain_compression(parts: list[str]) -> None:
    name, args = parts[0], parts[1:]
    if name in _PLAIN and not args:
        return
    if name in _LEVELS and len(args) <= 1:
        if args:
            low, high = _LEVELS[name]
            level = _int(args[0], f"{name} level")
            if not low <= level <= high:
                raise ValueError(f"{name} level must be {low}..{high}, got {level}")
        return
    raise ValueError("expected none, lz4, zstd[,L], zlib[,L], lzma[,L], auto,C[,L] or obfuscate,SPEC,C[,L]")


def check_compression(spec: str) -> str:
    """Given a borg compression spec, return it unchanged or raise ValueError saying what is wrong.

    Accepts none, lz4, zstd[,1..22], zlib[,0..9], lzma[,0..9], auto,C[,L] and
    obfuscate,SPEC,C[,L] (SPEC 1..6, 110..123 or 250; C may itself be auto,...)."""
    parts = spec.split(",")
    if parts[0] == "obfuscate":
        if len(parts) < 3:
            raise ValueError("obfuscate needs a level and a compression: obfuscate,SPEC,C[,L]")
        level = _int(parts[1], "obfuscate level")
        if not _obfuscate_level_ok(level):
            raise ValueError(f"obfuscate level must be 1..6, 110..123 or 250, got {level}")
        parts = parts[2:]
    while parts[0] == "auto":  # borg takes auto,auto,C too
        if len(parts) < 2 or parts[1] == "obfuscate":
            raise ValueError("auto needs a compression: auto,C[,L]")
        parts = parts[1:]
    _plain_compression(parts)
    return spec


def check_chunker_params(spec: str) -> str:
    """Given borg chunker params, return them unchanged or raise ValueError saying what is wrong.

    Accepts `default`, `fixed,BLOCK[,HEADER]` (64 ≤ BLOCK, both ≤ borg's MAX_DATA_SIZE) and
    `buzhash,CHUNK_MIN_EXP,CHUNK_MAX_EXP,HASH_MASK_BITS,HASH_WINDOW_SIZE` (6 ≤ min ≤ mask ≤ max ≤ 23,
    odd window)."""
    parts = spec.split(",")
    algo = parts[0]
    if algo == "default" and len(parts) == 1:
        return spec
    if algo == "fixed" and len(parts) in (2, 3):
        block = _int(parts[1], "block size")
        header = _int(parts[2], "header size") if len(parts) == 3 else 0
        if block < 64:
            raise ValueError(f"block size must be at least 64 bytes, got {block}")
        if block > MAX_DATA_SIZE or header > MAX_DATA_SIZE:
            raise ValueError(f"block and header size must not exceed {MAX_DATA_SIZE} bytes")
        return spec
    if algo == "buzhash" and len(parts) == 5:
        low, high, mask, window = (_int(p, n) for p, n in zip(parts[1:], (
            "CHUNK_MIN_EXP", "CHUNK_MAX_EXP", "HASH_MASK_BITS", "HASH_WINDOW_SIZE")))
        if not low <= mask <= high:
            raise ValueError("required: CHUNK_MIN_EXP ≤ HASH_MASK_BITS ≤ CHUNK_MAX_EXP")
        if low < 6 or high > 23:
            raise ValueError("chunk size exponents must be within 6..23")
        if window % 2 == 0:
            raise ValueError(f"HASH_WINDOW_SIZE must be odd, got {window}")
        return spec
    raise ValueError("expected default, fixed,BLOCK[,HEADER] or buzhash,MIN_EXP,MAX_EXP,MASK_BITS,WINDOW")
