"""Cutting the socket of a database connection whose server stopped answering.

A PostgreSQL server process that is frozen (stopped, stuck in the kernel) with
its host up leaves the connection's socket open, and the host's kernel
acknowledges every packet: neither `tcp_user_timeout` nor keepalives fire, so a
query waits for good. Shutting the socket down from another thread wakes the
waiting call with an `OperationalError`; the caller's usual handling of a lost
connection (close, reconnect) then takes over, and the server rolls back
whatever the cut connection had not committed.
"""

import logging
import os
import socket

from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("fetchml.db")


def cut_connection(wrapper: BaseDatabaseWrapper) -> bool:
    """Shut down the socket of `wrapper`'s open PostgreSQL connection, from any thread.

    Whether there was one to cut: SQLite has no socket, and a closed connection nothing to wake.
    """
    raw = wrapper.connection
    if wrapper.vendor != "postgresql" or raw is None or raw.closed:
        return False
    try:
        descriptor = raw.pgconn.socket
    except Exception:  # closed meanwhile, by its own thread
        return False
    # A duplicate, so that closing our socket object leaves the connection's descriptor to its owner;
    # shutdown acts on the socket both descriptors share.
    with socket.socket(fileno=os.dup(descriptor)) as shared:
        try:
            shared.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False  # not connected any more
    logger.warning("cut a database connection whose server stopped answering (%s)", wrapper.alias)
    return True
