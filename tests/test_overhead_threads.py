"""The BLAS thread cap around attack fits (lightning_mia.threads): inside a block every BLAS library runs at the cap,
and the limits found before come back afterwards, also when blocks nest, fail, or open in a worker thread.
Reference: threadpoolctl's own reading of each library's thread count."""
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from lightning_mia.threads import blas_limits, blas_thread_counts


@pytest.fixture
def two_blas_threads():
    if not blas_thread_counts():
        pytest.skip("no BLAS library loaded")
    with threadpool_limits(limits=2, user_api="blas"):
        assert set(blas_thread_counts().values()) == {2}
        yield
    # threadpoolctl restores whatever the machine had


def test_block_caps_and_restores(two_blas_threads):
    with blas_limits(1):
        assert set(blas_thread_counts().values()) == {1}
    assert set(blas_thread_counts().values()) == {2}


def test_none_leaves_the_limits_alone(two_blas_threads):
    with blas_limits(None):
        assert set(blas_thread_counts().values()) == {2}


def test_nested_blocks_restore_only_at_the_outermost_exit(two_blas_threads):
    with blas_limits(1):
        with blas_limits(1):
            pass
        assert set(blas_thread_counts().values()) == {1}
    assert set(blas_thread_counts().values()) == {2}


def test_an_exception_inside_still_restores(two_blas_threads):
    with pytest.raises(RuntimeError):
        with blas_limits(1):
            raise RuntimeError("fit failed")
    assert set(blas_thread_counts().values()) == {2}


def test_a_block_in_a_worker_thread_changes_nothing(two_blas_threads):
    # OpenBLAS ignores set_num_threads from other threads once the main thread set a count: a worker's block must
    # neither pretend to cap nor leave a changed limit behind
    seen = {}

    def worker():
        with blas_limits(1):
            seen["inside"] = set(blas_thread_counts().values())

    with blas_limits(1):
        t = threading.Thread(target=worker)
        t.start()
        t.join(10)
        assert set(blas_thread_counts().values()) == {1}  # the main thread's cap holds while the worker runs
    assert seen["inside"] == {1}
    assert set(blas_thread_counts().values()) == {2}
    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert seen["inside"] == {2} and set(blas_thread_counts().values()) == {2}


def test_bad_limit_is_refused():
    with pytest.raises(ValueError, match="positive"):
        with blas_limits(0):
            pass


@pytest.fixture
def fit_thread_counts(monkeypatch):
    """The BLAS thread counts seen inside every learned-attack fit, in order."""
    from lightning_mia.attacks import learned

    seen = []
    real = learned._ProbaAttack._fit_model

    def spy(self, model, X, y, w):
        seen.append(set(blas_thread_counts().values()))
        return real(self, model, X, y, w)

    monkeypatch.setattr(learned._ProbaAttack, "_fit_model", spy)
    return seen


def test_learned_attacks_fit_under_the_cap_and_leave_the_limits(two_blas_threads, fit_thread_counts):
    from lightning_mia.attacks import build_attack

    seen = fit_thread_counts
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 3)), rng.random(200) < 0.5
    attack = build_attack({"name": "logistic_regression"})
    attack.fit(X, y)
    scores = attack.score(X)
    assert seen == [{1}] and scores.shape == (200,)
    assert set(blas_thread_counts().values()) == {2}


def test_parallel_fits_run_at_one_blas_thread_and_give_the_same_numbers(two_blas_threads, fit_thread_counts):
    # n_jobs > 1 fits in threads, where a block cannot set the cap: the auditor sets it around the pool
    from lightning_mia.auditor import audit_arrays

    seen = fit_thread_counts
    rng = np.random.default_rng(1)
    feats = {"a": rng.normal(size=(300, 4)), "b": rng.normal(size=(300, 2))}
    member = rng.random(300) < 0.5
    attacks = [{"name": "logistic_regression", "blas_threads": None}]
    correct, labels = rng.random(300) < 0.7, rng.integers(0, 3, 300)
    one = audit_arrays(feats, member, correct, labels, attacks=attacks, n_jobs=1)
    assert all(s == {2} for s in seen)  # blas_threads=None and one job: the library's own limit
    seen.clear()
    two = audit_arrays(feats, member, correct, labels, attacks=attacks, n_jobs=2)
    assert seen and all(s == {1} for s in seen)
    assert set(blas_thread_counts().values()) == {2}
    assert len(one.rows) == len(two.rows) > 0
    for r1, r2 in zip(one.rows, two.rows):
        assert {k: v for k, v in r1.items() if v == v} == {k: v for k, v in r2.items() if v == v}  # NaN != NaN
