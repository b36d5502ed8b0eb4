"""`python -m twa_scale …` is the `twa-scale` console script, e.g. `deepspeed --module twa_scale train …`."""
import sys

from twa_scale.cli import main

sys.exit(main())
