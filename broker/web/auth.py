"""API tokens with a read, write or audit role, from the ``api_tokens`` setting: no token, no data.

The audit role is apart from the other two: it reads the audit trail and nothing else, and neither
read nor write can read the audit trail (who looked at the records is not who works with them).

A client sends ``Authorization: Bearer <token>``. The browser's EventSource cannot set a header, so
the live stream (and only it) also accepts ``?token=<token>``. Tokens are compared in constant time and
never logged; a request gets 401 without a known token and 403 when its role is only read.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

ROLES = {"read": 1, "write": 2}
"""The data roles, each allowing what the lower one does; ``audit`` is outside this order."""
AUDIT_ROLE = "audit"
_bearer = HTTPBearer(auto_error=False, description="an API token from the api_tokens setting")


@dataclass(frozen=True)
class Caller:
    """Who is calling: a short, non-secret label of the token (for the archive and logs) and its role."""

    label: str
    role: str


class TokenBook:
    """The configured tokens; :meth:`caller` finds the one presented."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = dict(tokens)

    def caller(self, presented: str | None) -> Caller | None:
        if not presented:
            return None
        found: Caller | None = None
        for token, role in self._tokens.items():  # every token compared: no early exit on a match
            if hmac.compare_digest(token.encode(), presented.encode()):
                found = Caller(f"token {token[:4]}…", role)
        return found


def _check(request: Request, presented: str | None, needed: str) -> Caller:
    book: TokenBook = request.app.state.tokens
    caller = book.caller(presented)
    if caller is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "an API token is required (Authorization: Bearer)",
                            headers={"WWW-Authenticate": "Bearer"})
    if (caller.role == AUDIT_ROLE) != (needed == AUDIT_ROLE) or (
            needed != AUDIT_ROLE and ROLES[caller.role] < ROLES[needed]):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this token has the {caller.role} role; "
                            f"this request needs {needed}")
    return caller


def reader(request: Request,
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    """Dependency: a token with the read (or write) role."""
    return _check(request, credentials.credentials if credentials else None, "read")


def writer(request: Request,
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    """Dependency: a token with the write role."""
    return _check(request, credentials.credentials if credentials else None, "write")


def auditor(request: Request,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    """Dependency: a token with the audit role (and only that role reads the audit trail)."""
    return _check(request, credentials.credentials if credentials else None, AUDIT_ROLE)


def stream_reader(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                  token: Annotated[str | None, Query(description="the API token (EventSource cannot "
                                                                 "send a header)")] = None) -> Caller:
    """Dependency of the live stream: the token from the header or the ``token`` query parameter."""
    return _check(request, credentials.credentials if credentials else token, "read")


ReadAccess = Annotated[Caller, Depends(reader)]
WriteAccess = Annotated[Caller, Depends(writer)]
AuditAccess = Annotated[Caller, Depends(auditor)]
