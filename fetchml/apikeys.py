"""Minting and checking API keys: `fetchml_<prefix>_<secret>`.

Only the prefix and SHA-256 of the secret are stored. The secret has 240 bits
of entropy, so a fast hash is enough (there is nothing to brute-force), and
the comparison is constant-time.
"""

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass

KEY_PREFIX = "fetchml"
_ALPHABET = string.ascii_letters + string.digits
_PREFIX_LEN = 10
_SECRET_LEN = 40


@dataclass(frozen=True)
class MintedKey:
    raw: str
    prefix: str
    secret_hash: str


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint() -> MintedKey:
    prefix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(_PREFIX_LEN))
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(_SECRET_LEN))
    return MintedKey(raw=f"{KEY_PREFIX}_{prefix}_{secret}", prefix=prefix, secret_hash=hash_secret(secret))


def split(raw: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    parts = raw.strip().split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    prefix, secret = parts[1], parts[2]
    if len(prefix) != _PREFIX_LEN or len(secret) != _SECRET_LEN:
        return None
    return prefix, secret


def secret_matches(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_hash)
