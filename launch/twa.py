"""Run Trainable Weight Averaging over the snapshots of a training run, on any number of ranks.

    deepspeed --num_gpus 3 launch/twa.py --snapshot-url file:///tmp/twa_runs --run-id resnet20-cifar10-s0 \
        --select 1:101 --epochs 10 --lr 2

Paper mode is the default (lr 2, 10 epochs, CIFAR); ImageNet: `--preset paper_imagenet` (lr 0.3, 2 epochs).
Journal mode: `--preset journal`, or `--directions centered --coefficients layerwise --optimizer adamw
--schedule cosine --warmup 0.1 --weight-decay 0 --p-bits 4 --fit-on holdout`.
Writes result.json, model.safetensors and coefficients.png under --output (default <snapshot-url>/<run-id>/twa/).
See `python launch/twa.py --help` for every flag.
"""
import sys

from twa_scale.cli import launch_main
from twa_scale.twa import parse_twa_args, run_twa

if __name__ == "__main__":
    # corrupt shards are IOErrors and missing keys KeyErrors: bad input, one line each
    sys.exit(launch_main(parse_twa_args, run_twa, errors=(ValueError, OSError, KeyError)))
