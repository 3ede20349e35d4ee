"""The engine: how a run's work is cut, placed on Ray, retried and committed.

Reading order, outside in:

- ``runner.Runner``: one run: prepare (lock, plan, what is committed), the phases, close (tables,
  export, report, history).
- ``scheduler.Scheduler``: a Ray-free state machine for a phase of per-shard stages: which shard goes
  to which actor, retries, bisection of a shard that kills its worker, with one ``ShardState`` per
  (chain, shard). Tested with made-up events.
- ``executor.RayExecutor``: the one executor: carries the scheduler's decisions out on Ray actors
  (start, stop, send a request) and turns what Ray reports into the scheduler's events.
- ``fused.FusedChain``: what one of those actors holds: the stages of a fused chain, each set up once,
  run on a shard one after the other with the batch passed in memory.
- ``execution.PreparedStage``: one stage of that chain on one shard: read the input, process, write,
  commit.
- ``global_exec``: global stages as Ray tasks over shards and shuffle partitions (``RayCorpus``).
- ``tasks``: the one submit / collect / retry loop for the tasks a driver waits on (global stages,
  export, the run's tables); ``faults``: the one classification of failures it and the scheduler use.
- ``manifests.reader``: the one reader of a shard's committed rows, used by every step above.
"""
