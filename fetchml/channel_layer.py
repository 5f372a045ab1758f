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
"""

import logging
import time
from typing import Any

from channels_redis.core import RedisChannelLayer as UpstreamRedisChannelLayer

logger = logging.getLogger("fetchml.channel_layer")

# KEYS: the channels' keys on one connection; ARGV: a message per key, a capacity per key,
# then the time now, the expiry in seconds and the score before which messages have expired.
_DELIVER = """
local over_capacity = 0
local now = ARGV[#ARGV - 2]
local expiry = ARGV[#ARGV - 1]
local expired_before = ARGV[#ARGV]
for i = 1, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, expired_before)
    if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[i + #KEYS]) then
        redis.call('ZADD', KEYS[i], now, ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return over_capacity
"""


class RedisChannelLayer(UpstreamRedisChannelLayer):
    _deliver: Any = None

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        assert self.require_valid_group_name(group), "Group name not valid"
        key = self._group_key(group)
        pipe = self.connection(self.consistent_hash(group)).pipeline(transaction=False)
        pipe.zremrangebyscore(key, min=0, max=int(time.time()) - self.group_expiry)
        pipe.zrange(key, 0, -1)
        _, members = await pipe.execute()
        channel_names = [member.decode("utf8") for member in members]
        if not channel_names:
            return
        per_connection, message_of, capacity_of = self._map_channel_keys_to_connection(channel_names, message)
        for index, channel_keys in per_connection.items():
            now = time.time()
            args = [message_of[channel_key] for channel_key in channel_keys]
            args += [capacity_of[channel_key] for channel_key in channel_keys]
            args += [now, self.expiry, int(now) - int(self.expiry)]
            connection = self.connection(index)
            if self._deliver is None:  # hashed once; run by hash, loaded again on NOSCRIPT
                self._deliver = connection.register_script(_DELIVER)
            over_capacity = await self._deliver(keys=channel_keys, args=args, client=connection)
            if over_capacity > 0:
                logger.info("%s of %s channels over capacity in group %s", over_capacity, len(channel_names), group)
