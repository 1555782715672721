"""What any training loop needs and that knows nothing of the method.

`sharding` (the device mesh and the layout of arrays on it), `distributed`
(multi-host start-up), `checkpointing` (orbax checkpoints of a state and its data
iterator), `preemption` (save and stop on a notice), `metric_log` (TensorBoard,
the log and `metrics.jsonl`), `profiling` (XLA traces of chosen steps).
"""
