"""Sealing of Jupyter tokens at rest: authenticated encryption with a key derived from SECRET_KEY.

Fernet (AES-128-CBC with HMAC-SHA256, encrypt-then-MAC, from `cryptography`) gives
confidentiality and integrity. The key is derived per purpose with Django's
`salted_hmac`, so rotating SECRET_KEY makes old tokens unreadable (the services
keep running; their owners can no longer see the token and restart them).
"""

import base64

from cryptography.fernet import Fernet, InvalidToken
from django.utils.crypto import salted_hmac

_PURPOSE = "fetchml.jupyter.token-sealing"


def _fernet() -> Fernet:
    key = salted_hmac(_PURPOSE, "key", algorithm="sha256").digest()  # 32 bytes
    return Fernet(base64.urlsafe_b64encode(key))


def seal(secret: str) -> str:
    return _fernet().encrypt(secret.encode()).decode("ascii")


def unseal(sealed: str) -> str:
    """The secret, or "" when nothing is sealed or it was sealed under another key (or tampered with)."""
    if not sealed:
        return ""
    try:
        return _fernet().decrypt(sealed.encode("ascii")).decode()
    except (InvalidToken, ValueError):
        return ""
