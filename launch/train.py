"""Train with DeepSpeed, stream weight snapshots, optionally run TWA after.

    deepspeed launch/train.py                      # built-in quickstart: digits, ResNet-20, TWA, on CPU
    deepspeed --num_gpus 2 launch/train.py --data ../shared/datasets/cifar10 --model resnet20 \
        --epochs 1 --snapshot-url file:///tmp/x --run-id r --seed 0
    deepspeed launch/train.py --preset resnet50_imagenet --config my.yaml --lr 0.2 --print-config

See `deepspeed launch/train.py --help` for every flag. The installed console script does the same:
`twa-scale train …` (or `deepspeed --module twa_scale train …`).
"""
import sys

from twa_scale.cli import exit_process, run_stage

if __name__ == "__main__":
    exit_process(run_stage("train", sys.argv[1:]))
