"""Process plumbing around the training path: the command-line runner, JAX's multi-controller
start-up, preemption, the host allocator, profiling, metric writers, experiment trackers and the
workdir's files. Nothing here knows about models or optimizers."""
