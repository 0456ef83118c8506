"""Ray job entrypoints: ``ray job submit ... -- python -m jobs.<embed|dedup|mine|reembed> --spec SPEC.yaml``.

Each module is a thin driver over the CLI's job registry (``pipeline.cli.JOBS``): the same spec schema
as ``embedpipe <job> --spec``, validated before Ray is touched, the summary printed as JSON, exit code
0 on success and 2 on any error. Commented example specs live in ``jobs/specs/``.
"""
