"""Deprecated alias, removed in the next release: ``python -m ats.train`` (and ``torchrun -m ats.train``) runs the
``ats train`` command; use ``python -m ats train`` (``torchrun -m ats train``)."""
import sys
import warnings

from .commands.cli import main

if __name__ == "__main__":
    warnings.warn("python -m ats.train is deprecated and goes in the next release; run python -m ats train "
                  "(torchrun -m ats train) instead", DeprecationWarning, stacklevel=1)
    sys.exit(main(["train", *sys.argv[1:]]))
