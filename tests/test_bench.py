"""The bench command end to end at its tiniest size: keys present, ratios positive and finite, no recompiles.

Speeds are not asserted: they depend on the machine and its load."""

import json
import math

from mathgrpo.__main__ import build_parser, main

KEYS = (
    "train_step.tokens_per_s", "train_step.torch_tokens_per_s", "train_step.ratio_vs_torch",
    "train_step.achieved_flops_per_s", "train_step.fraction_of_matmul_peak", "machine.matmul_flops_per_s",
    "logprob.tokens_per_s", "logprob.torch_tokens_per_s", "logprob.ratio_vs_torch",
    "sampler.tokens_per_s", "sampler.hf_generate_tokens_per_s", "sampler.ratio_vs_hf_generate",
    "reward.responses_per_s",
)


def lookup(results, dotted):
    value = results
    for part in dotted.split("."):
        value = value[part]
    return value


def test_bench_tiny_reports_every_measure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the one JSON line, last
    assert printed["train_step"]["ratio_vs_torch"] == results["train_step"]["ratio_vs_torch"]
    for key in KEYS:
        value = lookup(results, key)
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert results["recompiles_after_warmup"] == 0, results["recompiles"]
    assert results["plan"] == {"per_device_peak_bytes": None, "flops_per_step_estimate": None}
    assert any("plan skipped" in note for note in results["notes"])
    # The responses mix correct and wrong answers, so the mean score is strictly between 0 and 1.
    assert 0 < results["reward"]["mean_score"] < 1


def test_bench_parser_is_light():
    """`--help` / parsing must not start JAX or torch (bench imports them only in main)."""
    import subprocess
    import sys

    code = ("import sys; from mathgrpo.__main__ import build_parser; "
            "build_parser().parse_args(['bench', '--quick']); "
            "print('jax' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
    assert build_parser().parse_args(["bench", "--tiny"]).tiny


def test_torch_worker_reports_its_errors(tmp_path):
    """The torch reference runs in its own process; a failure there is raised here, naming the cause."""
    import pytest

    from mathgrpo.bench_torch import TorchSide

    with pytest.raises(RuntimeError, match="torch worker failed: .*"):
        TorchSide(str(tmp_path / "no-model-here"), threads=1)


def test_torch_worker_times_its_calls(tmp_path):
    """Each call comes back with the worker's own seconds and page-fault count; an unknown data-less
    call fails with the method named."""
    import pytest

    from mathgrpo.bench_torch import TorchSide
    from mathgrpo.tiny import make_tiny_qwen3

    make_tiny_qwen3(tmp_path)
    with TorchSide(str(tmp_path), threads=1) as reference:
        reference.call("set_sample_args", [[5, 6, 7], [8, 9, 10]], 4)
        seconds, faults = reference.call("sample")
        assert seconds > 0 and faults >= 0
        with pytest.raises(RuntimeError, match="train: "):  # no train data sent yet
            reference.call("train")
