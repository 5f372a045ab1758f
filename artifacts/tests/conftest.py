from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def storage_dir(settings, tmp_path) -> Path:
    """Every test stores (and spools) its bytes in directories of its own, so it can check what is left."""
    root = tmp_path / "storage"
    spool = tmp_path / "spool"
    spool.mkdir()
    settings.FETCHML_STORAGE_DIR = str(root)
    settings.FILE_UPLOAD_TEMP_DIR = str(spool)
    return root


@pytest.fixture
def spool_dir(storage_dir: Path) -> Path:
    return storage_dir.parent / "spool"
