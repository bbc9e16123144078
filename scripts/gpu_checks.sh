#!/usr/bin/env bash
# The checks only a GPU can make (about 6 minutes on one H100 for all of them):
#   tests  cuDNN attention (mask and packed varlen paths, with gradients) and the HF parity tests on the GPU;
#   plans  `plan` for the 4B recipe compiled by XLA:GPU for 8 described GPUs (fsdp8 and fsdp4×tp2, at
#          16,384 and 32,768 tokens per micro-batch): the GPU compiler's memory analysis, not XLA:CPU's;
#   mfu    the train step's MFU on the 4B shapes with fewer layers, cuDNN attention (bench_mfu.py),
#          remat full (the recipe) and save_dots, and a 2-layer run (the fixed cost: LM head, embedding, AdamW);
#   decode the JAX sampler (continuous batching) at the 4B shapes, all 36 layers in bf16, 64 rows of
#          1,024 + 1,024 tokens, against the HBM roofline (bench_decode.py).
# Usage: OUT=dir bash scripts/gpu_checks.sh [tests] [plans] [mfu] [decode]   (default: all; results in $OUT)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda,cpu TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
[ -d .gpu_site ] && export PYTHONPATH=$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}  # pure-Python deps carried in
SECTIONS=${*:-tests plans mfu decode}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax, optax, orbax.checkpoint, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())"

mfu() {  # name, then bench arguments
  local name=$1; shift
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 200 $PY -m benchmarks --mfu --out "$OUT/mfu_$name.json" "$@" 2>&1 \
    | grep -v '^{' | tail -8
}
if want mfu; then
  echo "== MFU (train step, 4B shapes; remat full = the recipe) =="
  mfu full_12l --mfu-layers 12 --mfu-remat full
  mfu full_2l --mfu-layers 2 --mfu-remat full
fi

if want plans; then
  echo "== plans (compile only, XLA:GPU, 8 described GPUs; in the background) =="
  for mesh in fsdp8 fsdp4_tp2; do
    for tokens in 16384 32768; do
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 $PY -m mathgrpo plan --config configs/qwen3_4b_base_grpo.yaml \
        mesh=configs/mesh/$mesh.yaml grpo.micro_batch_tokens=$tokens > "$OUT/plan_${mesh}_${tokens}.txt" 2>&1 &
    done
  done
fi
if want tests; then
  echo "== tests on the GPU (in the background) =="
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 250 $PY -m pytest -q -p no:cacheprovider \
    tests/test_layers.py tests/test_hf_parity.py > "$OUT/tests.txt" 2>&1 &
fi
wait
want tests && tail -15 "$OUT/tests.txt"
if want plans; then
  for f in "$OUT"/plan_*.txt; do echo "-- $f"; grep -v '^{' "$f" | grep -v '^W1' | tail -9; done
fi
if want mfu; then
  echo "== MFU with remat save_dots =="
  mfu save_dots_12l --mfu-layers 12 --mfu-remat save_dots
fi
if want decode; then
  echo "== decode (JAX sampler, 4B shapes) vs the HBM roofline =="
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 240 $PY -m benchmarks --decode --out "$OUT/decode.json" 2>&1 \
    | grep -v '^{' | tail -4
fi
