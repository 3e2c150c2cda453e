"""Checkpoint state: what a resume or generate accepts before loading anything (fast, no Ray)."""

import pytest

from raygpt import checkpoint as ckpt
from raygpt.errors import UserError

GOOD = {"format_version": 1, "config": {"model": {"context_len": 8}}}


@pytest.mark.parametrize("state, message", [
    ([], "not a mapping"),
    ({**GOOD, "format_version": "1"}, "format_version '1' is not an integer"),
    ({**GOOD, "format_version": 2}, "has format 2, newer than this raygpt reads"),
    ({"format_version": 1}, "has no model config"),
    ({"format_version": 1, "config": {"model": None}}, "has no model config"),
])
def test_a_state_this_raygpt_cannot_use_is_refused_in_one_line(state, message):
    with pytest.raises(UserError, match=message):
        ckpt.check_state(state, "run/checkpoint_0000004")
    ckpt.check_state(GOOD, "run/checkpoint_0000004")
