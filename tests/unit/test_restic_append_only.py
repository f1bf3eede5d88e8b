"""An append-only REST server's refusal to delete, as restic 0.14 reports it (lines taken from a real
`restic forget` against `rclone serve restic --append-only`)."""

import pytest

from kvm_borg.backends.restic.output import APPEND_ONLY_REFUSAL, refused_delete

REFUSED = ("Remove(<snapshot/07928e9958>) returned error, retrying after 552.330144ms: blob not removed, "
           "server response: 403 Forbidden (403)")


def test_the_first_refused_remove_names_the_kind_of_file():
    assert refused_delete(REFUSED) == "snapshot"
    assert refused_delete(REFUSED.replace("snapshot/07928e9958", "data/5f3a") + "\n") == "data"


@pytest.mark.parametrize("line", [
    "unable to remove <snapshot/07928e9958> from the repository",
    "Remove(<snapshot/07928e9958>) returned error, retrying after 1s: server response: 500 Internal Server Error (500)",
    "Save(<data/5f3a>) returned error, retrying after 1s: server response: 403 Forbidden (403)",
    "[0:43] 0.00%  0 / 1 files deleted",
])
def test_other_lines_are_not_a_refusal(line):
    assert refused_delete(line) is None


def test_the_message_is_one_line_naming_the_server_side_prune():
    message = APPEND_ONLY_REFUSAL.format(kind="snapshot")
    assert "\n" not in message and "append-only" in message and "docs/repositories.md" in message
