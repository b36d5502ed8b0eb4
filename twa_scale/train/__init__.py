"""The training job: DeepSpeed training that streams weight snapshots to the store.

    config.py       TrainConfig (typed, validated, flat flags) and its sections; parse_train_args
    loop.py         run_training(cfg): the job, from process group to metrics.json; its Trainer runs the epochs
                    (eval, snapshots, checkpoints, stop and SIGTERM)
    engine.py       everything DeepSpeed: config loading, batch arithmetic, the engine, the safe checkpoint loader
    schedule.py     the one learning-rate schedule (also read by the TWA stage)
    checkpoints.py  DeepSpeed checkpoints: save, upload with a commit record, resume from the newest intact tag
    preemption.py   SIGTERM: one exit deadline, one step at which every rank stops and checkpoints
    streamer.py     the async snapshot streamer: host buffers, background upload, retries, back-pressure
    steplog.py      per-step values kept on the device, read every N steps (also the TWA stage's)

Nothing is imported here, so ``import twa_scale.train.config`` (``--help``) stays cheap.
"""
