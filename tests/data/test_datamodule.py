"""SRDataModule on the bundled sample set (no data root needed)."""

import pytest

from odm_sr.data.datamodule import SRDataModule


def test_loaders_shapes_lengths_and_set_names():
    dm = SRDataModule(
        train="sample",
        val=["sample_test"],
        test=["sample_test", "sample"],
        scale=2,
        lr_patch=10,
        batch_size=3,
        iters_per_epoch=4,
        num_workers=0,
        seed=7,
    )
    dm.setup("fit")
    train = dm.train_dataloader()
    assert len(train) == 4 and len(train.dataset) == 12
    batches = list(train)
    assert len(batches) == 4
    assert batches[0]["lr"].shape == (3, 3, 10, 10) and batches[0]["hr"].shape == (3, 3, 20, 20)
    val = dm.val_dataloader()
    assert len(val) == 1 and dm.set_names == dm.val_set_names == ["sample_test"]
    item = next(iter(val[0]))
    assert item["lr"].shape[0] == 1 and item["hr"].shape[-1] == 2 * item["lr"].shape[-1]
    assert item["name"] == ["chelsea"] and item["hr_channels"].tolist() == [3]
    dm.setup("test")
    test = dm.test_dataloader()
    assert [len(dl) for dl in test] == [2, 2] and dm.set_names == dm.test_set_names == [
        "sample_test",
        "sample",
    ]


def test_evaluation_only():
    dm = SRDataModule(train=None, val=[], test=["sample_test"], scale=3)
    dm.setup("test")
    assert dm.set_names == ["sample_test"] and len(dm.test_dataloader()) == 1
    dm.setup("fit")
    with pytest.raises(ValueError, match="train=None"):
        dm.train_dataloader()


def test_same_seed_same_image_order():
    def order(seed):
        dm = SRDataModule(
            train="sample", val=[], test=[], scale=4, lr_patch=8, batch_size=2, iters_per_epoch=5, seed=seed
        )
        dm.setup("fit")
        return list(dm.train_dataloader().sampler)

    assert order(1) == order(1) != order(2)
