#!/usr/bin/env bash
# The prepared GPU check: one command on a fresh GPU machine (PyTorch there, DALI perhaps not, no package
# registry perhaps), within about 10 minutes. It makes DALI importable, makes a small corpus, runs the GPU
# tests and the benchmarks (step, loader, e2e, memory), and writes every log and JSON under one folder,
# ending with a summary (also summary.txt). bench/RESULTS.md ("GPU: the prepared device check") says how
# to read it. The package is used from this tree without installing it (a link on PYTHONPATH).
#
#   bash bench/gpu-check.sh [options]            or   make gpu-check ARGS="[options]"
#
#   --out DIR           results folder (default: $OUT when set, else bench/out/gpu-check-TIME)
#   --dali-bundle PATH  DALI from a bundle made by ../shared/tools/dali-device-bundle.sh: its folder of
#                       part-* files, the parts already joined into one .txz, or the unpacked folder
#   --dali-wheels DIR   DALI from a folder of wheels (installed offline into a scratch folder)
#                       (neither given and DALI missing: pip install nvidia-dali-cuda120/130, per driver)
#   --corpus DIR        a shard set to benchmark instead of making one (effnetv2 bench corpus --n 400)
#   --budget SECONDS    wall-clock budget of all phases (default 560); a phase that no longer fits is skipped
#   --only PHASES       run only these (comma-separated: corpus, pytest-gpu, pytest-cpu, step, loader, e2e,
#                       memory, step-compiled), e.g. a second call for what the first one skipped
#   --python PY         interpreter (default: .venv/bin/python if present, else python3)
#   --cpu-smoke         the same phases on the CPU at toy sizes: tests this script without a GPU
#   --dry-run           print what would run, run nothing
#   --no-pack           keep the files loose (default when the folder is $OUT: pack them into
#                       gpu-check.tar.gz beside summary.txt; the device tool brings back at most 8 files)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
DALI_VERSION=${DALI_VERSION:-2.4.0}
out="" bundle="" wheels="" corpus="" budget=560 py="" smoke=0 dry=0 pack=auto only=""

need() { [ "$2" -ge 2 ] || { echo "gpu-check: $1 needs a value (see --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) need "$1" $#; out=$2; shift 2 ;;
    --dali-bundle) need "$1" $#; bundle=$2; shift 2 ;;
    --dali-wheels) need "$1" $#; wheels=$2; shift 2 ;;
    --corpus) need "$1" $#; corpus=$2; shift 2 ;;
    --budget) need "$1" $#; budget=$2; shift 2 ;;
    --only) need "$1" $#; only=$2; shift 2 ;;
    --python) need "$1" $#; py=$2; shift 2 ;;
    --cpu-smoke) smoke=1; shift ;;
    --dry-run) dry=1; shift ;;
    --no-pack) pack=0; shift ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $budget =~ ^[0-9]+$ ]] || { echo "gpu-check: --budget takes seconds, got '$budget'" >&2; exit 2; }
for f in "$bundle" "$wheels" "$corpus"; do
  [ -z "$f" ] || [ -e "$f" ] || { echo "gpu-check: $f does not exist" >&2; exit 2; }
done
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
command -v "$py" >/dev/null || { echo "gpu-check: no interpreter '$py' (--python)" >&2; exit 2; }

# -- where things go -----------------------------------------------------------------------------
[ -n "$out" ] || out=${OUT:-bench/out/gpu-check-$(date +%Y%m%d-%H%M%S)}
if [ "$pack" = auto ]; then
  pack=0
  if [ -n "${OUT:-}" ] && [ "$(realpath -m "$out")" = "$(realpath -m "$OUT")" ]; then pack=1; fi
fi
scratch=/tmp/effnetv2-gpu-check  # corpus and unpacked DALI: reused by a second run on the same machine
pkg=$(mktemp -d /tmp/effnetv2-pkg.XXXXXX)
trap 'rm -rf "$pkg"' EXIT
if [ "$dry" = 1 ]; then
  work=$pkg/dry-run  # nothing written anywhere else
elif [ "$pack" = 1 ]; then
  work=$(mktemp -d /tmp/effnetv2-gpu-check-out.XXXXXX)
else
  work=$out
fi
mkdir -p "$work" "$scratch"
[ "$dry" = 1 ] || mkdir -p "$out"
summary=$work/summary.txt
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

# the package from this tree, whatever else the interpreter has installed
ln -s "$ROOT" "$pkg/effnetv2"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
eff=("$py" -m effnetv2.recipes.cli.main)
cores=$(nproc)

# -- phases: each one a log file and a line of the summary ----------------------------------------
failed=0
phase() {  # phase NAME CAP_SECONDS COMMAND...: run it within min(cap, what the budget has left)
  local name=$1 cap=$2 left limit t0 rc dt status
  shift 2
  # --only: the corpus is made whenever it is missing (this runs only then), whatever the list says
  if [ -n "$only" ] && [ "$name" != corpus ] && [[ ",$only," != *",$name,"* ]]; then return 0; fi
  left=$((START + budget - $(date +%s)))
  limit=$((cap < left - 5 ? cap : left - 5))
  if [ "$dry" = 1 ]; then printf '[dry-run] %-13s <=%4ss  %s\n' "$name" "$cap" "$*"; return 0; fi
  if [ "$limit" -lt 20 ]; then
    say "$(printf '%-14s %-28s' "$name" "skipped: ${left}s of budget left")"; failed=1; return 1
  fi
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124|137) status="timed out at ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || failed=1
  say "$(printf '%-14s %-28s %4ss  %s' "$name" "$status" "$dt" "$name.log")"
  return "$rc"
}

dali_version() { "$py" -c "import nvidia.dali as d; print(d.__version__)" 2>/dev/null; }

install_dali() {  # makes nvidia.dali importable; exports PYTHONPATH for an unpacked folder
  local site=$scratch/dali-site v
  if v=$(dali_version); then echo "DALI $v already importable"; return 0; fi
  if [ -n "$bundle" ]; then
    if [ -d "$bundle/nvidia/dali" ]; then
      site=$(realpath "$bundle")
    else
      local txz=$bundle
      if [ -d "$bundle" ]; then
        compgen -G "$bundle/part-*" >/dev/null || { echo "no part-* files in $bundle"; return 1; }
        txz=$scratch/dali-bundle.txz
        cat "$bundle"/part-* >"$txz" || return 1  # the glob sorts part-00, part-01, ... in order
      fi
      rm -rf "$site" && mkdir -p "$site"
      echo "unpacking $txz into $site"
      "$py" - "$txz" "$site" <<'EOF' || return 1
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as tf:
    tf.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
EOF
    fi
  elif [ -n "$wheels" ]; then
    compgen -G "$wheels/*.whl" >/dev/null || { echo "no wheels in $wheels"; return 1; }
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl || return 1
  else
    local cuda name
    cuda=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9]*' | grep -o '[0-9]*$')
    if [ "${cuda:-12}" -ge 13 ]; then name=nvidia-dali-cuda130; else name=nvidia-dali-cuda120; fi
    echo "pip install $name==$DALI_VERSION (driver's CUDA: ${cuda:-unknown})"
    if ! timeout 300 "$py" -m pip install -q --retries 0 --timeout 20 "$name==$DALI_VERSION"; then
      echo "pip could not install $name (no registry here?). Bring DALI along: where pip works, run"
      echo "  bash ../shared/tools/dali-device-bundle.sh   (makes .dali/part-*), carry .dali, and pass"
      echo "  --dali-bundle .dali (or a folder of wheels with --dali-wheels)"
      return 1
    fi
    site=""
  fi
  [ -z "$site" ] || export PYTHONPATH="$site:$PYTHONPATH"
  v=$(dali_version) || { echo "nvidia.dali still does not import:"; "$py" -c "import nvidia.dali"; return 1; }
  echo "DALI $v importable${site:+ from $site}"
  # the unpacked folder comes first on PYTHONPATH: torch must still find its own CUDA libraries
  "$py" -c "import torch, nvidia.dali; assert torch.cuda.is_available(), 'torch lost the GPU beside DALI'"
}

# -- the run --------------------------------------------------------------------------------------
mode=$([ "$smoke" = 1 ] && echo "CPU smoke test (toy sizes)" || echo "GPU")
say "effnetv2 gpu-check: $mode; budget ${budget}s; results in $out$([ "$pack" = 1 ] && echo " (packed)")"
if [ "$smoke" = 0 ] && [ "$dry" = 0 ]; then
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    say "no CUDA GPU visible to $py: nothing to check (--cpu-smoke runs the same phases on the CPU)"; exit 1; }
fi

if [ "$dry" = 0 ]; then
  {
    date -u; echo "interpreter: $py"; echo "tree: $ROOT"
    git -C "$ROOT" rev-parse HEAD 2>/dev/null && git -C "$ROOT" status --short 2>/dev/null | head -40
    nvidia-smi 2>&1 || true
  } >"$work/env.log" 2>&1
  if [ "$smoke" = 1 ] && ! dali_version >/dev/null; then
    say "$(printf '%-14s %-28s' dali "skipped: not installed (CPU)")"
  else
    t0=$(date +%s)
    if install_dali >"$work/dali.log" 2>&1; then status="ok: DALI $(dali_version)"; else status="FAILED"; failed=1; fi
    say "$(printf '%-14s %-28s %4ss  %s' dali "$status" "$(($(date +%s) - t0))" dali.log)"
  fi
  "${eff[@]}" doctor >>"$work/env.log" 2>&1
  "$py" -m pip list 2>/dev/null | grep -iE "^(torch|timm|torchvision|nvidia-dali|nvidia-nvimgcodec|numpy|opencv) " \
    >>"$work/env.log"
fi

if [ "$smoke" = 1 ]; then n=48; else n=400; fi
if [ -z "$corpus" ]; then
  corpus=$scratch/corpus-$n
  if [ ! -f "$corpus/_info.json" ]; then
    [ "$dry" = 1 ] || rm -rf "$corpus"
    phase corpus 120 "${eff[@]}" bench corpus "$corpus" --n "$n" --workers "$cores"
  fi
fi

# the GPU tests (all of them: a collection error elsewhere must not hide them), then the CPU-side checks
# of the same path (DDP's sampled iterations on this torch, streams, pinning, threads)
pytest=("$py" -m pytest -q -rA -p no:cacheprovider)
phase pytest-gpu 300 "${pytest[@]}" -m gpu tests --continue-on-collection-errors --junitxml="$work/pytest-gpu.xml"
phase pytest-cpu 120 "${pytest[@]}" tests/test_gpu_path.py --junitxml="$work/pytest-cpu.xml"

bench=("${eff[@]}" bench)
if [ "$smoke" = 1 ]; then
  tiny=(--warmup 1 --reps 1 --per-rep 1)
  phase step 240 "${bench[@]}" step --device cpu --models efficientnetv2-b0 --sizes 64 --batch-size 4 \
    --modes eager --dtypes fp32 "${tiny[@]}" --out "$work"
  phase loader 240 "${bench[@]}" loader "$corpus" --only "ours opencv" --points 64@5 --batch-size 8 --workers 1 \
    "${tiny[@]}" --out "$work"
  phase e2e 240 "${bench[@]}" e2e "$corpus" --device cpu --model efficientnetv2-demo --plan-of efficientnetv2-s \
    --sizes 32,40 --stages 2 --batch-size 8 --mode eager --workers 1 "${tiny[@]}" --out "$work"
  phase memory 240 "${bench[@]}" memory --device cpu --cases demo:32:8 --amps fp32 --out "$work"
  [ -n "$only" ] && [[ ",$only," != *",step-compiled,"* ]] ||
    say "$(printf '%-14s %-28s' step-compiled "skipped: compiling takes minutes on a CPU")"
else
  # S and B0 at the reference conditions (batch 32, 128 px), ours vs timm, eager and CUDA graph
  phase step 180 "${bench[@]}" step --models efficientnetv2-s,efficientnetv2-b0 --modes eager,graph \
    --dtypes fp32,bf16 --out "$work"
  # DALI GPU at the S plan's four stages (and the reference points)
  phase loader 120 "${bench[@]}" loader "$corpus" --only "ours dali-gpu" --out "$work"
  # the S plan end to end: real loader vs synthetic input, stage switches (S, batch 128, bf16, graphs)
  phase e2e 200 "${bench[@]}" e2e "$corpus" --reps 5 --out "$work"
  # the memory model against the measured bytes, S at its four stage sizes
  phase memory 150 "${bench[@]}" memory --out "$work"
  # last, with what the budget has left: one compilation of S (minutes)
  phase step-compiled 300 "${bench[@]}" step --models efficientnetv2-s --modes compiled-graph --dtypes bf16 \
    --out "$work"
fi
[ "$dry" = 1 ] && exit 0

# -- summary: the statuses above, then each benchmark's table and the tests' outcome ---------------
{
  echo
  for name in pytest-gpu pytest-cpu; do
    [ -f "$work/$name.log" ] && { echo "== $name"; grep -E "^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|skipped)" \
      "$work/$name.log" | tail -n 25; }
  done
  for name in step loader e2e memory step-compiled; do
    [ -f "$work/$name.log" ] || continue
    echo "== $name"
    awk '/^point +series/ && !s { s = NR - 1 } { l[NR] = $0 } END { for (i = (s ? s : NR - 14); i <= NR; i++)
      if (i > 0 && l[i] !~ /^wrote /) print l[i] }' "$work/$name.log" | tail -n 45
  done
  echo "== total $(($(date +%s) - START))s; every log, JSON and chart: $out$([ "$pack" = 1 ] && echo /gpu-check.tar.gz)"
} | tee -a "$summary"

if [ "$pack" = 1 ]; then
  tar -czf "$out/gpu-check.tar.gz" -C "$work" . && cp "$summary" "$out/summary.txt" && rm -rf "$work"
fi
exit "$failed"
