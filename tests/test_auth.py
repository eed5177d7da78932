"""Roles and bearer tokens (service/auth.py): who may do what, token sources, rotation, exact refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.auth import ANONYMOUS, Authenticator, TokenFileError, generate_tokens, parse_tokens_file
from service.errors import ForbiddenError, UnauthorizedError

ADMIN, LABELLER, CONTRIB, CLIENT = "a" * 20, "l" * 20, "c" * 20, "k" * 20
ENV = {
    "ADAPTSERVE_ADMIN_TOKENS": f"{ADMIN}, {ADMIN}-rotated",
    "ADAPTSERVE_LABELLER_TOKENS": LABELLER,
    "ADAPTSERVE_CONTRIBUTOR_TOKENS": CONTRIB,
}


def _auth(tmp_path: Path, **env: str) -> Authenticator:
    return Authenticator(tmp_path, {**ENV, **env})


@pytest.mark.parametrize(
    "token, role, allowed",
    [
        (ADMIN, "admin", True),
        (f"{ADMIN}-rotated", "admin", True),
        (ADMIN, "labeller", True),
        (ADMIN, "contributor", True),
        (LABELLER, "labeller", True),
        (LABELLER, "admin", False),
        (LABELLER, "contributor", True),
        (CONTRIB, "contributor", True),
        (CONTRIB, "labeller", False),
        (CONTRIB, "admin", False),
    ],
    ids=["admin", "rotated-admin", "admin-labels", "admin-contributes", "labeller", "labeller-not-admin",
         "labeller-contributes", "contributor", "contributor-not-labeller", "contributor-not-admin"],
)
def test_each_role_may_do_what_the_roles_below_it_may(tmp_path: Path, token: str, role: str, allowed: bool) -> None:
    auth = _auth(tmp_path)
    if allowed:
        assert auth.require(f"Bearer {token}", role, "x").may(role)
    else:
        with pytest.raises(ForbiddenError, match=f"x needs the {role} role; this token's role is "):
            auth.require(f"Bearer {token}", role, "x")


@pytest.mark.parametrize(
    "header, message",
    [
        (None, "promote needs an admin token: send 'Authorization: Bearer <token>'"),
        (ADMIN, "malformed Authorization header: send 'Authorization: Bearer <token>'"),
        (f"Basic {ADMIN}", "malformed Authorization header: send 'Authorization: Bearer <token>'"),
        ("Bearer ", "malformed Authorization header: send 'Authorization: Bearer <token>'"),
        (f"Bearer {ADMIN}x", "wrong token: it is not one of this service's tokens"),
        (f"Bearer {ADMIN[:-1]}", "wrong token: it is not one of this service's tokens"),
    ],
    ids=["none", "bare-token", "basic-scheme", "empty-bearer", "longer", "prefix"],
)
def test_only_a_known_bearer_token_is_accepted(tmp_path: Path, header: str | None, message: str) -> None:
    with pytest.raises(UnauthorizedError) as err:
        _auth(tmp_path).require(header, "admin", "promote")
    assert str(err.value) == message
    assert err.value.status_code == 401 and err.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_scheme_is_case_insensitive_as_rfc_7235_says(tmp_path: Path) -> None:
    assert _auth(tmp_path).require(f"bearer {ADMIN}", "admin", "x").role == "admin"


def test_without_admin_tokens_admin_routes_are_disabled(tmp_path: Path) -> None:
    with pytest.raises(UnauthorizedError, match="promote is disabled: no admin token is configured"):
        Authenticator(tmp_path, {}).require(None, "admin", "promote")


@pytest.mark.parametrize(
    "env, header, outcome",
    [
        ({}, None, "promote|feedback is closed: configure a labeller token"),
        ({"ADAPTSERVE_FEEDBACK_OPEN": "1"}, None, "anonymous"),
        ({"ADAPTSERVE_LABELLER_TOKENS": LABELLER}, None, "feedback needs a contributor token"),
        ({"ADAPTSERVE_LABELLER_TOKENS": LABELLER}, f"Bearer {LABELLER}", "labeller"),
    ],
    ids=["closed-by-default", "opened-by-the-operator", "closed-to-anonymous", "labeller"],
)
def test_feedback_is_closed_unless_a_labeller_token_exists_or_the_operator_opens_it(
    tmp_path: Path, env: dict, header: str | None, outcome: str
) -> None:
    auth = Authenticator(tmp_path, env)
    if outcome in ("anonymous", "labeller"):
        assert (auth.require(header, "contributor", "feedback").role or "anonymous") == outcome
    else:
        with pytest.raises(UnauthorizedError, match=outcome.split("|")[-1]):
            auth.require(header, "contributor", "feedback")


def test_predictions_are_open_until_client_tokens_are_configured(tmp_path: Path) -> None:
    assert _auth(tmp_path).require(None, "client", "prediction") == ANONYMOUS
    closed = _auth(tmp_path, ADAPTSERVE_CLIENT_TOKENS=CLIENT)
    with pytest.raises(UnauthorizedError, match="prediction needs a client token"):
        closed.require(None, "client", "prediction")
    assert closed.require(f"Bearer {CLIENT}", "client", "prediction").role == "client"
    assert closed.require(f"Bearer {LABELLER}", "client", "prediction").role == "labeller"


def test_the_tokens_file_is_read_and_reread_when_it_changes(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text(f"# comment\nadmin {ADMIN} ops-alice\nlabeller {LABELLER}\n")
    auth = Authenticator(tmp_path, {})
    assert auth.require(f"Bearer {ADMIN}", "admin", "x").name == "ops-alice"
    assert auth.require(f"Bearer {LABELLER}", "labeller", "x").name.startswith("labeller:file:")
    file.write_text(f"admin {ADMIN}-new ops-alice\n")  # rotation: the old token stops working, no restart
    os.utime(file, ns=(1, 1))
    with pytest.raises(UnauthorizedError, match="wrong token"):
        auth.require(f"Bearer {ADMIN}", "admin", "x")
    assert auth.require(f"Bearer {ADMIN}-new", "admin", "x").role == "admin"


@pytest.mark.parametrize(
    "text, message",
    [
        (f"root {ADMIN}", "tokens line 1: expected 'ROLE TOKEN [NAME]' with ROLE one of client, contributor, "
                          "labeller, admin"),
        ("admin short", "tokens line 1: a token must be at least 16 characters"),
        (f"\nadmin {ADMIN} a b", "tokens line 2: expected 'ROLE TOKEN [NAME]'"),
    ],
    ids=["unknown-role", "short-token", "extra-field"],
)
def test_a_broken_tokens_file_names_its_line(text: str, message: str) -> None:
    with pytest.raises(TokenFileError) as err:
        parse_tokens_file(text, "tokens")
    assert str(err.value).startswith(message)


def test_generated_tokens_are_private_and_never_overwritten(tmp_path: Path) -> None:
    tokens = generate_tokens(tmp_path / "tokens")
    assert set(tokens) == {"admin", "labeller"} and all(len(t) >= 24 for t in tokens.values())
    assert (tmp_path / "tokens").stat().st_mode & 0o777 == 0o600
    auth = Authenticator(tmp_path, {})
    assert auth.require(f"Bearer {tokens['admin']}", "admin", "x").name == "admin-1"
    with pytest.raises(FileExistsError):
        generate_tokens(tmp_path / "tokens")
