"""The lab: the task suite, the expert zoo, the evaluation harness, the benchmark, the demos and the default
models they run on. Nothing in the runtime imports it."""
