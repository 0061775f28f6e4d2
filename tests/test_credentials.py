"""Tests for route users (triofwd._credentials): the three password forms, hashing, checks."""

from __future__ import annotations

import base64
import hashlib

import pytest

from triofwd import _credentials
from triofwd._credentials import SCRYPT_N, SCRYPT_P, SCRYPT_R, compile_users, hash_password

SALT = b"0123456789abcdef"


def test_hash_format() -> None:
    text = hash_password("s3cret", salt=SALT)
    scheme, salt, digest = text.split("$")
    assert scheme == "scrypt" and base64.b64decode(salt) == SALT
    assert base64.b64decode(digest) == hashlib.scrypt(b"s3cret", salt=SALT, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)


def test_hash_salts_are_random() -> None:
    assert hash_password("x") != hash_password("x")


@pytest.mark.parametrize(
    ("password", "environ"),
    [
        ("s3cret", {}),
        ("env:PROXY_PW", {"PROXY_PW": "s3cret"}),
        (hash_password("s3cret", salt=SALT), {}),
        (hash_password(b"s3cret"), {}),
    ],
)
def test_the_three_forms(password: str, environ: dict[str, str]) -> None:
    users = compile_users([("alice", password)], environ=environ)
    assert users and len(users) == 1 and users.names == ("alice",)
    assert users.verify("alice", "s3cret")
    assert users.verify(b"alice", b"s3cret")
    assert not users.verify("alice", "s3cret ")
    assert not users.verify("alice", "")
    assert not users.verify("alice", password) or password == "s3cret"  # the stored form is not the password
    assert not users.verify("bob", "s3cret")
    assert not users.verify("Alice", "s3cret")


def test_non_ascii_names_and_passwords_are_utf8() -> None:
    users = compile_users([("zoë", "pässwörd"), ("bob", hash_password("пароль"))])
    assert users.verify("zoë".encode(), "pässwörd".encode())
    assert users.verify("bob", "пароль".encode())
    assert not users.verify("zoë".encode("latin-1"), "pässwörd".encode("latin-1"))


def test_env_is_read_at_compile_time() -> None:
    environ = {"PW": "first"}
    users = compile_users([("alice", "env:PW")], environ=environ)
    environ["PW"] = "second"
    assert users.verify("alice", "first") and not users.verify("alice", "second")


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIOFWD_TEST_PW", "from-env")
    assert compile_users([("alice", "env:TRIOFWD_TEST_PW")]).verify("alice", "from-env")


@pytest.mark.parametrize(
    ("users", "environ", "match"),
    [
        ([("alice", "env:MISSING")], {}, "user 'alice': environment variable MISSING is not set"),
        ([("alice", "env:EMPTY")], {"EMPTY": ""}, "EMPTY is empty"),
        ([("alice", "env:")], {}, "name the environment variable"),
        ([("alice", "")], {}, "empty password"),
        ([("alice", "scrypt$")], {}, "invalid password hash"),
        ([("alice", "scrypt$a$b$c")], {}, "invalid password hash"),
        ([("alice", "scrypt$not base64$AAAA")], {}, "base64"),
        ([("alice", "scrypt$" + base64.b64encode(b"short").decode() + "$" + base64.b64encode(bytes(32)).decode())], {}, "salt of at least 8"),
        ([("alice", "scrypt$" + base64.b64encode(SALT).decode() + "$" + base64.b64encode(bytes(8)).decode())], {}, "hash of 16 to 64"),
        ([("alice", "a"), ("alice", "b")], {}, "listed twice"),
        ([("", "a")], {}, "invalid user name"),
        ([("a:b", "a")], {}, "without ':'"),
        ([("x" * 256, "a")], {}, "1 to 255 bytes"),
    ],
)
def test_bad_users(users: list[tuple[str, str]], environ: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compile_users(users, environ=environ)


def test_no_users_means_no_authentication() -> None:
    users = compile_users([])
    assert not users and len(users) == 0
    assert not users.verify("anyone", "anything")


def test_plain_checks_compare_fixed_length_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every comparison goes through compare_digest with equal lengths, so neither the
    password's length nor its first differing byte shows in the timing."""
    seen: list[tuple[int, int]] = []
    real = _credentials.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(_credentials.hmac, "compare_digest", spy)
    users = compile_users([("alice", "s3cret")])
    for guess in ("", "s", "s3cret", "x" * 1000):
        users.verify("alice", guess)
    users.verify("nobody", "x")
    assert seen and all(a == b == 32 for a, b in seen)


def test_unknown_names_cost_a_hash_when_users_are_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = _credentials._scrypt

    def spy(password: bytes, salt: bytes, length: int) -> bytes:
        calls.append(password)
        return real(password, salt, length)

    users = compile_users([("alice", hash_password("s3cret"))])
    monkeypatch.setattr(_credentials, "_scrypt", spy)
    assert not users.verify("nobody", "guess")
    assert calls == [b"guess"]


def test_a_success_is_remembered_and_a_failure_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = _credentials._scrypt

    def spy(password: bytes, salt: bytes, length: int) -> bytes:
        calls.append(password)
        return real(password, salt, length)

    users = compile_users([("alice", hash_password("s3cret"))])
    monkeypatch.setattr(_credentials, "_scrypt", spy)
    assert users.verify("alice", "s3cret")
    assert users.verify("alice", "s3cret")
    assert calls == [b"s3cret"]  # the second success cost one HMAC
    assert not users.verify("alice", "wrong")
    assert not users.verify("alice", "wrong")
    assert calls == [b"s3cret", b"wrong", b"wrong"]  # failures always pay
    # a new compile (a reload) starts with nothing remembered
    again = compile_users([("alice", hash_password("other"))])
    assert not again.verify("alice", "s3cret")


def test_hash_accepts_other_lengths() -> None:
    digest = hashlib.scrypt(b"pw", salt=SALT, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=64)
    text = f"scrypt${base64.b64encode(SALT).decode()}${base64.b64encode(digest).decode()}"
    users = compile_users([("a", text)])
    assert users.verify("a", "pw") and not users.verify("a", "pW")
