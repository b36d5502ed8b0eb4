"""Train with DeepSpeed, stream weight snapshots, optionally run TWA after.

    deepspeed launch/train.py                      # built-in quickstart: digits, ResNet-20, TWA, on CPU
    deepspeed --num_gpus 2 launch/train.py --data ../shared/datasets/cifar10 --model resnet20 \
        --epochs 1 --snapshot-url file:///tmp/x --run-id r --seed 0

See `deepspeed launch/train.py --help` for every flag.
"""
import sys

from twa_scale.cli import launch_main
from twa_scale.config import parse_train_args
from twa_scale.pipeline import run_pipeline

if __name__ == "__main__":
    sys.exit(launch_main(parse_train_args, run_pipeline))
