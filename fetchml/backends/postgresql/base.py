"""Django's PostgreSQL backend, its waits on the server timed by `fetchml.dbwatch`.

Statements are timed by an execute wrapper; commit, rollback and the health
check at the start of a request talk to psycopg directly, so they are timed
here. Where no watchdog runs (any process but a server's), timing costs one
attribute read per call.
"""

from typing import Any

from django.db.backends.postgresql import base

from fetchml import dbwatch


class DatabaseWrapper(base.DatabaseWrapper):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute_wrappers.append(dbwatch.watched_execute)

    def _commit(self) -> None:
        with dbwatch.waiting_on(self):
            super()._commit()

    def _rollback(self) -> None:
        with dbwatch.waiting_on(self):
            super()._rollback()

    def is_usable(self) -> bool:
        with dbwatch.waiting_on(self):
            return super().is_usable()
