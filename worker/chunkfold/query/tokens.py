"""The query listener's bearer token, followed as its file changes: a token is rotated without
a restart.

A Kubernetes Secret mounted as a file is updated in place (kubelet swaps a symlink), in each pod
at its own moment, a minute or more apart. So a member looks at the file at most every
``CHECK_EVERY_S`` (one ``stat``; it reads the file when its identity, size or time changed),
still accepts the token before the change for ``ROTATION_GRACE_S`` (clients and peers that have
not seen the change yet), and forwards with its current token, then with the previous one when
the owner refuses it (an owner that has not seen the change yet). A file that cannot be read or
is empty after the start keeps the last token in force (logged), so a half-written update never
opens or closes the listener. A token given as ``CHUNKFOLD_QUERY_TOKEN`` never changes.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable

from chunkfold.config import Settings, SettingsError

log = logging.getLogger("chunkfold.query")

CHECK_EVERY_S = 1.0
ROTATION_GRACE_S = 300.0


class BearerTokens:
    """The token a query must carry (None: none is required) and the one before a rotation."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.current = settings.query_bearer_token()  # at the start an unreadable file is fatal
        self.previous: str | None = None
        self.previous_until = 0.0
        self.checked_at = clock()
        self.file_identity = self._identity()

    def accepts(self, authorization: bytes) -> bool:
        """Whether an ``Authorization`` header value lets the request in (constant time)."""
        self._follow_file()
        if self.current is None:
            return True
        return any(
            hmac.compare_digest(authorization, f"Bearer {token}".encode()) for token in self._in_force()
        )

    def for_forwarding(self) -> list[str | None]:
        """The tokens to forward with, in order: the current one, then the previous one while
        its grace lasts."""
        self._follow_file()
        return list(self._in_force()) if self.current is not None else [None]

    def _in_force(self) -> tuple[str, ...]:
        assert self.current is not None
        if self.previous is not None and self.clock() < self.previous_until:
            return (self.current, self.previous)
        return (self.current,)

    def _identity(self) -> tuple[int, int, int, int] | None:
        path = self.settings.query_token_file
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _follow_file(self) -> None:
        if self.settings.query_token_file is None:
            return
        now = self.clock()
        if now - self.checked_at < CHECK_EVERY_S:
            return
        self.checked_at = now
        identity = self._identity()
        if identity == self.file_identity:
            return
        self.file_identity = identity
        try:
            token = self.settings.query_bearer_token()
        except SettingsError as exc:
            log.warning("query token file changed but cannot be used (%s): the token in force stays", exc)
            return
        if token != self.current:
            self.previous, self.previous_until = self.current, now + ROTATION_GRACE_S
            self.current = token
            log.info("query token rotated: the previous one is accepted for %.0f s more", ROTATION_GRACE_S)
