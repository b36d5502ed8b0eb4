"""Datasets: what the training job and the TWA stage read.

    config.py    DataConfig: the dataset, its splits and its decoding (the `data` flags); cheap to import
    datasets.py  build_data -> DataBundle (digits, ImageFolder trees, packed datasets), make_loader
    shards.py    the packed format: `twa-scale data pack` / `data verify`, the shard readers
    decode.py    image decoding and augmentation recipes (CPU, GPU, PIL)

Nothing is imported here, so ``import twa_scale.data.config`` (the training job's ``--help``) stays cheap.
"""
