"""The bench command end to end at its tiniest size: keys present, ratios positive and finite, no recompiles.

Speeds are not asserted: they depend on the machine and its load."""

import importlib.util
import json
import math

import pytest

from benchmarks.__main__ import build_parser, main
from benchmarks.bench import long_tail_lengths

KEYS = (
    "train_step.tokens_per_s", "train_step.torch_tokens_per_s", "train_step.ratio_vs_torch",
    "train_step.achieved_flops_per_s", "train_step.fraction_of_matmul_peak", "train_step.matmul_flops_per_s",
    "machine.matmul_flops_per_s", "machine.matmul_flops_per_s_at_start",
    "logprob.tokens_per_s", "logprob.torch_tokens_per_s", "logprob.ratio_vs_torch",
    "sampler.tokens_per_s", "sampler.hf_generate_tokens_per_s", "sampler.ratio_vs_hf_generate",
    "sampler.matmul_flops_per_s", "sampler.matmul_bound_tokens_per_s", "sampler.fraction_of_matmul_bound",
    "sampler.long_tail.continuous_tokens_per_s", "sampler.long_tail.static_tokens_per_s",
    "sampler.long_tail.ratio_vs_static", "reward.responses_per_s",
)


def lookup(results, dotted):
    value = results
    for part in dotted.split("."):
        value = value[part]
    return value


def test_bench_tiny_reports_every_measure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--tiny", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the one JSON line, last
    assert printed["train_step"]["ratio_vs_torch"] == results["train_step"]["ratio_vs_torch"]
    for key in KEYS:
        value = lookup(results, key)
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert results["recompiles_after_warmup"] == 0, results["recompiles"]
    # the fraction is of the peak measured between the train steps, and says so
    train = results["train_step"]
    assert train["fraction_of_matmul_peak"] == train["achieved_flops_per_s"] / train["matmul_flops_per_s"]
    assert results["machine"]["matmul_flops_per_s"] == train["matmul_flops_per_s"]
    assert len(train["calls"]["matmul"]["seconds"]) == results["sizes"]["repeats"]
    assert results["plan"] == {"per_device_peak_bytes": None, "flops_per_step_estimate": None}
    assert any("plan skipped" in note for note in results["notes"])
    # The responses mix correct and wrong answers, so the mean score is strictly between 0 and 1.
    assert 0 < results["reward"]["mean_score"] < 1
    # every bound of the issue is checked against this run's own value, and printed
    from benchmarks.bench import ACCEPTANCE

    assert set(results["acceptance"]) == {key for key, *_ in ACCEPTANCE}
    for key, check in results["acceptance"].items():
        assert check["value"] == lookup(results, key)
    assert results["acceptance"]["recompiles_after_warmup"]["met"]
    # vLLM (its CPU build, installed by the test requirements) on the same workload, in the same run
    sampler = results["sampler"]
    long_tail = sampler["long_tail"]
    if importlib.util.find_spec("vllm") is not None:
        assert sampler["vllm_tokens_per_s"] > 0 and len(sampler["calls"]["vllm"]["seconds"]) == 1
        assert sampler["ratio_vs_vllm"] == sampler["calls"]["vllm"]["median"] / sampler["calls"]["ours"]["median"]
        assert long_tail["ratio_vs_vllm"] == \
            long_tail["continuous_tokens_per_s"] / long_tail["vllm_tokens_per_s"]
    else:
        assert sampler["ratio_vs_vllm"] is None and any("vLLM is not installed" in n for n in results["notes"])
    # The decode limit is the matmul peak measured between the sampler's calls (not a side of its
    # timing) over the formula's FLOPs per token (tiny: 1 layer, D 64,
    # N 2 × H 32, K 1, I 128, V 512; context = prompt 8 + (8 new tokens − 1) / 2).
    per_token = 2 * 64 * (2 * 32 + 2 * 32) + 2 * 64 * 64 + 2 * 3 * 64 * 128 + 2 * 2 * 64 * (8 + 3.5) + 2 * 64 * 512
    assert sampler["matmul_flops_per_token"] == per_token
    assert sampler["matmul_bound_tokens_per_s"] == sampler["matmul_flops_per_s"] / per_token
    assert "matmul" not in sampler["calls"]
    assert long_tail["requests"] == 12 and long_tail["slots"] == 4
    assert long_tail["new_tokens"] == sum(long_tail_lengths(12, 8))
    assert results["recompiles"]["continuous_sampler"] == 0


def test_long_tail_lengths_are_mostly_short_with_a_tail_at_max_tokens():
    lengths = long_tail_lengths(192, 256)
    assert len(lengths) == 192 and min(lengths) == 8 and max(lengths) == 256
    assert sum(length == 256 for length in lengths) == 19  # quantiles (i + 0.5) / 192 >= 0.9: i >= 173
    assert sorted(lengths)[96] < 32  # the median request is short
    assert lengths != sorted(lengths) and long_tail_lengths(192, 256) == lengths  # fixed, shuffled order


def test_acceptance_compares_each_bound():
    """Values just under and at each bound (scripted results, no run): met exactly when the issue's
    comparison holds, and the printed lines say which."""
    from benchmarks.bench import ACCEPTANCE, acceptance, format_table

    def results(train, fraction, logprob, sampler, recompiles, long_static, vllm, long_vllm, decode):
        return {"train_step": {"ratio_vs_torch": train, "fraction_of_matmul_peak": fraction},
                "logprob": {"ratio_vs_torch": logprob},
                "sampler": {"ratio_vs_hf_generate": sampler, "ratio_vs_vllm": vllm, "fraction_of_matmul_bound": decode,
                            "long_tail": {"ratio_vs_static": long_static, "ratio_vs_vllm": long_vllm}},
                "recompiles_after_warmup": recompiles}

    bounds = {key: bound for key, _, bound, _ in ACCEPTANCE}
    assert bounds == {"train_step.ratio_vs_torch": 1.3, "train_step.fraction_of_matmul_peak": 0.60,
                      "logprob.ratio_vs_torch": 1.3, "sampler.ratio_vs_hf_generate": 2.0,
                      "recompiles_after_warmup": 0, "sampler.long_tail.ratio_vs_static": 2.0,
                      "sampler.ratio_vs_vllm": 1.0, "sampler.long_tail.ratio_vs_vllm": 1.0,
                      "sampler.fraction_of_matmul_bound": 0.6}
    at = acceptance(results(1.3, 0.60, 1.3, 2.0, 0, 2.0, 1.0, 1.0, 0.6))
    assert all(check["met"] for check in at.values())
    under = acceptance(results(1.29, 0.59, 1.29, 1.99, 1, 1.99, 0.99, 0.99, 0.59))
    assert not any(check["met"] for check in under.values())
    missing = acceptance(results(1.3, 0.60, 1.3, 2.0, 0, 2.0, None, None, 0.6))  # no vLLM in this run
    assert [key for key, check in missing.items() if not check["met"]] == [
        "sampler.ratio_vs_vllm", "sampler.long_tail.ratio_vs_vllm"]
    mixed = acceptance(results(2.3, 0.55, 3.1, 4.0, 0, 3.0, 1.2, 1.1, 0.7))
    assert [key for key, check in mixed.items() if not check["met"]] == ["train_step.fraction_of_matmul_peak"]

    row = {"tokens_per_s": 1.0, "torch_tokens_per_s": 1.0}
    full = {"size": "full", "threads": 2, "notes": [], "machine": {"cpu": "x", "matmul_flops_per_s": 1.0},
            "train_step": {**row, "ratio_vs_torch": 2.3, "achieved_flops_per_s": 0.55,
                           "fraction_of_matmul_peak": 0.55},
            "logprob": {**row, "ratio_vs_torch": 3.1},
            "sampler": {"tokens_per_s": 1.0, "hf_generate_tokens_per_s": 1.0, "ratio_vs_hf_generate": 4.0,
                        "vllm_tokens_per_s": None, "ratio_vs_vllm": 1.2, "matmul_bound_tokens_per_s": 1.0,
                        "fraction_of_matmul_bound": 0.7,
                        "long_tail": {"continuous_tokens_per_s": 1.0, "static_tokens_per_s": 1.0,
                                      "vllm_tokens_per_s": 1.0, "ratio_vs_static": 3.0, "ratio_vs_vllm": 1.1}},
            "reward": {"responses_per_s": 1.0}, "plan": {"per_device_peak_bytes": None,
                                                        "flops_per_step_estimate": None},
            "recompiles_after_warmup": 0, "acceptance": mixed}
    lines = format_table(full).splitlines()
    assert "NOT met  train step FLOP/s / fp32 matmul peak: 0.55 >= 0.6" in [line.strip() for line in lines]
    assert sum(line.strip().startswith("met ") for line in lines) == 8


def test_bench_parser_is_light():
    """`--help` / parsing must not start JAX or torch (bench imports them only in main)."""
    import subprocess
    import sys

    code = ("import sys; from benchmarks.__main__ import build_parser; "
            "build_parser().parse_args(['--quick']); "
            "print('jax' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
    assert build_parser().parse_args(["--tiny"]).tiny


def test_torch_worker_reports_its_errors(tmp_path):
    """The torch reference runs in its own process; a failure there is raised here, naming the cause."""
    import pytest

    from benchmarks.bench_torch import TorchSide

    with pytest.raises(RuntimeError, match="torch worker failed: .*"):
        TorchSide(str(tmp_path / "no-model-here"), threads=1)


def test_torch_worker_times_its_calls(tmp_path):
    """Each call comes back with the worker's own seconds and page-fault count; an unknown data-less
    call fails with the method named."""
    import pytest

    from benchmarks.bench_torch import TorchSide
    from mathgrpo.testing.tiny import make_tiny_qwen3

    make_tiny_qwen3(tmp_path)
    with TorchSide(str(tmp_path), threads=1) as reference:
        reference.call("set_sample_args", [[5, 6, 7], [8, 9, 10]], 4)
        seconds, faults = reference.call("sample")
        assert seconds > 0 and faults >= 0
        with pytest.raises(RuntimeError, match="train: "):  # no train data sent yet
            reference.call("train")


def test_calls_that_grow_the_heap_are_replaced_and_kept_in_the_record():
    """`interleaved` times `repeats` calls per side that did not grow the heap, replacing a call with
    HEAP_GROWTH_FAULTS or more page faults by one more (at most `extra`), and reports those apart."""
    from benchmarks.bench import HEAP_GROWTH_FAULTS, interleaved

    big = HEAP_GROWTH_FAULTS
    script = {
        # 2 warm-up calls, then: steady, growth, growth, steady, steady -> median of 1, 3, 5 = 3
        "ours": iter([(9.0, big), (9.0, 0), (1.0, 0), (7.0, big), (8.0, big + 1), (3.0, 0), (5.0, 10)]),
        # never steady: the first 3 + 1 extra calls are all reported, their median
        "theirs": iter([(0.0, 0), (0.0, 0), (2.0, big), (4.0, big), (6.0, big), (8.0, big)]),
    }
    sides = {name: (lambda it=it: next(it)) for name, it in script.items()}
    result = interleaved(sides, repeats=3, warmup=2, extra=1)
    # ours needed 2 extra calls but may take only 1: its 2 steady calls so far are what it reports
    assert result["ours"]["seconds"] == [1.0, 3.0] and result["ours"]["median"] == 2.0
    assert result["ours"]["heap_growth_calls"] == [[7.0, big], [8.0, big + 1]]
    assert result["theirs"]["seconds"] == [2.0, 4.0, 6.0, 8.0] and result["theirs"]["median"] == 5.0
    assert result["theirs"]["page_faults"] == [big] * 4

    script["ours"] = iter([(0.0, 0)] * 2 + [(1.0, 0), (7.0, big), (3.0, 0), (5.0, 10)])
    script["theirs"] = iter([(0.0, 0)] * 2 + [(2.0, 0)] * 3)
    sides = {name: (lambda it=it: next(it)) for name, it in script.items()}
    result = interleaved(sides, repeats=3, warmup=2, extra=4)
    assert result["ours"]["seconds"] == [1.0, 3.0, 5.0] and result["ours"]["median"] == 3.0
    assert result["ours"]["heap_growth_calls"] == [[7.0, big]]
    assert result["theirs"]["heap_growth_calls"] == []

    # Per-side counts (the slow reference once): each side stops at its own count, calls alternating.
    order = []
    sides = {name: (lambda name=name: order.append(name) or (float(len(order)), 0)) for name in ("ours", "hf")}
    result = interleaved(sides, repeats={"ours": 3, "hf": 1}, warmup=1, extra=0)
    assert order == ["ours", "hf", "ours", "hf", "ours", "ours"]
    assert result["ours"]["seconds"] == [3.0, 5.0, 6.0] and result["hf"]["seconds"] == [4.0]

    # settle runs once, after the warm-up calls and before the first timed one
    order.clear()
    interleaved(sides, repeats=1, warmup=2, extra=0, settle=lambda: order.append("settle"))
    assert order == ["ours", "hf", "ours", "hf", "settle", "ours", "hf"]


def test_decode_roofline_at_small_shapes(tmp_path):
    """`bench --decode` on CPU at a small model of the 4B's layout: every request makes its tokens, and the
    roofline is the formula's (bytes a step must read over the copy bandwidth measured in the run)."""
    out = tmp_path / "decode.json"
    assert main(["--decode", "--decode-layers", "2", "--decode-hidden", "64", "--decode-slots", "4",
                 "--decode-prompt", "16", "--decode-tokens", "8", "--decode-copy-gib", "0.0625",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    # 2 layers of D 64, F 192, 4 heads of 32, 2 kv heads; the tied head 4096 × 64; all bf16.
    layer = 3 * 64 * 192 + 64 * (4 * 32 + 2 * 2 * 32 + 4 * 32)
    assert r["weight_bytes_per_step"] == 2 * (2 * layer + 4096 * 64)
    assert r["kv_bytes_per_step"] == 4 * (16 + 3.5) * 2 * 2 * 2 * 32 * 2
    assert r["roofline_tokens_per_s"] == pytest.approx(
        4 * r["copy_bandwidth_bytes_per_s"] / (r["weight_bytes_per_step"] + r["kv_bytes_per_step"]))
    assert r["tokens_per_s"] == pytest.approx(4 * 8 / r["seconds"])
    assert 0 < r["fraction_of_roofline"] == pytest.approx(r["tokens_per_s"] / r["roofline_tokens_per_s"])
