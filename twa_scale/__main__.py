"""`python -m twa_scale …` is the `twa-scale` console script, e.g. `deepspeed --module twa_scale train …`."""
from twa_scale.cli import console

console()
