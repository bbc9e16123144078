"""Starts one mathgrpo process per GPU on this host (JAX multi-controller: one process per device).

    python scripts/launch.py --gpus 8 -- train --config configs/qwen3_4b_base_grpo.yaml
    # several hosts: the same command on each, with its rank and host 0's address
    python scripts/launch.py --gpus 8 --nodes 2 --node-rank 0 --coordinator host0:12355 -- train --config ...
    # the same multi-process program on CPUs (a laptop, the tests): gloo collectives
    python scripts/launch.py --cpu --processes 2 [--devices-per-process N] -- train --config CONFIG [a.b=value ...]

With --cpu each process gets JAX_PLATFORMS=cpu, N CPU devices (1 by default) and gloo as JAX's CPU
collectives, and the mesh spans every process's devices exactly as it spans GPUs.

Each process gets CUDA_VISIBLE_DEVICES=<its GPU> and MATHGRPO_COORDINATOR / _NUM_PROCESSES /
_PROCESS_ID, which `sharding.initialize_distributed` hands to `jax.distributed.initialize`. Under
SLURM (srun with one task per GPU) no launcher is needed: JAX reads SLURM's variables itself.
If any process fails, the others are stopped and the launcher exits with its code.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=None, help="processes (GPUs) on this host")
    parser.add_argument("--cpu", action="store_true", help="CPU processes instead of GPUs (gloo collectives)")
    parser.add_argument("--processes", type=int, default=None, help="with --cpu: processes on this host")
    parser.add_argument("--devices-per-process", type=int, default=1, help="with --cpu: CPU devices per process")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--coordinator", default="127.0.0.1:12355", help="host:port of process 0")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the mathgrpo command line")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the mathgrpo command after --, e.g. -- train --config CONFIG")
    if args.cpu == (args.gpus is not None) or (args.processes is not None) != args.cpu:
        parser.error("give --gpus N, or --cpu --processes N")
    if args.cpu and (args.processes < 1 or args.devices_per_process < 1):
        parser.error("--processes and --devices-per-process must be >= 1")
    local_count = args.processes if args.cpu else args.gpus
    total = local_count * args.nodes
    processes = []
    for local in range(local_count):
        rank = args.node_rank * local_count + local
        env = dict(os.environ, MATHGRPO_COORDINATOR=args.coordinator, MATHGRPO_NUM_PROCESSES=str(total),
                   MATHGRPO_PROCESS_ID=str(rank))
        if args.cpu:
            env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
        else:
            env["CUDA_VISIBLE_DEVICES"] = str(local)
        processes.append(subprocess.Popen([sys.executable, "-m", "mathgrpo", *command], env=env))
    code = 0
    try:
        while processes:
            for process in list(processes):
                result = process.poll()
                if result is None:
                    continue
                processes.remove(process)
                if result != 0:
                    code = result
                    for other in processes:
                        other.send_signal(signal.SIGTERM)
            time.sleep(1.0)
    except KeyboardInterrupt:
        for process in processes:
            process.send_signal(signal.SIGINT)
        code = 130
    return code


if __name__ == "__main__":
    sys.exit(main())
