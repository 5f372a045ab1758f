import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from fetchml.localkeys import ensure_local_key
from fetchml.management.usernames import clean_username


def shown(path: Path) -> Path:
    """`path` as the reader can use it from here: relative inside the current directory (var/admin.key
    for `make run`), else absolute (FETCHML_VAR_DIR elsewhere)."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd())
    except ValueError:
        return absolute


class Command(BaseCommand):
    help = (
        "Make sure the embedded system has an admin user (for /admin/) and an admin API key, "
        "kept in FETCHML_VAR_DIR (the git-ignored var/ folder by default); print them. "
        "Safe to run any number of times."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")

    def handle(self, *args, username: str, **options):
        clean_username(username, argument="--username")
        password_file = Path(settings.VAR_DIR) / "admin-password"
        user_model = get_user_model()
        user = user_model.objects.filter(username=username).first()
        if user is None or not password_file.exists():
            password = secrets.token_urlsafe(12)
            if user is None:
                user_model.objects.create_superuser(username=username, email="", password=password)
            else:
                user.set_password(password)
                user.is_staff = user.is_superuser = True
                user.save()
            password_file.parent.mkdir(parents=True, exist_ok=True)
            password_file.touch(mode=0o600)
            password_file.write_text(password + "\n")
        password = password_file.read_text().strip()
        raw = ensure_local_key(file_name="admin.key", username=username, role="admin", key_name="local admin")
        key_file = Path(settings.VAR_DIR) / "admin.key"
        self.stdout.write(f"Admin login:   {username} / {password}   (stored in {shown(password_file)})")
        self.stdout.write(f"Admin API key: {raw}   (stored in {shown(key_file)})")
