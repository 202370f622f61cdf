"""The queue side of cai: a Celery app over Redis, thin tasks, and the round service.

`keys` names every queue and Redis key; `settings` reads the worker settings from the
environment; `lease` is the fenced, heart-beaten lease on a unit of work; `service`
submits, advances, reconciles, cancels and reports rounds; `app` and `tasks` are the
Celery layer. The library (`cai`) knows nothing about any of this.
"""
