"""The CPU and I/O priority of kvm-borg's children (config `nice:` and `ionice:`): parsing, and the argv
prefix that applies them. Pure: nothing here runs a program.

The values are applied by prefixing a child's argv with coreutils `nice` and util-linux `ionice`
(both in every Debian base system), which set them in the child itself and exec the command: the
child and everything it starts later (borg's ssh, restic's sftp) inherit them from their first
instruction. Python cannot set them between fork and exec without `preexec_fn`, which is unsafe in
a threaded program (kvm-borg writes several repositories from threads), and setting them on the
child's pid after the start would miss what it read or started in its first moments.
"""

from __future__ import annotations

from dataclasses import dataclass

# ionice's scheduling classes by their config names, with ionice's class numbers.
IONICE_CLASSES = {"realtime": 1, "best-effort": 2, "idle": 3}
IONICE_LEVELS = range(0, 8)  # 0 is the highest priority within a class
NICE_VALUES = range(0, 20)


@dataclass(frozen=True)
class ChildPriority:
    """What every child gets: `nice` (0-19, None: inherit kvm-borg's), `ionice_class` (a key of
    IONICE_CLASSES, None: inherit) and `ionice_level` (0-7 within best-effort or realtime, None: the
    kernel's default for the class)."""

    nice: int | None = None
    ionice_class: str | None = None
    ionice_level: int | None = None

    @property
    def inherited(self) -> bool:
        """Whether nothing is set (children get kvm-borg's own priority)."""
        return self.nice is None and self.ionice_class is None


INHERIT = ChildPriority()


def parse_ionice(text: str) -> tuple[str, int | None]:
    """Given an `ionice:` value (`idle`, `best-effort[:LEVEL]`, `realtime[:LEVEL]`), return (class, level or
    None); ValueError with the reason for anything else (`idle` takes no level)."""
    name, sep, level_text = str(text).strip().partition(":")
    if name not in IONICE_CLASSES:
        raise ValueError(f"expected idle, best-effort[:LEVEL] or realtime[:LEVEL], got {text!r}")
    if not sep:
        return name, None
    if name == "idle":
        raise ValueError(f"the idle class takes no level, got {text!r}")
    if not level_text.isdigit() or int(level_text) not in IONICE_LEVELS:
        raise ValueError(f"the level of {name} is 0 (highest) to 7, got {text!r}")
    return name, int(level_text)


def child_priority(nice: int | None, ionice: str | None) -> ChildPriority:
    """Given the validated `nice:` and `ionice:` values (None: unset), return the ChildPriority."""
    if ionice is None:
        return ChildPriority(nice=nice)
    ionice_class, level = parse_ionice(ionice)
    return ChildPriority(nice=nice, ionice_class=ionice_class, ionice_level=level)


def priority_prefix(priority: ChildPriority, current_nice: int = 0, nice_binary: str = "nice",
                    ionice_binary: str = "ionice") -> tuple[str, ...]:
    """Given a ChildPriority, the niceness the child would inherit (the spawning thread's) and the paths of
    `nice` and `ionice`, return the argv prefix that applies it to the command put after it (empty when
    nothing changes); each part ends with `--`.

    `nice -n` adds to the inherited niceness, so it gets the difference: `nice: 10` under a systemd
    unit with `Nice=5` is `nice -n 5` (a negative step needs CAP_SYS_NICE, which root has)."""
    prefix: tuple[str, ...] = ()
    if priority.nice is not None and priority.nice != current_nice:
        prefix += (nice_binary, "-n", str(priority.nice - current_nice), "--")
    if priority.ionice_class is not None:
        prefix += (ionice_binary, "-c", str(IONICE_CLASSES[priority.ionice_class]))
        if priority.ionice_level is not None:
            prefix += ("-n", str(priority.ionice_level))
        prefix += ("--",)
    return prefix


def describe(priority: ChildPriority) -> str:
    """Given a ChildPriority, return it as one short text for logs and `doctor` ("nice 10, ionice idle")."""
    parts = []
    if priority.nice is not None:
        parts.append(f"nice {priority.nice}")
    if priority.ionice_class is not None:
        level = "" if priority.ionice_level is None else f":{priority.ionice_level}"
        parts.append(f"ionice {priority.ionice_class}{level}")
    return ", ".join(parts) or "inherited"
