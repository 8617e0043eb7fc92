"""The test suite, a package: shared helpers are imported as ``tests.support``
and ``tests.train.short_runs``, never by bare module name. (tests/kernels/ is
not part of it yet: its modules import ``bits`` by bare name.)"""
