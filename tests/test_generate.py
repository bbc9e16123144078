"""The `generate` command, run in-process on a tiny random Qwen3 with the real Qwen3 tokenizer (JAX sampler,
and vLLM's CPU build)."""

import argparse
import importlib.util
import os
import re
from unittest import mock

import pytest

from mathgrpo.tools import generate
from mathgrpo.weights import hf, orbax

PROMPT = "What is 2 + 3?"
HEADER = re.compile(r"^--- completion (\d+)/(\d+): finish=(stop|length), (\d+) tokens, mean log-prob (-?\d+\.\d+)$",
                    re.MULTILINE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen3_tokenizer_dir):
    """Tiny everywhere but the vocabulary, which must cover the real tokenizer's 151,643 + special ids."""
    from mathgrpo.testing.tiny import make_tiny_qwen3

    path = tmp_path_factory.mktemp("tiny_generate")
    make_tiny_qwen3(path, vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=None,
                    eos_token_id=151643, tie_word_embeddings=True)
    hf.copy_tokenizer(qwen3_tokenizer_dir, path)
    return path


def _run(capsys, model, *extra):
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    args = parser.parse_args(["--model", str(model), "--prompt", PROMPT, "--max-tokens", "6", *extra])
    assert generate.main(args) == 0
    out = capsys.readouterr().out
    return out, HEADER.findall(out)


def _texts(out):
    """The decoded completions: the text between each header and the next."""
    return [part.split("\n", 1)[1] for part in out.split("--- completion ")[1:]]


def test_greedy_is_deterministic_and_n_prints_n_completions(capsys, model_dir, qwen3_tokenizer_dir):
    out, headers = _run(capsys, model_dir, "--temperature", "0")
    assert len(headers) == 1 and headers[0][:2] == ("1", "1")
    # The prompt is the chat template's rendering of one user message.
    from mathgrpo.data.prompts import load_tokenizer

    tokenizer = load_tokenizer(qwen3_tokenizer_dir)
    ids = generate.chat_prompt_ids(tokenizer, PROMPT)
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
                                         "<think>\n\n</think>\n\n")
    assert f"prompt: {len(ids)} tokens" in out
    assert "stop tokens [151643, 151645]" in out  # generation config EOS, then <|im_end|>
    again, _ = _run(capsys, model_dir, "--temperature", "0")
    assert again == out
    assert float(headers[0][4]) < 0 and 1 <= int(headers[0][3]) <= 6

    out, headers = _run(capsys, model_dir, "--n", "2", "--seed", "3")
    assert [h[:2] for h in headers] == [("1", "2"), ("2", "2")]
    assert len(_texts(out)) == 2
    # A pool of 2 rows (continuous batching) samples the same keyed completions as the static batch.
    pool, _ = _run(capsys, model_dir, "--n", "2", "--seed", "3", "--max-slots", "2", "--compute-dtype", "float32")
    static, _ = _run(capsys, model_dir, "--n", "2", "--seed", "3", "--compute-dtype", "float32")
    assert _texts(pool) == _texts(static)


def test_orbax_checkpoint_gives_the_same_greedy_text(capsys, model_dir, tmp_path):
    """A params checkpoint converted from the HF dir (its tokenizer recorded in meta) samples the same."""
    orbax.hf_to_orbax(model_dir, tmp_path / "ckpt")
    hf_out, _ = _run(capsys, model_dir, "--temperature", "0")
    ckpt_out, _ = _run(capsys, tmp_path / "ckpt", "--temperature", "0")
    assert ckpt_out == hf_out


def test_bad_model_path_and_settings_stop_with_a_message(capsys, tmp_path, model_dir):
    with pytest.raises(SystemExit, match="neither a HF model directory"):
        _run(capsys, tmp_path)
    with pytest.raises(SystemExit, match="top_p"):
        _run(capsys, model_dir, "--top-p", "0")
    if importlib.util.find_spec("vllm") is None:
        with mock.patch.dict(os.environ), pytest.raises(SystemExit, match="vLLM is not installed"):
            _run(capsys, model_dir, "--engine", "vllm")  # says how to install it, before loading
    else:  # vLLM's CPU build: its attention kernels have no head_dim 8
        with mock.patch.dict(os.environ), pytest.raises(SystemExit, match="^generate: .*this model has head_dim=8"):
            _run(capsys, model_dir, "--engine", "vllm")


def test_vllm_engine_prints_the_jax_samplers_greedy_text(capsys, qwen3_tokenizer_dir, tmp_path):
    """`--engine vllm` (vLLM's CPU build here): greedy completions equal the JAX sampler's (fp32: in bf16
    the two engines' roundings differ)."""
    pytest.importorskip("vllm")
    from mathgrpo.testing.tiny import make_tiny_qwen3

    make_tiny_qwen3(tmp_path, vocab_size=151936, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, bos_token_id=None,
                    eos_token_id=151643, tie_word_embeddings=True, initializer_range=0.2)
    hf.copy_tokenizer(qwen3_tokenizer_dir, tmp_path)
    with mock.patch.dict(os.environ):
        vllm_out, headers = _run(capsys, tmp_path, "--temperature", "0", "--n", "2", "--engine", "vllm",
                                 "--compute-dtype", "float32")
    jax_out, _ = _run(capsys, tmp_path, "--temperature", "0", "--n", "2", "--compute-dtype", "float32")
    assert len(headers) == 2 and "engine vllm" in vllm_out
    assert _texts(vllm_out) == _texts(jax_out)
    assert [h[:4] for h in HEADER.findall(vllm_out)] == [h[:4] for h in HEADER.findall(jax_out)]
