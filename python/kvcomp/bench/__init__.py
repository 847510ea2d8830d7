"""``kvcomp-bench``: microbenchmarks of the kvcomp ops and memory capacity.

Entry point :func:`kvcomp.bench.cli.main`; one module per subcommand
(``ops_bench``, ``memory_bench``), shared timing in ``timing``.
"""
