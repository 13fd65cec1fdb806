"""The ``ats`` command line: one module per command (``eval``, ``bench``, ``visualize``, ``train``, ``compare``,
``calibrate``, ``retention``), the options they share, and their plots, timing and resumable training."""
