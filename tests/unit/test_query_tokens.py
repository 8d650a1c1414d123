"""The query token file is followed as it changes: a rotation needs no restart, the previous
token is accepted for a grace period, and a broken update leaves the token in force."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from chunkfold.config import Settings
from chunkfold.query import tokens as tokens_module
from chunkfold.query.tokens import ROTATION_GRACE_S, BearerTokens

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(token: str) -> bytes:
    return f"Bearer {token}".encode()


def follower(tmp_path: Path, token: str) -> tuple[BearerTokens, Path, Clock]:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    clock = Clock()
    settings = Settings(bootstrap_servers="unused:9092", query_token_file=path)
    return BearerTokens(settings, clock), path, clock


def test_a_rotated_file_is_taken_within_a_check_and_the_old_token_has_a_grace(tmp_path: Path) -> None:
    tokens, path, clock = follower(tmp_path, "old-token")
    assert tokens.accepts(bearer("old-token")) and not tokens.accepts(bearer("new-token-2"))
    path.write_text("new-token-2\n")
    assert not tokens.accepts(bearer("new-token-2"))  # not looked at again within CHECK_EVERY_S
    clock.now += tokens_module.CHECK_EVERY_S
    assert tokens.accepts(bearer("new-token-2")) and tokens.accepts(bearer("old-token"))
    assert tokens.for_forwarding() == ["new-token-2", "old-token"]
    clock.now += ROTATION_GRACE_S
    assert tokens.accepts(bearer("new-token-2")) and not tokens.accepts(bearer("old-token"))
    assert tokens.for_forwarding() == ["new-token-2"]
    assert not tokens.accepts(b"") and not tokens.accepts(b"Bearer ")


@pytest.mark.parametrize("damage", ["empty", "removed"])
def test_a_broken_update_keeps_the_token_in_force(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    tokens, path, clock = follower(tmp_path, "kept-token")
    if damage == "empty":
        path.write_text("")
    else:
        path.unlink()
    clock.now += tokens_module.CHECK_EVERY_S
    with caplog.at_level(logging.WARNING, logger="chunkfold.query"):
        assert tokens.accepts(bearer("kept-token"))
    assert tokens.for_forwarding() == ["kept-token"]
    assert "cannot be used" in caplog.text and "kept-token" not in caplog.text
    path.write_text("fixed-token-3\n")
    clock.now += tokens_module.CHECK_EVERY_S
    assert tokens.accepts(bearer("fixed-token-3")) and tokens.accepts(bearer("kept-token"))


def test_a_token_from_the_environment_and_no_token_never_change() -> None:
    fixed = BearerTokens(Settings(bootstrap_servers="unused:9092", query_token="env-token"), Clock())
    assert fixed.accepts(bearer("env-token")) and not fixed.accepts(bearer("other"))
    assert fixed.for_forwarding() == ["env-token"]
    open_listener = BearerTokens(Settings(bootstrap_servers="unused:9092"), Clock())
    assert open_listener.accepts(b"") and open_listener.for_forwarding() == [None]
