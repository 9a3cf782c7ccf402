#!/bin/bash
# On the GPU host, from the repository root, with DIR (prepare.sh's folder) beside the checkout:
# installs the wheels into a folder on PYTHONPATH, links the checkout as the package `easyphoto`,
# smoke-tests the CUDA path on the tiny family, then runs `bench --only lora` and the harness
# (torch backend) at full SD 1.5 shapes. What it writes lands in OUT (7 files, the plots in
# OUT/images); BUDGET bounds the seconds of the whole run (the harness gets what is left).
START=$SECONDS
DIR=${DIR:-.gpu}
OUT=${OUT:-bench-gpu-out}
BUDGET=${BUDGET:-3600}
SITE=${SITE:-/tmp/easyphoto-site}
mkdir -p "$OUT" "$SITE/easyphoto"
exec > >(tee -a "$OUT/log.txt") 2>&1
left() { echo $((BUDGET - (SECONDS - START))); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "$DIR"/whl/*.whl || exit 1
cp -r "$DIR"/site/* "$SITE/"
cp "$DIR"/pb/*.py proto/easyphoto/v1/
for package in cli engines server trainer export rpc imaging users diffusion fixtures; do
  ln -sfn "$PWD/$package" "$SITE/easyphoto/$package"
done
ln -sfn "$PWD/proto/easyphoto/v1" "$SITE/easyphoto/v1"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 EASYPHOTO_CACHE=${EASYPHOTO_CACHE:-/tmp/easyphoto-cache}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, diffusers, peft, grpc; print('torch', torch.__version__,
  'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'diffusers',
  diffusers.__version__, 'peft', peft.__version__, 'grpc', grpc.__version__)" || exit 1
(while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$SITE/gpu-memory.txt"; sleep 1; done) &
MONITOR=$!
trap 'kill $MONITOR 2>/dev/null' EXIT

echo "== smoke: the harness in miniature on the tiny family ($(left) s left)"
timeout 180 python3 -c "
from pathlib import Path
from easyphoto.cli.load_bench import HarnessConfig, run_harness
config = HarnessConfig(concurrency=(1, 4), users=4, first_steps=6, second_steps=6, requests_per_level=4,
    baseline_repeats=1, triton_concurrency=(), out=Path('$SITE/smoke'), doc=Path('$SITE/smoke/benchmarks.md'))
print(run_harness(config).summary())
" || { echo "SMOKE FAILED"; cp "$SITE/smoke/serve-torch.log" "$OUT/" 2>/dev/null; exit 1; }

cp docs/benchmarks.md "$OUT/benchmarks.md"
echo "== bench --only lora, sd15-random ($(left) s left)"
timeout 240 python3 -m easyphoto.cli.main bench --only lora --models sd15-random --out "$OUT/benchmarks.md" \
  || echo "LORA BENCH FAILED"
echo "== harness, sd15-random ($(left) s left)"
timeout "$(left)" python3 -m easyphoto.cli.main bench --only harness --no-triton --out "$OUT/benchmarks.md" \
  --harness-out "$SITE/bench-out" || echo "HARNESS FAILED OR TIMED OUT"
for name in summary.json results.csv; do cp "$SITE/bench-out/$name" "$OUT/" 2>/dev/null; done
tail -300 "$SITE/bench-out/serve-torch.log" > "$OUT/serve-torch.log" 2>/dev/null
echo "peak GPU memory used: $(sort -n "$SITE/gpu-memory.txt" | tail -1) MiB"
echo "== done in $((SECONDS - START)) s"
