"""``torchrun -m ats.train``: the path ``ats train``'s distributed runs had before ``ats.commands.train``;
``torchrun -m ats train`` runs the same."""
import sys

from .commands.train import main

if __name__ == "__main__":
    sys.exit(main())
