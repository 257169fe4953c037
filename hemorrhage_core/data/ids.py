"""One-way identifiers: what callers write to run records instead of raw patient ids."""

from __future__ import annotations

import hashlib

HASH_HEX_LENGTH = 16


def hash_id(value: object, salt: str = "") -> str:
    """Return a one-way pseudonym (sha256, first 16 hex digits) of ``value``, optionally salted.

    The separator keeps ``salt="a", value="bc"`` distinct from ``salt="ab", value="c"``.
    """
    digest = hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()
    return digest[:HASH_HEX_LENGTH]
