"""API tokens with a read, write, audit or wall role, from the ``api_tokens`` setting and the file of
token hashes (``api_tokens_file``): no token, no data.

The audit role is apart from the other two: it reads the audit trail and nothing else, and neither
read nor write can read the audit trail (who looked at the records is not who works with them).

The wall role is below read and apart from it: a token for a screen in a corridor, which the public
can see. It reads the wall view's routes (``/api/board/wall...``: patients as initials, no birth dates,
no archive) and is refused (403) everywhere else; read and write tokens may read the wall routes too
(a desk can open the wall view).

A client sends ``Authorization: Bearer <token>``. The browser's EventSource cannot set a header, so
the live stream (and only it) also accepts ``?token=<token>``. Tokens are compared in constant time and
never logged; a request gets 401 without a known token and 403 when its role is only read.

The file holds no secret: each line is ``<SHA-256 of the token, hex> <role> [label]`` (``#`` comments
and blank lines ignored), so the tokens themselves need not sit in the environment or a compose file
(``broker token hash`` prints such a line). A presented token is hashed and compared with every hash in
constant time; the hash itself is not a token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from broker.config import API_ROLES, StartupError

ROLES = {"read": 1, "write": 2}
"""The data roles, each allowing what the lower one does; ``audit`` is outside this order."""
AUDIT_ROLE = "audit"
WALL_ROLE = "wall"
_bearer = HTTPBearer(auto_error=False, description="an API token from the api_tokens setting")


@dataclass(frozen=True)
class Caller:
    """Who is calling: a short, non-secret label of the token (for the archive and logs) and its role."""

    label: str
    role: str


@dataclass(frozen=True)
class HashedToken:
    """A line of the tokens file: the SHA-256 digest of a token, its role and the caller's label."""

    digest: bytes
    role: str
    label: str


def token_line(token: str, role: str, label: str = "") -> str:
    """The tokens file's line for ``token`` (what ``broker token hash`` prints)."""
    return " ".join(part for part in (hashlib.sha256(token.encode()).hexdigest(), role, label) if part)


def read_tokens_file(path: str | Path) -> list[HashedToken]:
    """The hashed tokens of the file at ``path``; a bad line raises StartupError naming its number
    (and never what the line holds: it may be a token pasted where its hash belongs)."""
    tokens: list[HashedToken] = []
    seen: set[bytes] = set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split(None, 2)
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{path}, line {number}"
        if len(fields) < 2 or len(fields[0]) != 64 or not _is_hex(fields[0]):
            raise StartupError(f"{where}: each line is '<SHA-256 of the token, 64 hex digits> <role> [label]'")
        if fields[1] not in API_ROLES:
            raise StartupError(f"{where}: the role is one of {', '.join(API_ROLES)}")
        digest = bytes.fromhex(fields[0])
        if digest in seen:
            raise StartupError(f"{where}: the same token hash is given twice")
        seen.add(digest)
        label = fields[2].strip() if len(fields) > 2 else f"token {fields[0][:8].lower()}"
        tokens.append(HashedToken(digest, fields[1], label))
    return tokens


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


class TokenBook:
    """The configured tokens (plain from ``api_tokens``, hashed from the tokens file); :meth:`caller`
    finds the one presented."""

    def __init__(self, tokens: dict[str, str], hashed: Iterable[HashedToken] = ()) -> None:
        self._tokens = dict(tokens)
        self._hashed = list(hashed)

    def __len__(self) -> int:
        return len(self._tokens) + len(self._hashed)

    def caller(self, presented: str | None) -> Caller | None:
        if not presented:
            return None
        found: Caller | None = None
        for token, role in self._tokens.items():  # every token compared: no early exit on a match
            if hmac.compare_digest(token.encode(), presented.encode()):
                found = Caller(f"token {token[:4]}…", role)
        digest = hashlib.sha256(presented.encode()).digest()
        for entry in self._hashed:
            if hmac.compare_digest(entry.digest, digest):
                found = Caller(entry.label, entry.role)
        return found


def _check(request: Request, presented: str | None, needed: str) -> Caller:
    book: TokenBook = request.app.state.tokens
    caller = book.caller(presented)
    request.state.caller = caller  # who it was, for the audit record of the request (a 403 too)
    if caller is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "an API token is required (Authorization: Bearer)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not _allows(caller.role, needed):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this token has the {caller.role} role; "
                            f"this request needs {needed}")
    return caller


def _allows(role: str, needed: str) -> bool:
    """Whether a token of ``role`` may make a request that needs ``needed``: audit only for audit; the wall
    routes for wall, read and write; read and write by their order. Unknown roles get nothing."""
    if AUDIT_ROLE in (role, needed):
        return role == needed
    if needed == WALL_ROLE:
        return role == WALL_ROLE or role in ROLES
    return role in ROLES and needed in ROLES and ROLES[role] >= ROLES[needed]


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


def wall_reader(request: Request,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    """Dependency of the wall view's data: a wall, read or write token."""
    return _check(request, credentials.credentials if credentials else None, WALL_ROLE)


def wall_stream_reader(request: Request,
                       credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                       token: Annotated[str | None, Query(description="the API token (EventSource cannot "
                                                                      "send a header)")] = None) -> Caller:
    """Dependency of the wall's live stream: a wall, read or write token from the header or the ``token``
    query parameter."""
    return _check(request, credentials.credentials if credentials else token, WALL_ROLE)


ReadAccess = Annotated[Caller, Depends(reader)]
WallAccess = Annotated[Caller, Depends(wall_reader)]
WriteAccess = Annotated[Caller, Depends(writer)]
AuditAccess = Annotated[Caller, Depends(auditor)]
