"""Sealing of Jupyter tokens at rest (fetchml.sealing, with this purpose's own key).

Rotating SECRET_KEY makes old tokens unreadable: the services keep running;
their owners can no longer see the token and restart them.
"""

from fetchml.sealing import Unsealable
from fetchml.sealing import seal as _seal
from fetchml.sealing import unseal as _unseal

_PURPOSE = "fetchml.jupyter.token-sealing"


def seal(secret: str) -> str:
    return _seal(secret.encode(), purpose=_PURPOSE)


def unseal(sealed: str) -> str:
    """The secret, or "" when nothing is sealed or it was sealed under another key (or tampered with)."""
    if not sealed:
        return ""
    try:
        return _unseal(sealed, purpose=_PURPOSE).decode()
    except Unsealable:
        return ""
