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
"""

import logging
import time
from typing import Any

from channels_redis.core import RedisChannelLayer as UpstreamRedisChannelLayer

logger = logging.getLogger("fetchml.channel_layer")

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

# Apart enough to keep their order as Redis stores scores (doubles: about 0.25 microseconds apart
# at today's times), close enough not to pass a message sent a moment later.
_SCORE_STEP = 1e-6


class RedisChannelLayer(UpstreamRedisChannelLayer):
    _deliver: Any = None

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await self.group_send_all([(group, message)])

    async def group_send_all(self, sends: list[tuple[str, dict[str, Any]]]) -> None:
        """`group_send` of each (group, message), with every group's members read in one pipeline and
        every delivery made by one run of the script (per Redis connection); a channel gets its
        messages in the order of `sends`."""
        for group, _ in sends:
            assert self.require_valid_group_name(group), "Group name not valid"
        members = await self._members_of({group for group, _ in sends})
        deliveries: dict[int, list[tuple[str, bytes, int]]] = {}
        for group, message in sends:
            if not members[group]:
                continue
            per_connection, message_of, capacity_of = self._map_channel_keys_to_connection(members[group], message)
            for index, channel_keys in per_connection.items():
                deliveries.setdefault(index, []).extend(
                    (channel_key, message_of[channel_key], capacity_of[channel_key]) for channel_key in channel_keys
                )
        for index, delivered in deliveries.items():
            over_capacity = await self._deliver_all(index, delivered)
            if over_capacity > 0:
                groups = ", ".join(sorted({group for group, _ in sends}))
                logger.info(
                    "%s of %s deliveries over their channel's capacity (groups %s)",
                    over_capacity,
                    len(delivered),
                    groups,
                )

    async def _members_of(self, groups: set[str]) -> dict[str, list[str]]:
        """Each group's members, those past `group_expiry` dropped first: one pipeline per connection."""
        by_connection: dict[int, list[str]] = {}
        for group in sorted(groups):
            by_connection.setdefault(self.consistent_hash(group), []).append(group)
        joined_before = int(time.time()) - self.group_expiry
        members: dict[str, list[str]] = {}
        for index, grouped in by_connection.items():
            pipe = self.connection(index).pipeline(transaction=False)
            for group in grouped:
                key = self._group_key(group)
                pipe.zremrangebyscore(key, min=0, max=joined_before)
                pipe.zrange(key, 0, -1)
            replies = await pipe.execute()
            for group, names in zip(grouped, replies[1::2], strict=True):
                members[group] = [name.decode("utf8") for name in names]
        return members

    async def _deliver_all(self, index: int, delivered: list[tuple[str, bytes, int]]) -> int:
        """Run the script for (channel key, message, capacity) deliveries on one connection; how many
        found their channel full."""
        now = time.time()
        keys = [channel_key for channel_key, _, _ in delivered]
        args: list[Any] = [message for _, message, _ in delivered]
        args += [capacity for _, _, capacity in delivered]
        args += [now + position * _SCORE_STEP for position in range(len(delivered))]
        args += [self.expiry, int(now) - int(self.expiry)]
        connection = self.connection(index)
        if self._deliver is None:  # hashed once; run by hash, loaded again on NOSCRIPT
            self._deliver = connection.register_script(_DELIVER)
        return await self._deliver(keys=keys, args=args, client=connection)
