"""TEMPORARY TEST DOUBLE (view helper): stands in for kvm_borg.segments (segcore's module) until it
lands on the `bitmap` branch; remove this directory then. Installs itself only when the real module
is missing. Same functions and numbers as the contract in design.md."""

import importlib.util
import sys
import types


def _install() -> None:
    try:
        if importlib.util.find_spec("kvm_borg.segments") is not None:
            return
    except ImportError:
        return
    m = types.ModuleType("kvm_borg.segments")
    base, index_bits, disk_bits = 2**61, 40, 12
    low = (1 << (index_bits + disk_bits)) - 1

    def segment_count(virtual_size, size):
        return -(-virtual_size // size)

    def segment_length(index, virtual_size, size):
        if not 0 <= index < segment_count(virtual_size, size):
            raise ValueError(index)
        return min(size, virtual_size - index * size)

    def width(count):
        return max(8, len(str(max(count - 1, 0))))

    def segment_name(index, count):
        if not 0 <= index < count:
            raise ValueError(index)
        return f"{index:0{width(count)}d}"

    def parse_segment_name(name, count):
        if len(name) != width(count) or not name.isascii() or not name.isdigit():
            return None
        index = int(name)
        return index if index < count else None

    def segment_inode(chain, disk_index, index):
        return base | (((disk_index << index_bits) | index) ^ ((chain * 0x9E3779B97F4A7C15) & low))

    for f in (segment_count, segment_length, segment_name, parse_segment_name, segment_inode):
        setattr(m, f.__name__, f)
    m.SEGMENT_INODE_BASE = base
    sys.modules["kvm_borg.segments"] = m


_install()
