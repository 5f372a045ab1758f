"""`manage.py serve` as a supervisor sees it: a server that cannot listen fails."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from django.conf import settings


def test_serve_on_a_port_already_taken_exits_non_zero_saying_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "FETCHML_VAR_DIR": str(tmp_path)}
        result = subprocess.run(
            [sys.executable, "manage.py", "serve", "--port", str(port), "--workers", "0"],
            cwd=Path(settings.BASE_DIR),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert result.returncode != 0
    assert f"nothing is listening on 127.0.0.1:{port}" in result.stderr
    assert "Address already in use" in result.stderr
