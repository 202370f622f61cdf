"""Fault injection for the queue's fault tests: faults that cannot be caused otherwise.

Read from the worker's environment, checked by `service.work` after the lease is taken
and the attempt counted, before the unit runs. Unset in normal use.

  CAI_FAULT_KILL_UNIT=respond/0000      the process running that unit kills itself (SIGKILL)
  CAI_FAULT_SLOW_UNIT=respond/0001=20   that unit waits 20 s first (holding its lease)

Knows unit keys only.
"""

from __future__ import annotations

import os
import signal
import time


def before_run(unit_key: str) -> None:
    if os.environ.get("CAI_FAULT_KILL_UNIT") == unit_key:
        os.kill(os.getpid(), signal.SIGKILL)
    slow = os.environ.get("CAI_FAULT_SLOW_UNIT", "")
    if "=" in slow and slow.rsplit("=", 1)[0] == unit_key:
        time.sleep(float(slow.rsplit("=", 1)[1]))
