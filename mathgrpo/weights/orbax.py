"""Orbax checkpoints of params, and conversion to and from HF directories.

A params checkpoint is an Orbax composite with two items:
- `params`: the parameter pytree (StandardSave: one tensorstore array per leaf, restorable into any
  sharding — each process reads only its shards);
- `meta`: JSON with the model config (HF field names) and where the tokenizer came from, so an
  export needs nothing else.
Orbax writes to a temporary directory and renames it at the end, so an interrupted save is never
picked up as a checkpoint. (The training-state manager — optimizer, step, data position, RNG,
keep-N, async — comes with the trainer; it reuses `model_config_from_meta` below.)
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from mathgrpo.config import ModelConfig, from_dict
from mathgrpo.model import abstract_params
from mathgrpo.weights import hf

FORMAT_VERSION = 1


def make_meta(config: ModelConfig, tokenizer_dir: str | os.PathLike | None = None,
              generation_config: dict | None = None, hf_dtype: str | None = None) -> dict:
    """`hf_dtype`: the dtype of the HF files the params came from, which `orbax_to_hf` exports in by default."""
    return {
        "format": "mathgrpo-params",
        "version": FORMAT_VERSION,
        "model": config.architecture(),
        "param_dtype": config.param_dtype,
        "tokenizer_dir": os.path.abspath(tokenizer_dir) if tokenizer_dir else None,
        "generation_config": generation_config,
        "hf_dtype": hf_dtype,
    }


def model_config_from_meta(meta: dict, **runtime) -> ModelConfig:
    return from_dict(ModelConfig, {**meta["model"], "param_dtype": meta["param_dtype"], **runtime},
                     prefix="model.")


def save_params(path: str | os.PathLike, config: ModelConfig, params: Any, *,
                tokenizer_dir: str | os.PathLike | None = None, generation_config: dict | None = None,
                hf_dtype: str | None = None) -> None:
    """Writes params + metadata as an Orbax checkpoint at `path` (which must not exist)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose a new checkpoint directory")
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(path, ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave(make_meta(config, tokenizer_dir, generation_config, hf_dtype)),
    ))


def read_meta(path: str | os.PathLike) -> dict:
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(os.path.join(path, "meta")):
        raise FileNotFoundError(f"{path}: not a mathgrpo params checkpoint (no 'meta' item); "
                                "expected a directory written by `convert hf-to-orbax` or the trainer")
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    return checkpointer.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(path: str | os.PathLike, shardings: Any | Callable[[ModelConfig], Any] | None = None,
                   **runtime) -> tuple[ModelConfig, Any, dict]:
    """Restores (config, params, meta). `shardings` as in `hf.load` (None: the first device)."""
    path = os.path.abspath(os.fspath(path))
    meta = read_meta(path)
    config = model_config_from_meta(meta, **runtime)
    abstract = abstract_params(config)
    shardings = hf.placement(shardings, config, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    params = checkpointer.restore(path, ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    return config, params, meta


def hf_to_orbax(hf_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> ModelConfig:
    """HF directory → Orbax params checkpoint (params stored in `dtype`; bf16 → fp32 is exact). The
    files' own dtype is recorded, so `orbax_to_hf` gives back the files the checkpoint came from."""
    config, params = hf.load(hf_dir, dtype=dtype)
    tokenizer = hf_dir if any(os.path.exists(os.path.join(hf_dir, f)) for f in hf.TOKENIZER_FILES) else None
    save_params(out, config, params, tokenizer_dir=tokenizer,
                generation_config=hf.read_generation_config(hf_dir), hf_dtype=hf.stored_dtype(hf_dir))
    return config


def orbax_to_hf(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES) -> ModelConfig:
    """Orbax params checkpoint → HF directory (with the tokenizer it was converted from, if still there).

    `dtype` None: the dtype of the HF files the checkpoint was converted from (so HF → Orbax → HF gives
    the same files, fp32 or bf16), else the params' own dtype (a trainer checkpoint: fp32)."""
    config, params, meta = restore_params(ckpt)
    dtype = dtype or meta.get("hf_dtype") or config.param_dtype
    tokenizer = meta.get("tokenizer_dir")
    if tokenizer and not os.path.isdir(tokenizer):
        print(f"warning: tokenizer source {tokenizer} no longer exists; exporting without tokenizer files")
        tokenizer = None
    hf.save(config, params, out, dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer_dir=tokenizer,
               generation_config=meta.get("generation_config"))
    return config


# ---------------------------------------------------------------------------------------------------
# Training checkpoints.


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of a tree of arrays, ShapeDtypeStructs or Orbax array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {".".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves
            if hasattr(leaf, "shape")}


class TrainCheckpointer:
    """Orbax CheckpointManager over the whole training state, one directory per step:
    - `state`: the TrainState (params, optimizer state, step, skipped-step counter), restorable into
      any mesh's shardings;
    - `extra`: JSON — the data iterator position, the resolved config, the model config and
      tokenizer source (so a step directory exports to HF alone), and counters.
    Saves are asynchronous (training continues while tensorstore writes) and atomic: Orbax writes a
    temporary directory and renames it on commit, and `latest_step` only sees committed steps, so a
    run killed mid-save resumes from the previous one. Keeps the newest `keep` steps.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        # Handlers named up front, so a new process reads a step's metadata before any restore.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, extra: dict) -> None:
        """Starts saving `state` and `extra` as step `step` (waits for the previous save first)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        extra=ocp.args.JsonSave(extra)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state (into the shardings of `abstract_state`, a tree of ShapeDtypeStructs) and extra.

        The saved arrays' names and shapes are checked against `abstract_state` first (from the step's
        metadata, nothing read): a mismatch is a ValueError naming the first differing array, raised
        before Orbax starts any read (a failed read leaves its other reads pending)."""
        self._check_shapes(step, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
        return restored["state"], restored["extra"]

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        saved = _shapes_by_name(self.manager.item_metadata(step)["state"])
        wanted = _shapes_by_name(abstract_state)
        where = f"checkpoint {self.directory}/{step}"
        missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
        if missing or extra:
            raise ValueError(f"{where} holds other arrays than the training state: missing {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''}, not expected {extra[:3]}"
                             f"{' ...' if len(extra) > 3 else ''}")
        for name in sorted(wanted):
            if saved[name] != wanted[name]:
                raise ValueError(f"{where}: {name} was saved with shape {saved[name]}, expected {wanted[name]}")

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed; raises its error if it failed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
