"""Unit tier: datasets and deterministic splits."""
import torch

from tests.support import require_cifar10
from twa_scale.data.config import DataConfig
from twa_scale.data.datasets import build_data, make_loader


def _indices(ds):
    return list(ds.indices)


def test_digits_builtin_shapes_and_split():
    data = build_data(DataConfig(data="digits"))
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and data.num_classes == 10
    assert len(data.train) + len(data.val) == 1797 and data.holdout is None


def test_holdout_is_disjoint_and_deterministic():
    # build_data takes no training seed, so the split cannot move with --seed
    a = build_data(DataConfig(data="digits", holdout_fraction=0.1))
    b = build_data(DataConfig(data="digits", holdout_fraction=0.1))
    assert _indices(a.holdout) == _indices(b.holdout)
    assert not set(_indices(a.holdout)) & set(_indices(a.train))
    assert len(a.holdout) + len(a.train) == len(build_data(DataConfig(data="digits")).train)
    # --limit-train samples from what remains, never from the hold-out
    c = build_data(DataConfig(data="digits", holdout_fraction=0.1, limit_train=300))
    assert len(c.train) == 300 and set(_indices(c.train)) <= set(_indices(a.train))
    assert _indices(c.holdout) == _indices(a.holdout)


def test_train_order_depends_on_seed_and_epoch_only():
    data = build_data(DataConfig(data="digits"))
    def first_batch(seed, epoch):
        return next(iter(make_loader(data.train, batch_size=16, train=True, seed=seed, epoch=epoch)))[1]
    assert torch.equal(first_batch(0, 0), first_batch(0, 0))
    assert not torch.equal(first_batch(0, 0), first_batch(0, 1))
    assert not torch.equal(first_batch(0, 0), first_batch(1, 0))


def test_eval_loader_covers_dataset_once_per_rank_set(monkeypatch):
    data = build_data(DataConfig(data="digits"))
    seen = []
    for r in range(3):
        monkeypatch.setattr("twa_scale.comm.rank", lambda r=r: r)
        monkeypatch.setattr("twa_scale.comm.world_size", lambda: 3)
        seen += list(make_loader(data.val, batch_size=50, train=False).sampler)
    assert sorted(seen) == list(range(len(data.val)))


def test_image_folder_cifar_subset():
    root = require_cifar10()
    data = build_data(DataConfig(data=str(root), limit_train=100, limit_val=50))
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and data.num_classes == 10 and data.image_size == 32
    assert len(data.train) == 100 and len(data.val) == 50
    # augmentation only on the training view
    torch.manual_seed(0)
    e1, e2 = data.train_eval[0][0], data.train_eval[0][0]
    assert torch.equal(e1, e2)


def test_a_png_decodes_through_pil_without_sharing_its_read_only_buffer():
    """Images simplejpeg cannot read (PNG, CMYK JPEG) go through PIL, whose array is read-only: the decoder
    copies it, so torch never wraps a buffer it must not write (and warns about, once per process)."""
    import io
    import warnings

    import numpy as np
    from PIL import Image

    from twa_scale.data.decode import decode_one, recipe_for

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = decode_one(buf.getvalue(), recipe_for(32, False), np.random.default_rng(0))
    assert torch.equal(img, torch.from_numpy(pixels).permute(2, 0, 1))   # eval at full size: the pixels
