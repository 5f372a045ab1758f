"""A task's entrypoint as users write it (`train.py`, `run.sh`): a first word that names a file of
the work directory (the unpacked snapshot) runs that file; any other word is a command on PATH.

Such a file runs itself when it is executable (its `#!` line picks the interpreter); otherwise a
`.py` file runs with `python3` and a `.sh` file with `sh`, as found on the task's PATH.
"""

from __future__ import annotations

import os
from pathlib import Path

INTERPRETERS = {".py": "python3", ".sh": "sh"}


def resolve(argv: list[str], *, work_dir: Path) -> list[str]:
    """`argv` with its program made the work directory's file it names, if it names one.

    Raises ValueError for a file that can neither run itself nor be given to an interpreter."""
    program = argv[0]
    script = work_dir / program
    if os.sep in program or not script.is_file():
        return argv  # a path (relative to the work directory) or a command: exec finds it
    if os.access(script, os.X_OK):
        return [os.path.join(".", program), *argv[1:]]
    interpreter = INTERPRETERS.get(script.suffix)
    if interpreter is None:
        raise ValueError(
            f"{program!r} is a file of the work directory but not executable: make it executable, "
            f"or name its interpreter in the entrypoint (e.g. `python3 {program}`)"
        )
    return [interpreter, program, *argv[1:]]
