"""`python -m picochat.cli ...` (what torchrun runs: `torchrun --nproc_per_node=2 -m picochat.cli train ...`)."""
import sys

from . import main

sys.exit(main())
