import json

import numpy as np
import pytest

from ltbench import data
from ltbench.data import class_groups, longtail_counts, longtail_indices


def test_cifar_lt_counts_match_the_ldam_construction():
    # the totals every CIFAR-LT paper reports for ratio 100
    assert sum(longtail_counts(10, 5000, 100)) == 12406
    assert sum(longtail_counts(100, 500, 100)) == 10847
    assert longtail_counts(10, 5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(longtail_counts(10, 5000, 10)) == 20431
    assert sum(longtail_counts(100, 500, 50)) == 12608


def test_step_profile_and_ratio_one():
    assert longtail_counts(10, 5000, 10, "step") == [5000] * 5 + [500] * 5
    assert longtail_counts(5, 100, 4, "step") == [100, 100, 25, 25, 25]
    assert longtail_counts(4, 100, 1) == [100] * 4


@pytest.mark.parametrize(
    "ratio,profile,msg", [(0.5, "exp", "ratio must be >= 1"), (10, "zigzag", "unknown long-tail profile")]
)
def test_bad_counts_arguments_are_named(ratio, profile, msg):
    with pytest.raises(ValueError, match=msg):
        longtail_counts(10, 100, ratio, profile)


def _ldam_reference(targets, counts, seed):
    """The original LDAM-DRW gen_imbalanced_data, global NumPy RNG and all."""
    np.random.seed(seed)
    out = []
    targets = np.array(targets)
    for c, n in enumerate(counts):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        out.extend(idx[:n])
    return np.array(out)


def test_subset_selection_equals_the_reference_and_is_seeded():
    rng = np.random.RandomState(123)
    targets = rng.randint(0, 5, size=400)
    counts = [60, 40, 20, 10, 5]
    for seed in (0, 1, 7):
        np.testing.assert_array_equal(longtail_indices(targets, counts, seed), _ldam_reference(targets, counts, seed))
    a, b = longtail_indices(targets, counts, 0), longtail_indices(targets, counts, 1)
    assert not np.array_equal(a, b)
    assert np.bincount(targets[a], minlength=5).tolist() == counts
    # class order: all of class 0 first, then class 1, ...
    assert (np.diff(targets[a]) >= 0).all()


def test_subset_selection_leaves_global_rng_alone():
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    longtail_indices(np.repeat(np.arange(3), 10), [5, 3, 2], seed=0)
    assert np.random.rand() == expected


def test_too_many_images_requested():
    with pytest.raises(ValueError, match="class 1 has 2 images, 3 requested"):
        longtail_indices([0, 0, 0, 1, 1], [2, 3])


def test_class_groups_thresholds():
    assert class_groups([500, 101, 100, 20, 19, 1]) == ["many", "many", "medium", "medium", "few", "few"]
    assert class_groups([60, 50, 19], many=50, few=20) == ["many", "medium", "few"]


def test_counts_command(cli):
    out = json.loads(cli("counts", "--dataset", "cifar10", "--ratio", "100").stdout)
    assert out["counts"][0] == 5000 and out["counts"][-1] == 50 and out["total"] == 12406
    out = json.loads(cli("counts", "--dataset", "cifar100", "--ratio", "10").stdout)
    assert len(out["counts"]) == 100 and out["total"] == sum(out["counts"]) == 19573
    bad = cli("counts", "--dataset", "cifar11", "--ratio", "100", check=False)
    assert bad.returncode == 2 and "unknown dataset 'cifar11'" in bad.stderr
    bad = cli("counts", "--dataset", "cifar10", "--ratio", "0.5", check=False)
    assert bad.returncode == 2 and "ratio must be >= 1" in bad.stderr


def test_digits_lt_prepared_file(tmp_path):
    info = data.prepare("digits-lt", 10, tmp_path, tmp_path / "d.npz")
    z = np.load(tmp_path / "d.npz")
    assert info["counts"] == longtail_counts(10, 120, 10)
    assert np.bincount(z["train_y"], minlength=10).tolist() == info["counts"]
    # fixed balanced test split: 50 per class, disjoint from the training pool
    assert np.bincount(z["test_y"]).tolist() == [50] * 10
    assert z["train_x"].dtype == np.uint8 and z["train_x"].shape[1:] == (1, 8, 8)
    from ltbench.data import digits

    pool_x, pool_y, test_x, test_y = digits.load(tmp_path, {})
    assert len(pool_y) + len(test_y) == 1797  # the held-out test split and the pool partition the data
    np.testing.assert_array_equal(test_x, z["test_x"])
    np.testing.assert_array_equal(pool_x[z["subset_indices"]], z["train_x"])
