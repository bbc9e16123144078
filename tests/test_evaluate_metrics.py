"""Validation metrics: verl's bootstrap best@k / worst@k / maj@k, their names, and pass@k.

The reference for the bootstrap numbers is a direct re-implementation of verl's loop
(`verl/trainer/ppo/metric_utils.py`): reseed with 42, then 1000 separate
`np.random.choice(n, size=k, replace=True)` calls, one reduce per draw, dict-based majority vote.
"""

import math
from collections import defaultdict

import numpy as np
import pytest

from mathgrpo.eval.metrics import (
    bootstrap_metric,
    calc_maj_val,
    compute_validation_metrics,
    name_validation_metrics,
    pass_at_k,
    process_validation_metrics,
)


def verl_bootstrap(data, subset_size, reduce_fns, n_bootstrap=1000, seed=42):
    """verl's bootstrap_metric, written as verl writes it."""
    np.random.seed(seed)
    results = [[] for _ in reduce_fns]
    for _ in range(n_bootstrap):
        indices = np.random.choice(len(data), size=subset_size, replace=True)
        sample = [data[index] for index in indices]
        for position, reduce_fn in enumerate(reduce_fns):
            results[position].append(reduce_fn(sample))
    return [(np.mean(values), np.std(values)) for values in results]


def verl_majority(sample):
    votes = defaultdict(list)
    for item in sample:
        votes[item["pred"]].append(item["val"])
    counts = {vote: len(values) for vote, values in votes.items()}
    return votes[max(counts, key=counts.get)][0]


def test_pass_at_k_hand_values():
    # n=4, c=1, k=2: C(3,2)/C(4,2) = 3/6 of the pairs miss the correct sample → 1 - 1/2.
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=10, c=3, k=1: a single draw is correct 3 times in 10.
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # n=5, c=2, k=2: C(3,2)/C(5,2) = 3/10 → 0.7.
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(16, 0, 8) == 0.0  # nothing correct
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 2, 15) == 1.0  # n - c = 14 < k: every draw contains a correct one


def test_pass_at_k_matches_binomial_form():
    for n in (1, 4, 16, 64):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_calc_maj_val():
    data = [{"pred": "A", "val": 0.9}, {"pred": "B", "val": 0.8}, {"pred": "A", "val": 0.7}]
    assert calc_maj_val(data, vote_key="pred", val_key="val") == 0.9  # verl's docstring example
    tie = [{"pred": "x", "val": 0}, {"pred": "y", "val": 1}, {"pred": "y", "val": 1}, {"pred": "x", "val": 0}]
    assert calc_maj_val(tie, vote_key="pred", val_key="val") == 0  # 2-2 tie: the first vote seen


def test_bootstrap_metric_matches_verl_loop():
    rng = np.random.default_rng(0)
    values = list(rng.random(16))
    for subset_size in (2, 4, 8, 16):
        ours = bootstrap_metric(values, subset_size, [np.max, np.min])
        reference = verl_bootstrap(values, subset_size, [np.max, np.min])
        np.testing.assert_allclose(np.array(ours), np.array(reference), rtol=0, atol=1e-15)


def make_validation_batch(seed=1):
    """2 sources × 3 prompts × 16 samples with correlated acc / pred, as a validation run logs them."""
    rng = np.random.default_rng(seed)
    data_sources, uids, infos = [], [], defaultdict(list)
    for source in ("AIME24", "AMC23"):
        for prompt in range(3):
            for _ in range(16):
                pred = str(rng.integers(0, 4))
                correct = pred == "0"
                data_sources.append(source)
                uids.append(f"{source}-{prompt}")
                infos["reward"].append(float(correct))
                infos["score"].append(float(correct))
                infos["acc"].append(bool(correct))
                infos["pred"].append(pred)
                infos["extracted_gt"].append("0")
    return data_sources, uids, dict(infos)


def test_process_validation_metrics_matches_verl_loop():
    data_sources, uids, infos = make_validation_batch()
    nested = process_validation_metrics(data_sources, uids, infos)
    for source in ("AIME24", "AMC23"):
        prompt_uids = [f"{source}-{prompt}" for prompt in range(3)]
        for var_name in ("reward", "acc"):
            per_uid = defaultdict(list)
            for uid in prompt_uids:
                rows = [index for index, value in enumerate(uids) if value == uid]
                values = [infos[var_name][index] for index in rows]
                preds = [infos["pred"][index] for index in rows]
                per_uid["mean@16"].append(np.mean(values))
                per_uid["std@16"].append(np.std(values))
                for k in (2, 4, 8, 16):
                    (best, best_std), (worst, worst_std) = verl_bootstrap(values, k, [np.max, np.min])
                    [(majority, majority_std)] = verl_bootstrap(
                        [{"val": value, "pred": pred} for value, pred in zip(values, preds)], k, [verl_majority]
                    )
                    for name, value in (("best", best), ("worst", worst), ("maj", majority)):
                        per_uid[f"{name}@{k}/mean"].append(value)
                    for name, value in (("best", best_std), ("worst", worst_std), ("maj", majority_std)):
                        per_uid[f"{name}@{k}/std"].append(value)
            expected = {name: np.mean(values) for name, values in per_uid.items()}
            assert set(nested[source][var_name]) == set(expected)
            for name, value in expected.items():
                assert nested[source][var_name][name] == pytest.approx(value, abs=1e-12), (source, var_name, name)
        assert "pred" not in nested[source] and "extracted_gt" not in nested[source]  # strings are skipped


def test_all_correct_and_all_wrong():
    n = 8
    for correct, expected in ((True, 1.0), (False, 0.0)):
        infos = {"acc": [correct] * n, "pred": ["7" if correct else "3"] * n}
        metrics = process_validation_metrics(["AIME25"] * n, ["p0"] * n, infos)["AIME25"]["acc"]
        for name in ("mean@8", "best@8/mean", "worst@8/mean", "maj@8/mean", "best@2/mean", "maj@4/mean"):
            assert metrics[name] == expected
        assert metrics["std@8"] == metrics["best@8/std"] == metrics["maj@8/std"] == 0.0


def test_one_correct_sample_in_two():
    # Values [1, 0]: a bootstrap draw of 2 has max 0 only if both picks are index 1 (prob 1/4),
    # so best@2 ≈ 3/4 and worst@2 ≈ 1/4; each pick is 0.5 likely, so these are within a few
    # percent of 0.75 / 0.25 over 1000 draws.
    metrics = process_validation_metrics(["S", "S"], ["u", "u"], {"acc": [1.0, 0.0]})["S"]["acc"]
    assert metrics["mean@2"] == 0.5 and metrics["std@2"] == 0.5
    assert metrics["best@2/mean"] == pytest.approx(0.75, abs=0.05)
    assert metrics["worst@2/mean"] == pytest.approx(0.25, abs=0.05)
    assert "maj@2/mean" not in metrics  # no "pred" variable, no vote


def test_validation_metric_names():
    data_sources, uids, infos = make_validation_batch()
    flat = compute_validation_metrics(data_sources, uids, infos)
    core = sorted(name for name in flat if name.startswith("val-core/"))
    assert core == sorted(
        f"val-core/{source}/acc/{metric}"
        for source in ("AIME24", "AMC23")
        for metric in ("mean@16", "best@16/mean", "best@16/std", "maj@16/mean", "maj@16/std")
    )
    assert "val-aux/AIME24/acc/worst@16/mean" in flat  # worst is never core
    assert "val-aux/AIME24/acc/std@16" in flat
    assert "val-aux/AIME24/acc/best@8/mean" in flat  # smaller n
    assert "val-aux/AIME24/reward/mean@16" in flat  # other variables
    assert "val-aux/AMC23/score/maj@16/mean" in flat
    assert all(name.startswith(("val-core/", "val-aux/")) for name in flat)


def test_core_variable_falls_back_to_reward():
    nested = {"S": {"reward": {"mean@4": 0.5, "best@4/mean": 0.7, "worst@4/mean": 0.2}, "score": {"mean@4": 0.5}}}
    assert name_validation_metrics(nested) == {
        "val-core/S/reward/mean@4": 0.5,
        "val-core/S/reward/best@4/mean": 0.7,
        "val-aux/S/reward/worst@4/mean": 0.2,
        "val-aux/S/score/mean@4": 0.5,
    }
