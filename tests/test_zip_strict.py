"""zip(..., strict=True) where two sequences must match: a mismatch is an error, not a silent truncation."""

import pytest
import torch

from ltbench import data
from ltbench.spec import config
from ltbench.training import trainer as train


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data.prepare("digits-lt", 10, d, d / "digits.npz")
    return d / "digits.npz"


def test_a_batch_with_more_views_than_the_recipe_is_an_error(prepared, tmp_path):
    c = config.validate(
        {
            "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "device": "cpu"},
            "experiments": {
                "e": {"datasets": ["digits-lt"], "ratios": [10], "methods": ["ce"], "backbones": ["resnet8"]}
            },
        }
    )
    t = train.Trainer(config.cell_spec(c, "digits-lt", "ce", "resnet8"), 10, 0, prepared, tmp_path)
    assert t.views == ["weak"]
    (xs, yb) = next(t.source.epoch(torch.arange(8), 8, t.views, t.gen))
    t.train_step(xs, yb, in_head=False)  # the matching batch trains
    with pytest.raises(ValueError, match="zip"):  # without strict=True the second view was silently dropped
        t.train_step([*xs, xs[0]], yb, in_head=False)
