"""Print the salted hash of a password, for the `users` of a socks5 or http_connect route.

    python tools/hash_password.py            asks for the password (not echoed)
    printf %s "$PASSWORD" | python tools/hash_password.py

The output, "scrypt$<salt>$<hash>", goes in the route file as the user's password: the file
then holds no password at all.
"""

from __future__ import annotations

import getpass
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from triofwd._credentials import hash_password


def main() -> int:
    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.read().rstrip("\n")
    if not password:
        print("empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
