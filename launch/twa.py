"""Run Trainable Weight Averaging over the snapshots of a training run, on any number of ranks.

    deepspeed --num_gpus 2 launch/twa.py --snapshot-url file:///tmp/twa_runs --run-id resnet20-cifar10-s0 \
        --select 0:101 --epochs 10 --lr 2
    # live TWA beside a running training job: probes, the stop rule, then the final TWA
    deepspeed --num_gpus 1 --master_port 29600 launch/twa.py --follow --snapshot-url file:///tmp/twa_runs \
        --run-id resnet20-cifar10-s0 --probe-every 2 --stop-rule gain

Paper mode is the default (batch 128, lr 2, 10 epochs, CIFAR: `--preset paper_cifar`); ImageNet:
`--preset paper_imagenet` (batch 256, lr 0.3, 2 epochs). Journal mode: `--preset journal` (AdamW, cosine,
warm-up 0.2, centred layer-wise coefficients, 4-bit P, fit on the held-out split).
Writes result.json, model.safetensors and coefficients.png under --output (default <snapshot-url>/<run-id>/twa/).
See `python launch/twa.py --help` for every flag; `twa-scale twa …` does the same.
"""
import sys

from twa_scale.cli import exit_process, run_stage

if __name__ == "__main__":
    exit_process(run_stage("twa", sys.argv[1:]))
