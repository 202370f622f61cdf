"""Kombu's Redis transport, except that one undecodable message can't stop a worker.

Kombu decodes each message popped from a queue list inline; a list item that is not a
message (`lpush generate 'not json'`, a forged envelope, a body that is not valid
base64) raises out of the consumer loop and Celery stops the worker with
"Unrecoverable error". Here such an item is logged and dropped (it was already popped,
so nothing redelivers it) and the worker keeps serving. Everything else is kombu's.

Used by workers.app through `broker_transport`. Knows kombu's Redis channel only.
"""

from __future__ import annotations

import binascii
import logging

from kombu.transport import redis as kombu_redis

log = logging.getLogger("cai.worker")

# what decoding a non-message raises: not JSON (ValueError), JSON of the wrong shape
# (KeyError/TypeError/AttributeError), a body that is not base64 (binascii.Error)
UNDECODABLE = (ValueError, KeyError, TypeError, AttributeError, binascii.Error, UnicodeDecodeError)


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except UNDECODABLE as e:
            log.error("dropped an undecodable queue message (%s: %s)", type(e).__name__, str(e)[:200])
            raise kombu_redis.Empty() from None

    def _get(self, queue):
        while True:  # drop undecodable items until a message or an empty queue
            try:
                return super()._get(queue)
            except UNDECODABLE as e:
                log.error("dropped an undecodable message from %s (%s: %s)", queue, type(e).__name__, str(e)[:200])


class Transport(kombu_redis.Transport):
    Channel = Channel

