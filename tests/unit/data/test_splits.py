import pytest

from shallow_ensemble.data import split_indices, train_valid_test


def test_deterministic_disjoint_complete() -> None:
    splits = split_indices(100, [0.8, 0.1, 0.1], seed=42)
    assert splits == split_indices(100, [0.8, 0.1, 0.1], seed=42)
    assert splits != split_indices(100, [0.8, 0.1, 0.1], seed=43)
    assert [len(split) for split in splits] == [80, 10, 10]
    flat = [index for split in splits for index in split]
    assert len(set(flat)) == len(flat)
    assert sorted(flat) == list(range(100))
    assert all(split == sorted(split) for split in splits)


def test_partial_and_rounding() -> None:
    splits = split_indices(7, [0.5, 0.25], seed=0)
    assert [len(split) for split in splits] == [4, 1]
    assert set(splits[0]).isdisjoint(splits[1])
    assert all(0 <= i < 7 for split in splits for i in split)
    assert [len(s) for s in split_indices(10, [1 / 3, 1 / 3, 1 / 3], seed=1)] == [
        3,
        4,
        3,
    ]


@pytest.mark.parametrize(
    ("n", "fractions", "message"),
    [
        (0, [0.5], r"`n` is 0 but must be positive"),
        (10, [], r"`fractions` is empty"),
        (
            10,
            [0.5, 0.0],
            r"`fractions\[1\]` is 0.0 but must be in the interval \(0, 1\]",
        ),
        (10, [1.5], r"`fractions\[0\]` is 1.5 but must be in the interval \(0, 1\]"),
        (10, [float("nan")], r"`fractions\[0\]` is nan"),
        (
            10,
            [0.7, 0.4],
            r"`fractions` \[0.7, 0.4\] sum to 1.1 but must sum to at most 1",
        ),
        (
            10,
            [0.9, 0.04],
            r"`fractions\[1\]` is 0.04, which gives an empty split of 10 "
            r"items; use a fraction of at least 0.1",
        ),
    ],
)
def test_invalid(n: int, fractions: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_indices(n, fractions, seed=0)


def test_train_valid_test() -> None:
    items = [f"structure{i}" for i in range(50)]
    train, valid, test = train_valid_test(items, 0.2, 0.1, seed=3)
    assert (len(train), len(valid), len(test)) == (35, 10, 5)
    assert sorted(train + valid + test) == sorted(items)
    assert (train, valid, test) == train_valid_test(items, 0.2, 0.1, seed=3)
    # relative order is kept
    assert train == sorted(train, key=items.index)

    train, valid, test = train_valid_test(items, 0.2, 0.0, seed=3)
    assert (len(train), len(valid), len(test)) == (40, 10, 0)


@pytest.mark.parametrize(
    ("valid", "test", "message"),
    [
        (-0.1, 0.1, r"`valid_fraction` is -0.1 but must be in the interval \[0, 1\)"),
        (0.1, 1.0, r"`test_fraction` is 1.0 but must be in the interval \[0, 1\)"),
        (0.6, 0.4, r"`valid_fraction` \+ `test_fraction` is 1 but must be below 1"),
    ],
)
def test_train_valid_test_invalid(valid: float, test: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_valid_test(list(range(10)), valid, test, seed=0)
