"""Epoch samplers: determinism, length, valid indices and the drawing distributions."""

import numpy as np
import pytest
import torch

from ltbench.nn import sampling

COUNTS = np.array([4000, 2000, 1000, 500, 200, 50])
EPOCHS = 20  # 155k draws for the frequency tests


@pytest.fixture(scope="module")
def labels():
    y = torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(COUNTS))
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]


def draw(name, labels, seed, epochs=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([sampling.SAMPLERS.get(name)(labels, gen) for _ in range(epochs)])


def chi2(observed, expected):
    return float(((observed - expected) ** 2 / expected).sum())


def test_registry_names():
    assert set(sampling.SAMPLERS) == {"uniform", "class_balanced", "sqrt", "class_aware"}


@pytest.mark.parametrize("name", ["uniform", "class_balanced", "sqrt"])
def test_deterministic_valid_indices(labels, name):
    a, b, c = draw(name, labels, 0), draw(name, labels, 0), draw(name, labels, 1)
    assert a.dtype == torch.long and a.shape == labels.shape and a.device == labels.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < len(labels)
    gen = torch.Generator().manual_seed(0)
    f = sampling.SAMPLERS.get(name)
    assert not torch.equal(f(labels, gen), f(labels, gen))  # the generator advances


def test_uniform_is_a_permutation(labels):
    assert torch.equal(torch.sort(draw("uniform", labels, 3)).values, torch.arange(len(labels)))


def test_class_sizes(labels):
    assert torch.equal(sampling.class_sizes(labels), torch.tensor(COUNTS)[labels])


@pytest.mark.parametrize("name,q", [("class_balanced", 0.0), ("sqrt", 0.5)])
def test_class_then_instance_frequencies(labels, name, q):
    idx = draw(name, labels, 7, EPOCHS).numpy()
    y = labels.numpy()
    total = len(idx)
    p_class = COUNTS**q / (COUNTS**q).sum()
    per_class = np.bincount(y[idx], minlength=len(COUNTS))
    assert chi2(per_class, total * p_class) < 40  # df = 5; p ≈ 1e-7
    # each instance: P(class) / n_class, so draws within a class are uniform
    per_index = np.bincount(idx, minlength=len(y))
    expected = total * p_class[y] / COUNTS[y]
    df = len(y) - 1
    assert chi2(per_index, expected) < df + 6 * np.sqrt(2 * df)


def test_class_balanced_small_classes_and_gaps():
    # classes 0 and 3 only (1 and 2 have no images): each drawn half the time, never class 1 or 2
    y = torch.tensor([0] * 99 + [3])
    idx = torch.cat([sampling.SAMPLERS.get("class_balanced")(y, torch.Generator().manual_seed(s)) for s in range(100)])
    share = (y[idx] == 3).double().mean().item()
    assert abs(share - 0.5) < 0.02
    assert set(y[idx].tolist()) == {0, 3}


def _class_aware(y, seed=0):
    return sampling.SAMPLERS.get("class_aware")(y, torch.Generator().manual_seed(seed))


def test_class_aware_is_kangs_class_cycle_with_four_per_visit():
    """Kang et al.'s ClassAwareSampler: epoch = max count × classes; runs of 4 of one class; the classes
    of every K consecutive visits are a permutation; within a class, every n_c consecutive draws of it
    are a permutation of its images (no repeat before the class is used up); class 3 (empty) never."""
    counts = [10, 3, 1, 0, 6]
    y = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))]
    idx = _class_aware(y)
    assert len(idx) == sampling.epoch_length("class_aware", y) == 10 * 4
    lab = y[idx].tolist()
    visits = [lab[i : i + 4] for i in range(0, len(lab), 4)]
    assert all(len(set(v)) == 1 for v in visits)
    present = [0, 1, 2, 4]
    visit_cls = [v[0] for v in visits]
    for i in range(0, len(visit_cls) - len(present) + 1, len(present)):
        assert sorted(visit_cls[i : i + len(present)]) == present
    for c in present:
        seq = idx[y[idx] == c].tolist()
        members = sorted(torch.nonzero(y == c).squeeze(1).tolist())
        for i in range(0, len(seq) - counts[c] + 1, counts[c]):
            assert sorted(seq[i : i + counts[c]]) == members
    assert torch.equal(idx, _class_aware(y)) and not torch.equal(idx, _class_aware(y, 1))
    assert sampling.epoch_length("uniform", y) == len(y)


def test_class_aware_balances_classes(labels):
    idx = torch.cat([_class_aware(labels, s) for s in range(3)])
    freq = np.bincount(labels[idx].numpy(), minlength=len(COUNTS))
    assert len(idx) == 3 * COUNTS.max() * len(COUNTS)
    assert freq.max() - freq.min() <= 3 * 4  # at most one visit per epoch apart
