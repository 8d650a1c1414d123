"""The demo traffic of a checkout: ``python -m tests.demo`` (``make run``) and the synthetic stream
generator :mod:`tests.demo.synthetic`. Not part of the installed ``chunkfold``: nothing in the
wheel looks for a checkout."""
