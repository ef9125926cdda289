#!/usr/bin/env bash
# Benchmark 4 (issue 13, target 5): every GPU figure in one prepared run on a lent GPU, well under 10 minutes.
#
#   bash benchmarks/gpu.sh                     # from the repository root, on the lent machine; results in $OUT
#   SONOCL_GPU_DRY=1 bash benchmarks/gpu.sh    # the same steps on the CPU at a tiny size: checks the script only
#
# At 224 px, bf16, channels_last (the training loop's CUDA layout; the model benchmarks use it too) it measures
#   1. pairs/s of the data path: sonocl's gather + on-device augmentation vs the naive reference-style pipeline
#      (benchmarks/pair_throughput.py --device cuda);
#   2. end-to-end USCL step rate vs model-only step rate (benchmarks/e2e_step_rate.py, the real loop);
#   3. the Meta-USCL step cost against a USCL step, every step and with --meta-every 5 (benchmarks/meta_step_cost.py);
#   4. `sonocl pretrain --compile` on and off: the same short USCL run, steady step rate and the first step's time
#      (which holds the compilation), from each run's metrics.csv.
#   5. (issue 26) reads against what a step consumes: the same run from a PNG-compressed copy of the store (frames
#      decoded in the loader workers) against the raw store, and `FrameStore.gather`'s frames/s for raw, PNG and zlib
#      with 1 and 4 reading threads on this machine's CPUs (benchmarks/store_codecs.py --threads 1 4).
# It writes ONE JSON, $OUT/gpu.json (environment, each step's figures, exit status and seconds), and $OUT/gpu.log.
#
# The machine may be fresh and offline: sonocl is installed from this checkout without dependencies and without
# an index (else put on PYTHONPATH), the environment check prints what is importable, and a step that fails is
# recorded with its exit status and the run goes on. Every step has a time cap inside one overall budget.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/out/gpu}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

if [[ -x $ROOT/.venv/bin/python ]]; then PY=${PYTHON:-$ROOT/.venv/bin/python}; else PY=${PYTHON:-python3}; fi
if [[ ${SONOCL_GPU_DRY:-0} == 1 ]]; then
    MODE=dry DEVICE=cpu SIZE=32 PRECISION=bf16 WORKERS=1 BUDGET=900 COMPILE_CAP=480  # inductor compiles slowly on a CPU
    PAIR_ROUNDS=1 E2E_ROUNDS=1 E2E_STEPS=4 META_REPEATS=1 COMPILE_STEPS=8 STORE_VIDEOS=8 STORE_FRAMES=8
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a shared CPU
else
    MODE=gpu DEVICE=cuda SIZE=224 PRECISION=bf16 WORKERS=8 BUDGET=500 COMPILE_CAP=200
    PAIR_ROUNDS=3 E2E_ROUNDS=2 E2E_STEPS=12 META_REPEATS=5 COMPILE_STEPS=60 STORE_VIDEOS=32 STORE_FRAMES=24
fi
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/sonocl_gpu.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
STEPS_TSV=$OUT/steps.tsv
printf 'step\trc\tseconds\n' >"$STEPS_TSV"
START=$SECONDS
echo "== sonocl benchmarks/gpu.sh, mode $MODE, device $DEVICE, $SIZE px, $PRECISION, budget ${BUDGET}s, $(date -u +%FT%TZ)"

# step NAME CAP COMMAND...: run COMMAND with at most CAP seconds (less when the overall budget is nearly spent).
step() {
    local name=$1 cap=$2 left started rc
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    ((cap > left)) && cap=$left
    if ((cap < 10)); then
        echo "== $name: skipped, the ${BUDGET}s budget is spent"
        printf '%s\t%s\t%s\n' "$name" skipped 0 >>"$STEPS_TSV"
        return
    fi
    echo "== $name (at most ${cap}s): $*"
    started=$SECONDS
    timeout --kill-after=10 "$cap" "$@"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >>"$STEPS_TSV"
    echo "== $name: exit $rc after $((SECONDS - started))s"
}

# ---------------------------------------------------------------------------------------------- environment
if ! "$PY" -c "import sonocl" 2>/dev/null; then
    echo "== installing sonocl from $ROOT (no dependencies, no index)"
    if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index -e "$ROOT"; then
        echo "== pip could not install it; using PYTHONPATH=$ROOT/src"
        export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv
step environment 60 "$PY" - "$OUT/environment.json" "$DEVICE" <<'EOF'
import importlib, json, os, platform, sys
out, device = sys.argv[1], sys.argv[2]
report = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
          "cpu_count": os.cpu_count(), "modules": {}, "missing": []}
for name in ("torch", "torchvision", "numpy", "scipy", "PIL", "safetensors", "yaml", "tqdm", "sklearn", "av",
             "pydicom", "matplotlib", "tensorboard", "pyarrow", "sonocl"):
    try:
        module = importlib.import_module(name)
        report["modules"][name] = getattr(module, "__version__", "?")
    except Exception as error:  # noqa: BLE001 - report every kind of broken import, go on
        report["missing"].append(f"{name} ({type(error).__name__}: {error})")
import torch
report["cuda_available"] = torch.cuda.is_available()
report["torch_cuda"] = torch.version.cuda
if device.startswith("cuda") and torch.cuda.is_available():
    properties = torch.cuda.get_device_properties(0)
    report.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                  capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                  bf16_supported=torch.cuda.is_bf16_supported(), device_count=torch.cuda.device_count())
print(json.dumps(report, indent=1))
open(out, "w").write(json.dumps(report) + "\n")
sys.exit(1 if device.startswith("cuda") and not torch.cuda.is_available() else 0)
EOF

# ----------------------------------------------------------------------------------------------- benchmarks
# pair_throughput.py writes a fixed benchmarks/out/ file: its run() is called so that the report lands in $OUT
step pair_throughput 100 "$PY" -c "import json, os, sys; sys.path.insert(0, 'benchmarks'); import torch; \
from pair_throughput import run; from sonocl.runtime import keep_freed_memory; keep_freed_memory(); \
report = run(None, int(sys.argv[1]), [int(sys.argv[2])], os.cpu_count() or 1, torch.device(sys.argv[3])); \
open(sys.argv[4], 'w').write(json.dumps(report, indent=2) + '\n')" "$PAIR_ROUNDS" "$SIZE" "$DEVICE" "$OUT/pair_throughput.json"

step e2e_step_rate 150 "$PY" benchmarks/e2e_step_rate.py --device "$DEVICE" --precision "$PRECISION" --size "$SIZE" \
    --rounds "$E2E_ROUNDS" --steps "$E2E_STEPS" --workers "$WORKERS" --out "$OUT/e2e_step_rate.json"

step meta_step_cost 100 "$PY" benchmarks/meta_step_cost.py --device "$DEVICE" --precision "$PRECISION" --sizes "$SIZE" \
    --batch 32 --repeats "$META_REPEATS" --out "$OUT/meta_step_cost.json"

step phantom_store 60 "$PY" -c "import sys; from sonocl.data.phantom import build_phantom_store as b; \
b(sys.argv[1], num_videos=int(sys.argv[2]), frames_per_video=int(sys.argv[3]), size=256)" \
    "$SCRATCH/store" "$STORE_VIDEOS" "$STORE_FRAMES"
step png_store 60 "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from store_codecs import compressed_copy; \
from sonocl.data.store import FrameStore; from pathlib import Path; \
compressed_copy(FrameStore.open(sys.argv[1]), 'png', Path(sys.argv[2]))" "$SCRATCH/store" "$SCRATCH/store_png"
step pretrain_png 100 "$PY" -m sonocl pretrain --store "$SCRATCH/store_png" --method uscl --items frames \
    --steps "$COMPILE_STEPS" --batch-size 32 --size "$SIZE" --precision "$PRECISION" --device "$DEVICE" \
    --workers "$WORKERS" --no-progress --out "$SCRATCH/png"
step store_reads 90 "$PY" benchmarks/store_codecs.py "$SCRATCH/store" --frames 200 --rounds 2 --threads 1 4
cp benchmarks/out/store_codecs.json "$OUT/store_codecs.json" 2>/dev/null
for compiled in off on; do
    step "pretrain_compile_$compiled" $([[ $compiled == on ]] && echo "$COMPILE_CAP" || echo 100) \
        "$PY" -m sonocl pretrain --store "$SCRATCH/store" --method uscl --items frames --steps "$COMPILE_STEPS" \
        --batch-size 32 --size "$SIZE" --precision "$PRECISION" --device "$DEVICE" --workers "$WORKERS" --no-progress \
        --out "$SCRATCH/compile_$compiled" $([[ $compiled == on ]] && echo --compile)
done

# ------------------------------------------------------------------------------------------------ one JSON
"$PY" - "$OUT" "$SCRATCH" "$MODE" "$SIZE" "$PRECISION" "$((SECONDS - START))" <<'EOF'
import csv, datetime, json, statistics, sys
from pathlib import Path
out, scratch, mode, size, precision, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])

def read(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None

def pretrain_run(folder, warmup=5):
    """Steady images/s (median over the steps after ``warmup``), the first step's seconds and the run's settings."""
    metrics = folder / "metrics.csv"
    if not metrics.exists():
        return None
    steps = [row for row in csv.DictReader(metrics.open()) if row["kind"] == "step"]
    rates = [float(row["images_per_s"]) for row in steps[warmup:]]
    config = (folder / "config.yaml").read_text() if (folder / "config.yaml").exists() else ""
    keep = ("precision:", "channels_last:", "compile:", "device:", "size:", "batch_size:")
    return {"steps": len(steps), "steady_images_per_s": statistics.median(rates) if rates else None,
            "first_step_seconds": float(steps[0]["seconds"]) if steps else None,
            "wall_seconds": float(steps[-1]["seconds"]) if steps else None,
            "config": sorted({line.strip() for line in config.splitlines() if line.strip().startswith(keep)})}

steps = list(csv.DictReader((out / "steps.tsv").open(), delimiter="\t"))
off, on = pretrain_run(scratch / "compile_off"), pretrain_run(scratch / "compile_on")
png = pretrain_run(scratch / "png")
png_ratio = (png["steady_images_per_s"] / off["steady_images_per_s"]
             if png and off and png["steady_images_per_s"] and off["steady_images_per_s"] else None)
reads = read("store_codecs.json")
compile_ratio = (on["steady_images_per_s"] / off["steady_images_per_s"]
                 if on and off and on["steady_images_per_s"] and off["steady_images_per_s"] else None)
pair, e2e, meta = read("pair_throughput.json"), read("e2e_step_rate.json"), read("meta_step_cost.json")
meta_result = meta["results"][0] if meta and meta.get("results") else {}
report = {
    "benchmark": "gpu", "mode": mode, "date": datetime.date.today().isoformat(), "size": size, "precision": precision,
    "memory_format": "channels_last (pretrain: the loop's CUDA default, model.channels_last null)",
    "script_seconds": seconds,
    "environment": read("environment.json"), "steps": steps,
    "summary": {
        "pairs_per_s": pair["results"][0]["sonocl_pairs_per_s"] if pair else None,
        "pairs_ratio_vs_naive": pair["results"][0]["ratio"] if pair else None,
        "e2e_over_model_only": e2e["ratio"] if e2e else None,
        "e2e_images_per_s": e2e["end_to_end_images_per_s"] if e2e else None,
        "meta_over_uscl": meta_result.get("ratio_meta_every_1"),
        "meta_every_5_over_uscl": meta_result.get("ratio_meta_every_5"),
        "compile_on_over_off_steady": compile_ratio,
        "png_store_over_raw_steady": png_ratio,
        "gather_frames_per_s": next(iter(reads["stores"].values()))["stores"] if reads else None,
    },
    "pair_throughput": pair, "e2e_step_rate": e2e, "meta_step_cost": meta,
    "compile": {"off": off, "on": on}, "png_store": png, "store_reads": reads,
}
(out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
print(json.dumps(report["summary"], indent=1))
print(f"wrote {out / 'gpu.json'}; steps: " + ", ".join(f"{s['step']} {s['rc']} ({s['seconds']} s)" for s in steps))
EOF
echo "== done in $((SECONDS - START))s"
