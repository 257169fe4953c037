"""What keeps the dashboard safe to expose: an upload size cap below Shiny, and sanitised errors.

Shiny writes every uploaded byte to a temporary file before the app sees it and has no size limit
of its own, so ``UploadSizeLimit`` wraps the ASGI app: an upload body is cut after ``max_bytes + 1``
bytes (the rest is read and thrown away, so the browser's request still completes), and the app then
refuses the oversized file with a message instead of the disk filling up.

``user_message`` turns any exception into text fit for the page: the project's own errors carry
messages written for users; anything else becomes a generic sentence, and its details (type and
stack frames, never the exception's message, which could quote header values) go to the server log.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from hemorrhage_core.errors import HemorrhageError

log = logging.getLogger("hemorrhage_core.dashboard")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Shiny's upload endpoint: POST /session/<session id>/upload/<job id> (after any mount prefix).
_UPLOAD_PATH = re.compile(r"/session/[^/]+/upload/[^/]+/?$")

GENERIC_ERROR = "Something went wrong while processing this request. The details are in the server log."


class UploadSizeLimit:
    """ASGI middleware: no upload request body longer than ``max_bytes + 1`` reaches the wrapped app.

    Other requests and websockets pass through untouched. The extra byte lets the app tell an
    oversized file (size > cap) from one of exactly the cap.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.app = app
        self.max_bytes = int(max_bytes)

    def __getattr__(self, name: str) -> Any:
        # Let code that expects the wrapped shiny.App (e.g. ``app.sanitize_errors``) still reach it.
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope.get("type") != "http"
            or scope.get("method") != "POST"
            or not _UPLOAD_PATH.search(scope.get("path", ""))
        ):
            await self.app(scope, receive, send)
            return
        await self.app(scope, _capped_receive(receive, self.max_bytes + 1), send)


def _capped_receive(receive: Receive, limit: int) -> Receive:
    seen = 0
    done = False

    async def capped() -> Message:
        nonlocal seen, done
        if done:
            return await receive()
        message = await receive()
        if message.get("type") != "http.request":
            return message
        body = message.get("body", b"")
        room = limit - seen
        if len(body) <= room:
            seen += len(body)
            return message
        # Over the cap: keep what fits, drain and drop the rest, and tell the app the body has ended.
        kept = body[: max(room, 0)]
        seen = limit
        more = message.get("more_body", False)
        while more:
            extra = await receive()
            if extra.get("type") != "http.request":
                break
            more = extra.get("more_body", False)
        done = True
        log.warning("an upload exceeded the size cap and was cut off before reaching the disk")
        return {"type": "http.request", "body": kept, "more_body": False}

    return capped


def user_message(exc: BaseException, *, context: str = "") -> str:
    """Text for the page: the project's errors say what is wrong; others get a generic sentence.

    Unexpected errors are logged with their type and stack frames only (``context`` says where).
    """
    if isinstance(exc, HemorrhageError):
        log.info("refused %s: %s", context or "a request", type(exc).__name__)
        return str(exc) or type(exc).__name__
    log_unexpected(exc, context=context)
    return GENERIC_ERROR


def log_unexpected(exc: BaseException, *, context: str = "") -> None:
    """Log an unexpected error's type and stack frames (file, line, function), leaving out its message."""
    frames = "\n".join(
        f"  {f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__)
    )
    log.error(
        "unexpected %s in %s (message withheld)\n%s", type(exc).__name__, context or "the dashboard", frames
    )
