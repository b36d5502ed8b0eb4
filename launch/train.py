"""Train with DeepSpeed, stream weight snapshots, optionally run TWA after.

    deepspeed launch/train.py                      # built-in quickstart: digits, ResNet-20, TWA, on CPU
    deepspeed --num_gpus 2 launch/train.py --data ../shared/datasets/cifar10 --model resnet20 \
        --epochs 1 --snapshot-url file:///tmp/x --run-id r --seed 0

See `deepspeed launch/train.py --help` for every flag.
"""
import logging
import sys

from twa_scale import comm
from twa_scale.config import parse_train_args


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_train_args()
    except ValueError as e:  # bad flags: one line, before any process group exists
        print(f"error: {e}", file=sys.stderr)
        return 2
    from twa_scale.pipeline import run_pipeline

    try:
        run_pipeline(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        comm.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
