"""The `users` of `socks5` and `http_connect` routes: passwords and their checking.

Pure code (hashing included; no I/O). A user's ``password`` in the route file is one of

- ``"scrypt$<salt>$<hash>"``: a salted hash, base64 (standard alphabet, padded) of the
  salt and of ``hashlib.scrypt(password, salt=salt, n=2**14, r=8, p=1, dklen=32)``; make
  one with :func:`hash_password`. The file then holds no password at all.
- ``"env:VARNAME"``: the password is the value of that environment variable, read when
  the route file is compiled (start, reload, check).
- anything else: the password itself. (One that starts with "env:" or "scrypt$" can only
  be given in the hash form.)

Comparisons are constant-time (:func:`hmac.compare_digest`, on fixed-length digests, so
not even a password's length shows), and an unknown name costs what a wrong password
costs. A hashed check takes a noticeable fraction of a second of CPU by design (that is
what makes a stolen hash expensive to attack), so :meth:`Users.verify` belongs in a
worker thread (``trio.to_thread.run_sync``); a success is remembered, under a per-process
key, so a returning client costs one HMAC.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Users", "compile_users", "hash_password"]

HASH_SCHEME = "scrypt"
ENV_PREFIX = "env:"
#: scrypt's cost: 16 MiB and about 0.1 s per check, the usual interactive-login setting.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
HASH_BYTES = 32
SALT_BYTES = 16
#: What a hash string's salt and hash may be: generous, yet never an empty salt.
_MIN_SALT_BYTES = 8
_HASH_LENGTHS = range(16, 65)
#: RFC 1929 carries a username in at most 255 bytes, and Basic (RFC 7617) cannot carry a
#: colon in one.
MAX_NAME_BYTES = 255


def hash_password(password: str | bytes, *, salt: bytes | None = None) -> str:
    """The ``scrypt$<salt>$<hash>`` form of a password, with a fresh random salt unless
    one is given (tests)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = _scrypt(_bytes(password), salt, HASH_BYTES)
    return f"{HASH_SCHEME}${_b64(salt)}${_b64(digest)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else text


def _scrypt(password: bytes, salt: bytes, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=length)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class _Secret:
    """What a password is checked against: a salted scrypt hash, or the SHA-256 of a
    password given in the file or the environment."""

    salt: bytes | None
    digest: bytes

    def matches(self, password: bytes) -> bool:
        if self.salt is None:
            return hmac.compare_digest(_sha256(password), self.digest)
        return hmac.compare_digest(_scrypt(password, self.salt, len(self.digest)), self.digest)


def _parse_hash(text: str) -> _Secret:
    parts = text.split("$")
    if len(parts) != 3:
        raise ValueError("invalid password hash: expected scrypt$<salt-base64>$<hash-base64>")
    try:
        salt = base64.b64decode(parts[1], validate=True)
        digest = base64.b64decode(parts[2], validate=True)
    except binascii.Error:
        raise ValueError("invalid password hash: the salt and the hash must be base64") from None
    if len(salt) < _MIN_SALT_BYTES or len(digest) not in _HASH_LENGTHS:
        raise ValueError(f"invalid password hash: expected a salt of at least {_MIN_SALT_BYTES} bytes and a hash of 16 to 64")
    return _Secret(salt=salt, digest=digest)


def _secret(password: str, environ: Mapping[str, str]) -> _Secret:
    if password.startswith(HASH_SCHEME + "$"):
        return _parse_hash(password)
    if password.startswith(ENV_PREFIX):
        name = password[len(ENV_PREFIX) :]
        if not name:
            raise ValueError('invalid password "env:": name the environment variable, e.g. "env:PROXY_PASSWORD"')
        value = environ.get(name)
        if not value:
            raise ValueError(f"environment variable {name} is not set (password {password!r})" if value is None else f"environment variable {name} is empty")
        return _Secret(salt=None, digest=_sha256(value.encode("utf-8")))
    if not password:
        raise ValueError("empty password")
    return _Secret(salt=None, digest=_sha256(password.encode("utf-8")))


class Users:
    """A route's compiled users: who may authenticate, and with what."""

    __slots__ = ("_hashed", "_key", "_secrets", "_verified")

    def __init__(self, secrets_by_name: Mapping[bytes, _Secret]) -> None:
        self._secrets = dict(secrets_by_name)
        self._hashed = any(secret.salt is not None for secret in self._secrets.values())
        # Successful hashed checks: name -> HMAC of the password under a key of this
        # process alone, so the cache is no shortcut for anyone who reads it.
        self._verified: dict[bytes, bytes] = {}
        self._key = secrets.token_bytes(32)

    def __bool__(self) -> bool:
        """True when the route asks for authentication."""
        return bool(self._secrets)

    def __len__(self) -> int:
        return len(self._secrets)

    @property
    def names(self) -> tuple[str, ...]:
        """The user names, in file order."""
        return tuple(name.decode("utf-8") for name in self._secrets)

    def verify(self, name: str | bytes, password: str | bytes) -> bool:
        """Whether ``name`` is a user and ``password`` theirs. Text is taken as UTF-8;
        bytes as sent (RFC 1929, Basic). CPU-heavy for a hashed user: see the module."""
        user, given = _bytes(name), _bytes(password)
        secret = self._secrets.get(user)
        if secret is None:
            # Spend what a real check spends, so that timing does not tell names apart.
            dummy = _DUMMY_HASHED if self._hashed else _DUMMY_PLAIN
            dummy.matches(given)
            return False
        if secret.salt is None:
            return secret.matches(given)
        mac = hmac.digest(self._key, given, "sha256")
        remembered = self._verified.get(user)
        if remembered is not None and hmac.compare_digest(remembered, mac):
            return True
        if not secret.matches(given):
            return False
        self._verified[user] = mac
        return True


_DUMMY_PLAIN = _Secret(salt=None, digest=bytes(32))
_DUMMY_HASHED = _Secret(salt=bytes(SALT_BYTES), digest=bytes(HASH_BYTES))


def compile_users(users: Iterable[tuple[str, str]], *, environ: Mapping[str, str] | None = None) -> Users:
    """Compile a route's `users` (name, password) pairs; ``environ`` (default
    ``os.environ``) is where "env:" passwords are read. Raises ValueError naming the user
    for an unset variable, a bad hash, an empty or duplicate name."""
    env = os.environ if environ is None else environ
    table: dict[bytes, _Secret] = {}
    for name, password in users:
        key = name.encode("utf-8")
        if not key or len(key) > MAX_NAME_BYTES or ":" in name:
            raise ValueError(f"invalid user name {name!r}: 1 to {MAX_NAME_BYTES} bytes (UTF-8), without ':'")
        if key in table:
            raise ValueError(f"user {name!r} is listed twice")
        try:
            table[key] = _secret(password, env)
        except ValueError as exc:
            raise ValueError(f"user {name!r}: {exc}") from None
    return Users(table)
