"""The engine: how a run's work is cut, placed on Ray, retried and committed.

Reading order, outside in:

- ``runner.Runner``: one run: prepare (lock, plan, what is committed), the phases, close (tables,
  export, report, history).
- ``scheduler.Scheduler``: a Ray-free state machine for a phase of per-shard stages: which shard goes
  to which actor, retries, bisection of a shard that kills its worker. Tested with made-up events.
- Three things called "executor", one per layer:
  ``executor.Executor`` (the protocol the scheduler's decisions are carried out through) and
  ``executor.RayExecutor`` (it, on Ray actors); ``fused.ChainExecutor`` (inside one actor: the stages
  of a fused chain, each set up once); ``execution.ShardExecutor`` (one stage on one shard: read the
  input, process, write, commit).
- ``global_exec``: global stages as Ray tasks over shards and shuffle partitions (``RayCorpus``).
- ``tasks``: the one submit / collect / retry loop for the tasks a driver waits on (global stages,
  export, the run's tables); ``faults``: the one classification of failures it and the scheduler use.
- ``manifests.reader``: the one reader of a shard's committed rows, used by every step above.
"""
