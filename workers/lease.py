"""A fenced lease on one unit of a round, held in Redis and renewed by a heartbeat thread.

Acquiring takes a fresh fencing token (INCR on the unit's fence counter) and sets the
lease key to "<token>|<holder>" with a TTL, only if no live lease exists. While the
work runs a daemon thread renews the TTL; if the holder dies the lease expires and
another delivery may take the unit with a higher token. `current()` is the check made
right before committing an output: true only while this lease is the unit's newest.

redis-py has Lock (used for short mutexes in workers.service) but no fencing tokens, hence this.

Knows Redis and the key names; knows nothing about stages, files or Celery.
"""

from __future__ import annotations

import threading
import time

from workers import keys

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
local value = token .. '|' .. ARGV[2]
redis.call('SET', KEYS[1], value, 'PX', ARGV[1])
return value
"""
# Renew only our own lease. If it expired meanwhile but nobody took a newer token, our
# token is still the newest: take the lease back (the fence, not the TTL, decides).
_CURRENT = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if v == false and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def parse(value: str) -> dict:
    token, holder, task_id, started = (value.split("|") + ["", "", ""])[:4]
    return {"token": int(token), "worker": holder, "task_id": task_id, "started": float(started or 0)}


class Lease:
    def __init__(self, r, round_id: str, unit: str, value: str, ttl: float):
        self.r, self.round_id, self.unit, self.value, self.ttl = r, round_id, unit, value, ttl
        self.token = int(value.split("|", 1)[0])
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, r, round_id: str, unit: str, holder: str, task_id: str, ttl: float) -> "Lease | None":
        value = r.eval(_ACQUIRE, 2, keys.lease(round_id, unit), keys.fence(round_id, unit), int(ttl * 1000),
                       f"{holder}|{task_id}|{time.time():.3f}")
        return cls(r, round_id, unit, value, ttl) if value else None

    def _check(self) -> bool:
        ok = bool(self.r.eval(_CURRENT, 2, keys.lease(self.round_id, self.unit), keys.fence(self.round_id, self.unit),
                              self.value, int(self.ttl * 1000), str(self.token)))
        self.lost = self.lost or not ok
        return ok

    def current(self, tries: int = 4) -> bool:
        """Renew and confirm that this is still the unit's newest lease. A Redis that doesn't
        answer is asked again a few times, then counts as no (the output is discarded)."""
        for i in range(tries):
            try:
                return self._check()
            except Exception:
                if i + 1 < tries:
                    time.sleep(min(2.0 * (i + 1), self.ttl))
        return False

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            self.r.eval(_RELEASE, 1, keys.lease(self.round_id, self.unit), self.value)
            self.r.delete(keys.waiting(self.round_id, self.unit))
        except Exception:
            pass  # it expires on its own

    def start_heartbeat(self, every: float, note=None) -> None:
        """Renew every `every` s; `note()` (what the work waits on, or None) is written beside
        the lease with the same TTL, so status can say it."""
        def beat() -> None:
            noted = False  # a note is in Redis: delete it once there is nothing to say
            while not self._stop.wait(every):
                try:
                    if not self._check():
                        return  # someone holds a newer token: stop renewing, the commit will be refused
                    said = note() if note else None
                    if said:
                        self.r.set(keys.waiting(self.round_id, self.unit), said, px=int(self.ttl * 1000))
                    elif noted:
                        self.r.delete(keys.waiting(self.round_id, self.unit))
                    noted = bool(said)
                except Exception:
                    pass  # Redis away: keep trying; the fence decides at commit time

        self._thread = threading.Thread(target=beat, name=f"lease-{self.unit}", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
