"""``kvcomp-bench``: how much memory a policy saves, how fast the ops run,
and what compression costs in quality.

Entry point :func:`kvcomp.bench.cli.main`; one module per subcommand
(``ops_bench``, ``memory_bench``, ``accuracy`` with ``evaluate`` and
``models``), shared timing in ``timing``, plots in ``plots`` and
``accuracy_plot``.
"""
