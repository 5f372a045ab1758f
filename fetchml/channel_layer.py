"""The Redis channel layer, with a group send in two Redis round trips instead of four.

Every `assign` reaches its worker through a group send, so the send's round
trips stand between a dispatch's commit and the worker. channels_redis (pinned
in requirements/base.txt; this class leans on its internals) makes four: drop
the group's expired members, read the members, drop each channel's expired
messages, add the message. Here the first two go in one pipeline and the last
two in one script, run by its hash (the script text crosses once per
connection, not with every send). What a send does is unchanged: members
past `group_expiry` are dropped, expired messages are dropped first, a
channel at `capacity` does not get the message (logged, as channels_redis
does).

`group_send_all` sends the messages of a whole transaction (a batch of
reports, a dispatch round: task events to three groups, a wake-up, the
workers' assigns) in those two round trips, not two per group.

A receive, and joining or leaving a group, outlive a cut connection (Redis
restarted, a proxy between): each tries again on a new connection, so a
consumer waiting for its next message, or subscribing a client to a task, is
not torn down with it. A receive tries for as long as Redis is away: its
consumer's socket goes on without Redis (a worker's heartbeats and reports
reach the database), so an outage of any length does not cost a worker its
lease; joining or leaving a group gives up after `RECONNECT_SECONDS`. Nothing
is lost or doubled by trying again: channels_redis keeps a message popped but
not yet handed over in a backup queue that the next receive puts back first,
and a group member added or removed twice is added or removed once.

The groups this process's consumers are in are kept up in Redis by the layer:
it remembers each membership it was asked for, and puts them all back (one
pipeline) before a receive that lost its connection waits again, and every
`MEMBERSHIP_REFRESH_SECONDS` otherwise. So a Redis restarted empty, or a
member past `group_expiry` (a worker connected for a day), still gets its
group's messages; without it a connected worker was sent no work again.
A join cut short while Redis is away (`join_group`) is completed so too.

`group_send_all_blocking` is the same send for synchronous code (what a
transaction publishes after its commit), on blocking connections of its
own: without it every such send is handed to an event loop and waited for
(`async_to_sync`), a hand-off that delayed each `assign` by about 0.2 ms
(measured). The two share everything but the waiting on Redis.
"""

import asyncio
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
from channels_redis.core import RedisChannelLayer as UpstreamRedisChannelLayer

logger = logging.getLogger("fetchml.channel_layer")
T = TypeVar("T")

# KEYS: the channels' keys on one connection, in delivery order (a key may come again); ARGV: a
# message per key, a capacity per key, a score per key (messages leave a channel lowest score first),
# then the expiry in seconds and the score before which messages have expired.
_DELIVER = """
local over_capacity = 0
local n = #KEYS
local expiry = ARGV[#ARGV - 1]
local expired_before = ARGV[#ARGV]
for i = 1, n do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, expired_before)
    if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[n + i]) then
        redis.call('ZADD', KEYS[i], ARGV[2 * n + i], ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return over_capacity
"""

RECONNECT_SECONDS = 30.0
RECONNECT_MAX_DELAY = 2.0
# A publication from synchronous code (a transaction's messages, after its commit) is best effort:
# the database is the record and every listener re-reads it. A Redis that stops answering costs it
# this long, not the 15 s a receive's socket waits (settings), which a submission would wait too.
PUBLISH_TIMEOUT_SECONDS = 2.0

# How often a process puts its consumers' group memberships back in Redis without a sign that
# Redis lost them (a restart is such a sign: the process's receive loses its connection).
MEMBERSHIP_REFRESH_SECONDS = 60.0
# How long a consumer's join may hold up its connection while Redis is away (`join_group`).
JOIN_WAIT_SECONDS = 1.0

# Apart enough to keep their order as Redis stores scores (doubles: about 0.25 microseconds apart
# at today's times), close enough not to pass a message sent a moment later.
_SCORE_STEP = 1e-6


class RedisChannelLayer(UpstreamRedisChannelLayer):
    _deliver: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._blocking_clients: dict[int, tuple[redis.Redis, Any]] = {}  # host index -> (client, script)
        self._blocking_clients_lock = threading.Lock()
        self._memberships: set[tuple[str, str]] = set()  # (group, channel) joined from this process
        self._memberships_refreshed_at = time.monotonic()

    @property
    def sends_blocking(self) -> bool:
        """Whether `group_send_all_blocking` can reach every host (each given by an address; a
        Sentinel host is reached through the event loop's connections only)."""
        return all("address" in host for host in self.hosts)

    async def new_channel(self, prefix: str = "specific") -> str:
        # Every channel of a process gets the one default prefix, whatever is asked: channels_redis
        # keeps each prefix's messages in a list of its own and lets one receive at a time pop, from
        # its own prefix's list only, so a channel of another prefix waited behind the consumers'
        # receive (an SSE stream got its messages only at its heartbeat's re-read).
        return await super().new_channel()

    async def receive_single(self, channel: str) -> Any:
        # A receive that lost its connection may find Redis restarted, empty: it puts the
        # memberships back before it waits again.
        return await _reconnecting(
            f"receive on {channel}",
            lambda: self._receive_single_joined(channel),
            give_up_after=None,
            on_failure=self.refresh_memberships_soon,
        )

    async def _receive_single_joined(self, channel: str) -> Any:
        if time.monotonic() - self._memberships_refreshed_at >= MEMBERSHIP_REFRESH_SECONDS:
            await self._refresh_memberships()
        return await super().receive_single(channel)

    async def group_add(self, group: str, channel: str) -> None:
        # Remembered first: a join cut short (cancelled while Redis is away) is completed by the refresh.
        self._memberships.add((group, channel))
        try:
            await _reconnecting(
                f"adding {channel} to {group}",
                lambda: super(RedisChannelLayer, self).group_add(group, channel),
                give_up_after=RECONNECT_SECONDS,
            )
        except (redis.ConnectionError, redis.TimeoutError):
            self._memberships.discard((group, channel))  # the caller learns it failed: not joined
            raise

    async def group_discard(self, group: str, channel: str) -> None:
        self._memberships.discard((group, channel))
        await _reconnecting(
            f"removing {channel} from {group}",
            lambda: super(RedisChannelLayer, self).group_discard(group, channel),
            give_up_after=RECONNECT_SECONDS,
        )

    def refresh_memberships_soon(self) -> None:
        """Put the memberships back before the next receive (Redis may have lost some)."""
        self._memberships_refreshed_at = -math.inf

    async def _refresh_memberships(self) -> None:
        """Put every membership of this process back in Redis (joined again: the member's time is now)."""
        joined = sorted(self._memberships)
        await self._pipelined(joined, lambda pipe, key, channel: _rejoin(pipe, key, channel, self.group_expiry))
        # A member that left while its join was being made again must stay gone.
        left = [membership for membership in joined if membership not in self._memberships]
        await self._pipelined(left, lambda pipe, key, channel: pipe.zrem(key, channel))
        self._memberships_refreshed_at = time.monotonic()

    async def _pipelined(self, memberships: list[tuple[str, str]], queue: Callable[[Any, str, str], Any]) -> None:
        """`queue(pipe, group key, channel)` for each membership, one pipeline per Redis connection."""
        by_connection: dict[int, list[tuple[str, str]]] = {}
        for group, channel in memberships:
            by_connection.setdefault(self.consistent_hash(group), []).append((group, channel))
        for index, pairs in by_connection.items():
            pipe = self.connection(index).pipeline(transaction=False)
            for group, channel in pairs:
                queue(pipe, self._group_key(group), channel)
            await pipe.execute()

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await self.group_send_all([(group, message)])

    async def group_send_all(self, sends: list[tuple[str, dict[str, Any]]]) -> None:
        """`group_send` of each (group, message), with every group's members read in one pipeline and
        every delivery made by one run of the script (per Redis connection); a channel gets its
        messages in the order of `sends`."""
        members: dict[str, list[str]] = {}
        for index, grouped in self._groups_by_connection(sends).items():
            pipe = self._member_reads(self.connection(index).pipeline(transaction=False), grouped)
            members |= _members_from(grouped, await pipe.execute())
        for index, delivered in self._deliveries(sends, members).items():
            connection = self.connection(index)
            if self._deliver is None:  # hashed once; run by hash, loaded again on NOSCRIPT
                self._deliver = connection.register_script(_DELIVER)
            keys, args = self._deliver_arguments(delivered)
            _note_over_capacity(await self._deliver(keys=keys, args=args, client=connection), delivered, sends)

    def group_send_all_blocking(self, sends: list[tuple[str, dict[str, Any]]]) -> None:
        """`group_send_all` from synchronous code, waiting on Redis in the calling thread (only where
        `sends_blocking`; a thread that runs an event loop would be held up by it)."""
        members: dict[str, list[str]] = {}
        for index, grouped in self._groups_by_connection(sends).items():
            client, _ = self._blocking_client(index)
            members |= _members_from(grouped, self._member_reads(client.pipeline(transaction=False), grouped).execute())
        for index, delivered in self._deliveries(sends, members).items():
            client, deliver = self._blocking_client(index)
            keys, args = self._deliver_arguments(delivered)
            _note_over_capacity(deliver(keys=keys, args=args, client=client), delivered, sends)

    async def close_pools(self) -> None:
        await super().close_pools()
        with self._blocking_clients_lock:
            clients, self._blocking_clients = self._blocking_clients, {}
        for client, _ in clients.values():
            client.connection_pool.disconnect()

    def _blocking_client(self, index: int) -> tuple[redis.Redis, Any]:
        """The blocking client of host `index` and the delivery script on it, made on first use
        (thread-safe, as the client's pool is)."""
        with self._blocking_clients_lock:
            made = self._blocking_clients.get(index)
            if made is None:
                host = dict(self.hosts[index]) | {
                    "socket_timeout": PUBLISH_TIMEOUT_SECONDS,
                    "socket_connect_timeout": PUBLISH_TIMEOUT_SECONDS,
                }
                client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(host.pop("address"), **host))
                made = self._blocking_clients[index] = (client, client.register_script(_DELIVER))
            return made

    def _groups_by_connection(self, sends: list[tuple[str, dict[str, Any]]]) -> dict[int, list[str]]:
        for group, _ in sends:
            assert self.require_valid_group_name(group), "Group name not valid"
        by_connection: dict[int, list[str]] = {}
        for group in sorted({group for group, _ in sends}):
            by_connection.setdefault(self.consistent_hash(group), []).append(group)
        return by_connection

    def _member_reads(self, pipe: Any, groups: list[str]) -> Any:
        """`pipe` with the reads of each group's members queued, those past `group_expiry` dropped first."""
        joined_before = int(time.time()) - self.group_expiry
        for group in groups:
            key = self._group_key(group)
            pipe.zremrangebyscore(key, min=0, max=joined_before)
            pipe.zrange(key, 0, -1)
        return pipe

    def _deliveries(
        self, sends: list[tuple[str, dict[str, Any]]], members: dict[str, list[str]]
    ) -> dict[int, list[tuple[str, bytes, int]]]:
        """(channel key, message, capacity) of every delivery, in the order of `sends`, by connection."""
        deliveries: dict[int, list[tuple[str, bytes, int]]] = {}
        for group, message in sends:
            if not members[group]:
                continue
            per_connection, message_of, capacity_of = self._map_channel_keys_to_connection(members[group], message)
            for index, channel_keys in per_connection.items():
                deliveries.setdefault(index, []).extend(
                    (channel_key, message_of[channel_key], capacity_of[channel_key]) for channel_key in channel_keys
                )
        return deliveries

    def _deliver_arguments(self, delivered: list[tuple[str, bytes, int]]) -> tuple[list[str], list[Any]]:
        """The delivery script's keys and arguments for (channel key, message, capacity) deliveries."""
        now = time.time()
        keys = [channel_key for channel_key, _, _ in delivered]
        args: list[Any] = [message for _, message, _ in delivered]
        args += [capacity for _, _, capacity in delivered]
        args += [now + position * _SCORE_STEP for position in range(len(delivered))]
        args += [self.expiry, int(now) - int(self.expiry)]
        return keys, args


def _rejoin(pipe: Any, key: str, channel: str, group_expiry: int) -> None:
    pipe.zadd(key, {channel: time.time()})
    pipe.expire(key, group_expiry)


async def join_group(layer: Any, group: str, channel: str) -> None:
    """`group_add` that holds its caller up for JOIN_WAIT_SECONDS at most: a consumer's connection
    goes on while Redis is away, and the layer completes the join once Redis is back."""
    try:
        await asyncio.wait_for(layer.group_add(group, channel), JOIN_WAIT_SECONDS)
    except TimeoutError:
        logger.warning("joining %s waits for Redis; the join is made once Redis is back", group)
        if isinstance(layer, RedisChannelLayer):
            layer.refresh_memberships_soon()


async def _reconnecting(
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    give_up_after: float | None,
    on_failure: Callable[[], None] | None = None,
) -> T:
    """`call()`, made again on a new connection while Redis cannot be reached, for up to
    `give_up_after` seconds (None: until it can be; only for what is safe to repeat). The
    delays grow to `RECONNECT_MAX_DELAY`, with jitter: many consumers do not come back at once.
    `on_failure()` is called after each failure."""
    started = time.monotonic()
    delay, failures = 0.05, 0
    while True:
        try:
            result = await call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if give_up_after is not None and time.monotonic() + delay > started + give_up_after:
                raise
            # Once per outage at warning: a thousand consumers retrying would drown the log.
            said = logger.warning if failures == 0 else logger.debug
            said("%s lost its connection (%s); trying again", what, exc)
            failures += 1
            if on_failure is not None:
                on_failure()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
            continue
        if failures:
            logger.info("%s is back after %.1f s", what, time.monotonic() - started)
        return result


def _members_from(groups: list[str], replies: list[Any]) -> dict[str, list[str]]:
    return {group: [name.decode("utf8") for name in names] for group, names in zip(groups, replies[1::2], strict=True)}


def _note_over_capacity(
    over_capacity: int, delivered: list[tuple[str, bytes, int]], sends: list[tuple[str, dict[str, Any]]]
) -> None:
    if over_capacity > 0:
        groups = ", ".join(sorted({group for group, _ in sends}))
        logger.info(
            "%s of %s deliveries over their channel's capacity (groups %s)", over_capacity, len(delivered), groups
        )
