"""The worker agent: runs assigned tasks on one machine, speaking only the worker WebSocket protocol.

Nothing in this package touches the database, so it runs on a machine that has the
repository and its requirements but no access to the server's database.
"""

AGENT_VERSION = "0.1.0"
