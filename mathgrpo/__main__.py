"""Command line: `python -m mathgrpo {train,sft,eval,generate,convert,parity,plan,bench} ...`."""

from __future__ import annotations

import argparse
import sys


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def build_parser() -> argparse.ArgumentParser:
    from mathgrpo.config import ATTENTION_IMPLEMENTATIONS

    parser = argparse.ArgumentParser(prog="mathgrpo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="HF safetensors ⇄ Orbax params checkpoint")
    direction = convert.add_subparsers(dest="direction", required=True)
    to_orbax = direction.add_parser("hf-to-orbax", help="HF model directory → Orbax checkpoint")
    to_orbax.add_argument("--hf-dir", required=True)
    to_orbax.add_argument("--out", required=True, help="new checkpoint directory")
    to_orbax.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                          help="dtype of the stored params (default: fp32 master weights)")
    to_hf = direction.add_parser("orbax-to-hf", help="Orbax checkpoint → HF model directory")
    to_hf.add_argument("--ckpt", required=True)
    to_hf.add_argument("--out", required=True)
    to_hf.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                       help="default: the dtype of the HF files the checkpoint came from, else its params' dtype")
    to_hf.add_argument("--max-shard-size", default="5GB", type=_parse_size,
                       help="size limit of one safetensors file (e.g. 5GB, 500MB)")

    parity = commands.add_parser("parity", help="compare logits with PyTorch transformers on a random batch")
    parity.add_argument("--hf-dir", required=True)
    parity.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parity.add_argument("--batch", type=int, default=2)
    parity.add_argument("--seq", type=int, default=16)
    parity.add_argument("--seed", type=int, default=0)
    parity.add_argument("--attention", default="reference", choices=list(ATTENTION_IMPLEMENTATIONS))
    train = commands.add_parser("train", help="run (or resume) GRPO training from an experiment config")
    train.add_argument("--config", required=True)
    train.add_argument("overrides", nargs="*", help="key.path=value")

    sft = commands.add_parser("sft", help="supervised warm start on JSONL {messages, response}")
    sft.add_argument("--config", required=True, help="experiment config (model, mesh, data, optim sections)")
    sft.add_argument("--data", required=True, help="JSONL of {messages, response}")
    sft.add_argument("--steps", type=int, default=50)
    sft.add_argument("--batch-size", type=int, default=32)
    sft.add_argument("--lr", type=float, default=1e-3)
    sft.add_argument("--seed", type=int, default=0)
    sft.add_argument("--out", required=True, help="directory for params/ (Orbax) and hf/")
    sft.add_argument("overrides", nargs="*", help="key.path=value")

    from mathgrpo.eval import validate  # light: JAX starts only when a command runs (plan sets XLA_FLAGS first)

    validate.add_arguments(commands.add_parser(
        "eval", help="sample n responses per prompt, grade them, report mean@n / best@k / maj@k / pass@k"))

    from mathgrpo.tools import generate  # light: JAX starts only when the command runs

    generate.add_arguments(commands.add_parser(
        "generate", help="sample completions of one chat prompt (chat template; JAX sampler or vLLM)"))

    plan = commands.add_parser("plan", help="compile ahead of time on abstract arrays: per-device memory and FLOPs")
    plan.add_argument("--config", required=True)
    plan.add_argument("overrides", nargs="*", help="key.path=value")
    plan.add_argument("--naive", action="store_true",
                      help="plan the step without memory work (O(T²) attention, no remat, full fp32 logits)")
    plan.add_argument("--described-devices", action="store_true",
                      help="on a GPU machine, compile for described GPUs even when enough real ones exist")
    plan.add_argument("--gpu-spec", default=None, metavar="TXTPB",
                      help="compile for described GPUs of this kind on any machine, no GPU needed: a text "
                           "GpuTargetConfigProto such as configs/gpus/h100_sxm.txtpb (needs JAX's CUDA plugin)")
    return parser


def _fake_devices_for(config_path: str, overrides: list[str]) -> None:
    """Before JAX starts: ask XLA for as many CPU devices as the mesh has, so a plan can run anywhere
    (it only affects the CPU platform; real accelerators are used when there are enough)."""
    import math
    import os

    from mathgrpo.config import config_data

    mesh = config_data(config_path, overrides).get("mesh", {})
    sizes = [mesh.get(axis, default) for axis, default in (("data", 1), ("fsdp", -1), ("tensor", 1))]
    count = math.prod(s for s in sizes if s != -1) * (8 if -1 in sizes else 1)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def main(argv: list[str] | None = None) -> int:
    from mathgrpo.utils import host_memory

    host_memory.keep_freed_host_memory()  # before JAX starts its threads (XLA:CPU only)
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from mathgrpo.weights import orbax

        if args.direction == "hf-to-orbax":
            config = orbax.hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype)
        else:
            config = orbax.orbax_to_hf(args.ckpt, args.out, dtype=args.dtype,
                                            max_shard_bytes=args.max_shard_size)
        print(f"wrote {args.out} ({config.num_hidden_layers} layers, hidden {config.hidden_size})")
        return 0
    if args.command == "generate":
        from mathgrpo.tools import generate

        return generate.main(args)
    if args.command == "eval":
        from mathgrpo.eval import validate

        return validate.main(args)
    if args.command == "train":
        from mathgrpo.train import loop

        return loop.main(args)
    if args.command == "sft":
        from mathgrpo.train import sft

        return sft.main(args)
    if args.command == "plan":
        _fake_devices_for(args.config, args.overrides)
        import json
        import os
        from pathlib import Path

        gpu_spec = None
        if args.gpu_spec:
            gpu_spec = Path(args.gpu_spec).read_text()
            # Before JAX starts its backends: on a machine without a GPU the CUDA plugin's start-up
            # version check fails (no device to ask) and JAX drops the plugin, its topologies
            # included; a compile for described GPUs needs no device.
            os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

        from mathgrpo.config import load_config
        from mathgrpo.tools import plan

        config = load_config(args.config, args.overrides)
        devices = plan.plan_devices(config.mesh, described=args.described_devices, gpu_spec=gpu_spec)
        report = plan.plan(plan.inputs_from_config(config, naive=args.naive, platform=devices[0].platform), devices)
        print(plan.format_report(report))
        print(json.dumps(report))
        return 0
    if args.command == "parity":
        from mathgrpo.tools import parity

        return parity.main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
