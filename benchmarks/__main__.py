"""`python -m benchmarks [--quick | --tiny | --mfu | --decode] [--out bench.json]` (see bench.py)."""

from __future__ import annotations

import argparse
import sys

from benchmarks import bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="throughput of train step, log-probs, sampler, reward vs torch/HF/vLLM, in one run")
    bench.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mathgrpo.utils import host_memory

    host_memory.keep_freed_host_memory()  # before JAX starts its threads (XLA:CPU only)
    return bench.main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
