"""What a frame means in a worker process: one executor per front door (ARCHITECTURE.md).

``fastq.worker.Runtime`` owns the rings, the handler slots and the completion flushes; it hands
each delivery's body to its executor, named by ``WorkerSpec.executor``:

- ``app.AppExecutor``: the engine's deliveries, one message each: envelope -> task ->
  middleware -> handler -> retry policy;
- ``pool.PoolExecutor``: ``fastq.Pool``'s, one batch of calls each, answered with a reply.
"""
