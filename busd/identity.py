"""Who is calling, and what they may do.

The routes ask this module, never decide themselves: `authenticate` turns a
request's headers into a Principal, and the `check_*` methods raise a BusError
(401/403) when the principal may not act. Open mode (a bus bound to loopback
with no credentials configured) lets everyone do everything, like both older
servers did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Principal:
    name: str | None      # the agent a credential is bound to; None when open
    admin: bool


OPEN_PRINCIPAL = Principal(name=None, admin=True)


class OpenAccess:
    """No credentials: any caller may send as, and read for, any name."""

    secure = False

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        return OPEN_PRINCIPAL

    def check_send_as(self, principal: Principal, sender: str) -> None:
        return None

    def check_read_as(self, principal: Principal, agent: str) -> None:
        return None

    def check_admin(self, principal: Principal) -> None:
        return None
