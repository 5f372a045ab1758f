"""Keys the embedded mode keeps for itself in the git-ignored var/ folder.

The database only holds key hashes, so the raw keys that `make run` prints and
that local worker agents use are kept in files readable by the owner only.
"""

from pathlib import Path

from django.conf import settings
from django.db import transaction

from fetchml import apikeys
from fetchml.models import ApiKey
from fetchml.services import apikey_create, user_get_or_create


def _still_valid(raw: str) -> bool:
    parts = apikeys.split(raw)
    if parts is None:
        return False
    key = ApiKey.objects.filter(prefix=parts[0]).first()
    return bool(key and key.is_usable and apikeys.secret_matches(parts[1], key.secret_hash))


def ensure_local_key(*, file_name: str, username: str, role: str, key_name: str) -> str:
    """The raw key stored in var/<file_name>, minted (and stored) if missing or revoked."""
    path = Path(settings.VAR_DIR) / file_name
    if path.exists():
        raw = path.read_text().strip()
        if _still_valid(raw):
            return raw
    with transaction.atomic():
        user = user_get_or_create(username=username, is_staff=role == ApiKey.Role.ADMIN)
        _key, raw = apikey_create(user=user, role=role, name=key_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(raw + "\n")
    return raw
