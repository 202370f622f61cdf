"""The queue side of cai: a Celery app over Redis, thin tasks, and the round service.

`keys` names every queue and Redis key; `settings` reads the worker settings from the
environment; `lease` is the fenced, heart-beaten lease on a unit of work; `service`
submits, works units exactly once, advances, reconciles, cancels and resumes rounds;
`progress` reads a round's status and the list of rounds; `app` and `tasks` are the
Celery layer; `local` starts a redis-server and workers on this machine (demo, tests);
`faults` injects the faults tests can't cause otherwise. `cai` knows nothing of this.
"""
