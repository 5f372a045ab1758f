"""Sealing: authenticated encryption with a key derived from SECRET_KEY, one key per purpose.

Fernet (AES-128-CBC with HMAC-SHA256, encrypt-then-MAC, from `cryptography`)
gives confidentiality and integrity. Each purpose gets its own key through
Django's `salted_hmac`, so a value sealed for one purpose cannot be opened as
another; rotating SECRET_KEY makes everything sealed before unreadable.
"""

import base64

from cryptography.fernet import Fernet, InvalidToken
from django.utils.crypto import salted_hmac


class Unsealable(ValueError):
    """Not sealed for this purpose under the current SECRET_KEY (or tampered with)."""


def _fernet(purpose: str) -> Fernet:
    key = salted_hmac(purpose, "key", algorithm="sha256").digest()  # 32 bytes
    return Fernet(base64.urlsafe_b64encode(key))


def seal(data: bytes, *, purpose: str) -> str:
    return _fernet(purpose).encrypt(data).decode("ascii")


def unseal(sealed: str, *, purpose: str) -> bytes:
    try:
        return _fernet(purpose).decrypt(sealed.encode("ascii"))
    except (InvalidToken, ValueError) as exc:
        raise Unsealable(purpose) from exc
