import numpy as np
import pytest

from lightning_mia.audit import AuditPool, make_audit_pool, validate_audit_pool


def test_default_pool_keeps_ratio_and_caps_by_data():
    pool = make_audit_pool(n_train=1000, n_heldout=100, ratio=5.0, seed=1)
    assert (pool.n_members, pool.n_nonmembers) == (500, 100)
    pool = make_audit_pool(n_train=120, n_heldout=100, ratio=5.0, seed=1)  # members are the scarce side
    assert (pool.n_members, pool.n_nonmembers) == (120, 24)
    pool = make_audit_pool(n_train=50, n_heldout=80, ratio=1.0, seed=1)
    assert (pool.n_members, pool.n_nonmembers) == (50, 50)


def test_pool_is_seeded_sorted_unique_and_in_range():
    a = make_audit_pool(500, 300, n_members=200, n_nonmembers=40, seed=3)
    b = make_audit_pool(500, 300, n_members=200, n_nonmembers=40, seed=3)
    c = make_audit_pool(500, 300, n_members=200, n_nonmembers=40, seed=4)
    assert np.array_equal(a.member_positions, b.member_positions)
    assert not np.array_equal(a.member_positions, c.member_positions)
    for pos, n in ((a.member_positions, 500), (a.nonmember_positions, 300)):
        assert np.all(np.diff(pos) > 0) and pos.min() >= 0 and pos.max() < n


def test_one_size_given_other_follows_ratio():
    pool = make_audit_pool(1000, 1000, n_nonmembers=30, ratio=5.0)
    assert pool.n_members == 150
    pool = make_audit_pool(1000, 1000, n_members=150, ratio=5.0)
    assert pool.n_nonmembers == 30


@pytest.mark.parametrize("kwargs, msg", [
    (dict(n_members=2000), "n_members=2000 is outside 1..1000"),
    (dict(n_nonmembers=0), "n_nonmembers=0 is outside"),
    (dict(ratio=0), "ratio"),
])
def test_bad_sizes_are_clear_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        make_audit_pool(1000, 100, **kwargs)


def test_validate_refuses_out_of_range_and_duplicates():
    pool = AuditPool(np.array([0, 5, 12]), np.array([1, 2]), seed=0)
    with pytest.raises(ValueError, match="outside the dataset of 10 samples"):
        validate_audit_pool(pool, 10, 10)
    pool = AuditPool(np.array([0, 1]), np.array([3, 3]), seed=0)
    with pytest.raises(ValueError, match="duplicates"):
        validate_audit_pool(pool, 10, 10)


def test_json_round_trip(tmp_path):
    pool = make_audit_pool(100, 50, ratio=2.0, seed=7)
    pool.member_indices = pool.member_positions + 1000
    path = tmp_path / "mia" / "audit.json"
    pool.save(str(path))
    back = AuditPool.load(str(path))
    assert back.seed == 7
    assert np.array_equal(back.member_positions, pool.member_positions)
    assert np.array_equal(back.member_indices, pool.member_positions + 1000)
    assert np.array_equal(back.nonmember_positions, pool.nonmember_positions)
