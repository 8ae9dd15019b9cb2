"""``python -m imgx3d`` (also what ``torchrun -m imgx3d`` runs)."""

import sys

from imgx3d.cli import main

sys.exit(main())
