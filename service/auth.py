"""Roles and bearer tokens.

Roles, each allowed what the ones below it may do:
- ``admin``: promote, rollback, register, delete, retrain, schedules, drift checks, job logs; its labels are
  authoritative (they override any other label of the same image).
- ``labeller``: ``POST /feedback`` with trusted labels (they may enter the gate's target holdout).
- ``contributor``: ``POST /feedback`` with untrusted labels (training only; never the gate's holdout).
- ``client``: predictions and reads. Open to everyone unless client tokens are configured.

Tokens come from the environment (``ADAPTSERVE_ADMIN_TOKEN``, ``ADAPTSERVE_ADMIN_TOKENS``,
``ADAPTSERVE_LABELLER_TOKENS``, ``ADAPTSERVE_CONTRIBUTOR_TOKENS``, ``ADAPTSERVE_CLIENT_TOKENS``: comma-separated
for rotation) and from a tokens file (``ADAPTSERVE_TOKENS_FILE``, default ``$ADAPTSERVE_HOME/tokens`` when it
exists): one ``ROLE TOKEN [NAME]`` per line, ``#`` comments; re-read when it changes, so a token is rotated by
editing the file. Only ``Authorization: Bearer <token>`` is accepted, compared in constant time against every
configured token. Feedback is closed unless a labeller or contributor token exists or the operator opens it to
anonymous, untrusted labels with ``ADAPTSERVE_FEEDBACK_OPEN=1``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from models import settings
from service.errors import ForbiddenError, UnauthorizedError

ROLES = ("client", "contributor", "labeller", "admin")  # each role may do what the ones before it may
RANK = {role: i for i, role in enumerate(ROLES)}
TOKEN_SETTINGS = {  # role -> the settings holding its comma-separated tokens
    "admin": ("admin_token", "admin_tokens"),
    "labeller": ("labeller_tokens",),
    "contributor": ("contributor_tokens",),
    "client": ("client_tokens",),
}
ENV_TOKENS = {role: tuple(settings.env_name(f) for f in names) for role, names in TOKEN_SETTINGS.items()}
TOKENS_FILE_ENV = settings.env_name("tokens_file")
FEEDBACK_OPEN_ENV = settings.env_name("feedback_open")
TOKENS_FILE = "tokens"


class TokenFileError(ValueError):
    """The tokens file cannot be used as written; the message names the line."""


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a role and a name for the audit trail (never the token itself)."""

    role: str | None  # None: no token (anonymous)
    name: str

    def may(self, role: str) -> bool:
        return self.role is not None and RANK[self.role] >= RANK[role]


ANONYMOUS = Principal(None, "anonymous")


@dataclass(frozen=True)
class _Token:
    digest: bytes  # sha256 of the token: compared with compare_digest, so length leaks nothing either
    role: str
    name: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _name(role: str, token: str, source: str) -> str:
    return f"{role}:{source}:{hashlib.sha256(token.encode()).hexdigest()[:8]}"


def parse_tokens_file(text: str, shown: str) -> list[tuple[str, str, str]]:
    """(role, token, name) per line of a tokens file."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or parts[0] not in RANK:
            raise TokenFileError(
                f"{shown} line {n}: expected 'ROLE TOKEN [NAME]' with ROLE one of {', '.join(ROLES)}"
            )
        if len(parts[1]) < 16:
            raise TokenFileError(f"{shown} line {n}: a token must be at least 16 characters")
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else _name(parts[0], parts[1], "file")))
    return out


def write_tokens_file(path: Path, tokens: dict[str, str]) -> None:
    """Create a tokens file readable by its owner only (O_EXCL: never overwrite one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    lines = ["# ROLE TOKEN [NAME]; roles: " + ", ".join(ROLES), *(f"{r} {t} {r}-1" for r, t in tokens.items())]
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def generate_tokens(path: Path, roles: tuple[str, ...] = ("admin", "labeller")) -> dict[str, str]:
    tokens = {role: secrets.token_urlsafe(24) for role in roles}
    write_tokens_file(path, tokens)
    return tokens


def tokens_file_path(home: Path, s: settings.Settings | None = None) -> Path:
    return (s or settings.load()).tokens_file or Path(home) / TOKENS_FILE


class Authenticator:
    """Resolves `Authorization` headers to a Principal; raises 401/403 through `require`."""

    def __init__(self, home: Path, environ: dict[str, str] | None = None) -> None:
        s = settings.load(environ)
        self.file = tokens_file_path(home, s)
        self._env_tokens = [
            _Token(_digest(tok), role, _name(role, tok, "env"))
            for role, names in TOKEN_SETTINGS.items()
            for name in names
            for tok in (t.strip() for t in getattr(s, name).split(","))
            if tok
        ]
        self.feedback_open = s.feedback_open
        self._lock = threading.Lock()
        self._file_stamp: tuple[int, int] | None = None
        self._file_tokens: list[_Token] = []
        self.tokens()  # a broken tokens file stops the start, with its line number

    def tokens(self) -> list[_Token]:
        """Environment tokens plus the file's, re-read when its mtime or size changes (rotation without restart)."""
        try:
            st = self.file.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._file_stamp:
            with self._lock:
                parsed = parse_tokens_file(self.file.read_text(), str(self.file)) if stamp else []
                self._file_tokens = [_Token(_digest(t), role, name) for role, t, name in parsed]
                self._file_stamp = stamp
        return self._env_tokens + self._file_tokens

    def roles(self) -> set[str]:
        return {t.role for t in self.tokens()}

    def identify(self, authorization: str | None) -> Principal:
        """ANONYMOUS without a header; 401 for anything but a known `Bearer <token>`."""
        if not authorization:
            return ANONYMOUS
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthorizedError("malformed Authorization header: send 'Authorization: Bearer <token>'")
        digest, match = _digest(token.strip()), None
        for t in self.tokens():  # every token is compared, so the time taken says nothing about which matched
            if hmac.compare_digest(digest, t.digest) and match is None:
                match = t
        if match is None:
            raise UnauthorizedError("wrong token: it is not one of this service's tokens")
        return Principal(match.role, match.name)

    def require(self, authorization: str | None, role: str, action: str) -> Principal:
        """The caller's Principal if it may act as `role`; else 401 (no or wrong token) or 403 (too weak a role)."""
        who = self.identify(authorization)
        if who.may(role):
            return who
        if role == "client" and "client" not in self.roles():
            return who  # predictions and reads are open unless client tokens are configured
        if role == "contributor" and self.feedback_open:
            return who  # the operator opened feedback to anonymous, untrusted labels
        if who.role is None:
            raise UnauthorizedError(self._missing(role, action))
        raise ForbiddenError(f"{action} needs the {role} role; this token's role is {who.role}")

    def _missing(self, role: str, action: str) -> str:
        if role == "admin" and "admin" not in self.roles():
            return (f"{action} is disabled: no admin token is configured (set ADAPTSERVE_ADMIN_TOKEN or add an "
                    f"'admin' line to {self.file})")
        if role == "contributor" and not self.roles() & {"contributor", "labeller"}:
            return (f"{action} is closed: configure a labeller token (ADAPTSERVE_LABELLER_TOKENS or the tokens "
                    f"file), or open it to anonymous, untrusted labels with {FEEDBACK_OPEN_ENV}=1; admin tokens "
                    "may always label")
        article = "an" if role[0] in "aeiou" else "a"
        return f"{action} needs {article} {role} token: send 'Authorization: Bearer <token>'"
