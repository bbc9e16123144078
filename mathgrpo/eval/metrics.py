"""Validation metrics with verl's definitions and names, plus the unbiased pass@k.

Reproduces verl `verl/trainer/ppo/metric_utils.py` (`bootstrap_metric`, `calc_maj_val`,
`process_validation_metrics`) and the naming loop of `RayPPOTrainer._validate` in
`verl/trainer/ppo/ray_trainer.py` (docs/recipe.md §2.9). For each data source, prompt (uid) and
variable with n samples:

    mean@n, std@n                      over the n samples (np.std: population, ddof=0)
    best@k/mean|std, worst@k/mean|std  bootstrap: 1000 draws of k samples WITH replacement
                                       (np.random.seed(42) before every call), max / min of each
    maj@k/mean|std                     same draws; value of the first sample whose `pred` is the
                                       most frequent one (ties: the pred seen first in the draw)
    k in 2, 4, 8, ..., n (powers of two below n, then n itself)

then averaged over uids. `val-core/{source}/{var}/{metric}` holds the core variable ("acc" when
present, else "reward") for the metrics mean/maj/best at the largest n; everything else is
`val-aux/...`. Note `best@n` is a bootstrap estimate, lower than "any of n correct"; the unbiased
pass@k of Chen et al. (2021) is `pass_at_k`.

Departure from verl, none in the numbers: the 1000 bootstrap draws are made with one
`np.random.choice(n, size=(1000, k))` call and reduced with array operations instead of 1000
calls in a Python loop. Legacy `RandomState` fills the (1000, k) array from the same stream in
the same order, so the indices, and therefore every metric, are identical (tested against a
loop re-implementation); values come back as Python floats.
"""

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

N_BOOTSTRAP = 1000
CORE_METRIC_PREFIXES = ("mean", "maj", "best")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as the product form of Chen et al. (2021).

    n samples, c of them correct; the product Π_{i=n-c+1}^{n} (1 - k/i) equals the binomial
    ratio without forming huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every draw of k samples contains a correct one
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_indices(n_data: int, subset_size: int, n_bootstrap: int = N_BOOTSTRAP, seed: int = 42) -> np.ndarray:
    """The [n_bootstrap, subset_size] sample indices verl's `bootstrap_metric` draws (it reseeds each call)."""
    np.random.seed(seed)  # verl uses the global legacy generator; so must we, to draw the same indices
    return np.random.choice(n_data, size=(n_bootstrap, subset_size), replace=True)


def bootstrap_metric(
    values: Sequence[Any],
    subset_size: int,
    reduce_fns: Sequence[Callable[[list[Any]], float]],
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 42,
) -> list[tuple[float, float]]:
    """verl `bootstrap_metric`: (mean, std) over bootstrap draws of each reduce function.

    Generic form (any values, any reduce function), one reduce call per draw like verl.
    """
    indices = bootstrap_indices(len(values), subset_size, n_bootstrap, seed)
    results = []
    for reduce_fn in reduce_fns:
        draws = np.array([reduce_fn([values[index] for index in row]) for row in indices], dtype=np.float64)
        results.append((float(np.mean(draws)), float(np.std(draws))))
    return results


def calc_maj_val(data: Sequence[dict], vote_key: str, val_key: str) -> Any:
    """verl `calc_maj_val`: `val_key` of the first item whose `vote_key` is the most common.

    Ties go to the vote seen first (dict insertion order and `max` keep the first maximum).
    """
    vote_to_values = defaultdict(list)
    for item in data:
        vote_to_values[item[vote_key]].append(item[val_key])
    majority_vote = max(vote_to_values, key=lambda vote: len(vote_to_values[vote]))
    return vote_to_values[majority_vote][0]


def _majority_values(values: np.ndarray, vote_codes: np.ndarray) -> np.ndarray:
    """`calc_maj_val` of every row at once: [R, k] values and integer vote codes → [R].

    A row's majority vote is the most frequent code, ties to the code seen first; the first
    position holding a code with the maximal count is exactly that code's first occurrence.
    """
    counts = (vote_codes[:, :, None] == vote_codes[:, None, :]).sum(axis=2)  # [R, k]
    first_majority = np.argmax(counts == counts.max(axis=1, keepdims=True), axis=1)
    return values[np.arange(len(values)), first_majority]


def _uid_metrics(values: list[Any], preds: list[Any] | None, seed: int) -> dict[str, float]:
    """verl's per-(data source, uid, variable) metrics for one variable's n values."""
    n_resps = len(values)
    metric = {f"mean@{n_resps}": float(np.mean(values))}
    if n_resps <= 1:
        return metric
    metric[f"std@{n_resps}"] = float(np.std(values))
    subset_sizes = []  # verl: 2, 4, 8, ... below n, then n itself
    while 2 ** (len(subset_sizes) + 1) < n_resps:
        subset_sizes.append(2 ** (len(subset_sizes) + 1))
    subset_sizes.append(n_resps)
    array = np.asarray(values, dtype=np.float64)
    vote_codes = None
    if preds is not None:
        code_of = {}
        vote_codes = np.array([code_of.setdefault(pred, len(code_of)) for pred in preds])
    for subset_size in subset_sizes:
        indices = bootstrap_indices(n_resps, subset_size, N_BOOTSTRAP, seed)
        draws = array[indices]  # [1000, k]
        for name, reduced in (("best", draws.max(axis=1)), ("worst", draws.min(axis=1))):
            metric[f"{name}@{subset_size}/mean"] = float(np.mean(reduced))
            metric[f"{name}@{subset_size}/std"] = float(np.std(reduced))
        if vote_codes is not None:
            majority = _majority_values(draws, vote_codes[indices])
            metric[f"maj@{subset_size}/mean"] = float(np.mean(majority))
            metric[f"maj@{subset_size}/std"] = float(np.std(majority))
    return metric


def process_validation_metrics(
    data_sources: Sequence[str], sample_uids: Sequence[str], infos_dict: dict[str, Sequence[Any]], seed: int = 42
) -> dict[str, dict[str, dict[str, float]]]:
    """verl `process_validation_metrics`: {data_source: {variable: {metric: value}}}.

    infos_dict maps a variable name to one value per sample (e.g. "reward", "score", "acc",
    "pred"); string-valued variables are skipped as metrics and "pred" drives majority voting.
    """
    grouped = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # source → uid → variable → values
    for sample_index, data_source in enumerate(data_sources):
        variables = grouped[data_source][sample_uids[sample_index]]
        for var_name, var_values in infos_dict.items():
            variables[var_name].append(var_values[sample_index])
    # source → variable → metric → one value per uid
    per_uid = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for data_source, uid_to_variables in grouped.items():
        for variables in uid_to_variables.values():
            preds = variables.get("pred")
            for var_name, var_values in variables.items():
                if isinstance(var_values[0], str):
                    continue
                for metric_name, value in _uid_metrics(var_values, preds, seed).items():
                    per_uid[data_source][var_name][metric_name].append(value)
    return {
        data_source: {
            var_name: {metric_name: float(np.mean(uid_values)) for metric_name, uid_values in metrics.items()}
            for var_name, metrics in variables.items()
        }
        for data_source, variables in per_uid.items()
    }


def name_validation_metrics(nested: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """verl `_validate`'s flat names: "val-core/{source}/{var}/{metric}" or "val-aux/...".

    Core: the variable "acc" (else "reward"), metrics starting with mean/maj/best, at the largest n
    of that variable (verl's test is the substring f"@{n_max}", reproduced as is).
    """
    flat = {}
    for data_source, variables in nested.items():
        core_var = "acc" if "acc" in variables else "reward"
        for var_name, metrics in variables.items():
            n_max = max(int(name.split("@")[-1].split("/")[0]) for name in metrics)
            for metric_name, value in metrics.items():
                is_core = (
                    var_name == core_var
                    and any(metric_name.startswith(prefix) for prefix in CORE_METRIC_PREFIXES)
                    and f"@{n_max}" in metric_name
                )
                flat[f"{'val-core' if is_core else 'val-aux'}/{data_source}/{var_name}/{metric_name}"] = value
    return flat


def compute_validation_metrics(
    data_sources: Sequence[str], sample_uids: Sequence[str], infos_dict: dict[str, Sequence[Any]], seed: int = 42
) -> dict[str, float]:
    """`process_validation_metrics` then `name_validation_metrics`: what verl logs after validation."""
    return name_validation_metrics(process_validation_metrics(data_sources, sample_uids, infos_dict, seed))
