"""Mapping a model to hardware: `conveyor bench`, `conveyor profile` and `conveyor compare`.

- `loadgen`: the native load generator (open and closed loop, Poisson schedules) and its targets;
- `scenarios`: MLPerf's single-stream, multi-stream, server and offline scenarios and the
  find-peak search over it, with warm-up, seeds, repetitions and their statistics;
- `statistics`: percentiles, early-stopping estimates, confidence intervals;
- `inputs`: request samples from a model's signature or a user's file, and the accuracy check;
- `fingerprint`: the machine and software a result was measured on;
- `bundle`: the result bundle format every later version can still read;
- `bench_cli`, `compare_cli`: the command-line verbs.

This package sits above the runtime and never imports the server, deploy or CLI layers.
Submodules are imported on use: `conveyor --help` does not pay for numpy statistics.
"""
