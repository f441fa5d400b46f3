"""The batch segmentation pipeline: inputs -> shards -> Ray Data stages -> Parquet shards.

Modules, one idea each:

- ``job``: the driver, ``run(JobConfig) -> summary``: inputs, probe, resume, Ray Data windows, commits;
- ``job_config``: the job's options (``JobConfig``, ``LabelSpec``) and the Segmenter they ask for;
- ``run_record``: run.json and the resume rule (what a re-run must match);
- ``storage``: fsspec filesystems with long-job retry defaults, atomic writes, credential redaction;
- ``sources``: listing folders / prefixes / manifests, image ids, deterministic shards;
- ``workers``: the Ray Data stage callables (CPU decode with ``rfclip.decode``, model actor, CPU encode);
- ``sinks``:   Parquet shard schema and atomic commits, run.json, summary.json, masks;
- ``outputs``: reading a job's output back (class names, the predictions table, label maps);
- ``datasets`` / ``metrics`` / ``report``: labelled data and evaluation (see those modules).

Importing the package loads neither Ray nor torch. Its modules use ``rfclip``, and so torch: the CPU
tasks decode and resize exactly as ``rfclip.Segmenter`` does.
"""
