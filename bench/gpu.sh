#!/usr/bin/env bash
# Every CUDA path of labelkit and its GPU figures, in one go, on a machine with an NVIDIA GPU.
#
#   bench/gpu.sh OUTDIR [STEP ...]        STEP: tests, label-step, throughput (default: all three, in that order)
#   bench/gpu.sh OUTDIR --smoke           the same at toy sizes, on the CPU too: proves the script, not the figures
#
# Writes OUTDIR/gpu.json (every figure, and each step's exit code and time, merged again after every step so a
# kill leaves what finished), OUTDIR/gpu.md (the same as README-ready tables), OUTDIR/gpu.log and
# OUTDIR/junit.xml, replacing an earlier run's. Each step runs under its own timeout, so a
# hang in one still reports the others; a rerun can name only the steps that failed. Expect about 5 minutes on
# one H100/H200 (timeouts add up to 9).
#
# It installs nothing it does not need: labelkit itself (editable, from this tree, without dependencies) when
# `import labelkit.cli` fails, and each missing dependency from wheels in $LABELKIT_WHEELS (default .whl/, made
# by `make gpu-wheels` where pip can reach a registry) into a private folder on PYTHONPATH.
# PYTHON picks the interpreter (default python3); TIMEOUT_TESTS, TIMEOUT_LABEL_STEP and TIMEOUT_THROUGHPUT
# change the steps' limits (200, 150 and 130 s).
set -uo pipefail

OUT=${1:?usage: bench/gpu.sh OUTDIR [tests] [label-step] [throughput] [--smoke]}
shift
SMOKE=""
STEPS=()
for arg in "$@"; do
    case $arg in
        --smoke) SMOKE=--smoke ;;
        tests|label-step|throughput) STEPS+=("$arg") ;;
        *) echo "bench/gpu.sh: unknown step $arg (tests, label-step, throughput, --smoke)" >&2; exit 2 ;;
    esac
done
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests label-step throughput)

cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
PARTS=$(mktemp -d "${TMPDIR:-/tmp}/labelkit-gpu-XXXXXX")
PY=${PYTHON:-python3}
WHEELS=${LABELKIT_WHEELS:-.whl}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
rm -f "$OUT/gpu.json" "$OUT/gpu.md" "$OUT/junit.xml"  # OUTDIR holds this run's results only
exec > >(tee "$OUT/gpu.log") 2>&1
echo "== bench/gpu.sh $(date -u +%FT%TZ) steps: ${STEPS[*]} ${SMOKE}"

collect() {
    "$PY" bench/gpu_collect.py "$PARTS" "$PARTS"/env.json "$PARTS"/label-step.json "$PARTS"/throughput.json \
        --junit "$OUT/junit.xml" --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" >/dev/null || echo "== collect failed"
}

record() {  # record NAME EXIT START_NS: a row of steps.tsv
    local ms=$(( ($(date +%s%N) - $3) / 1000000 ))
    printf '%s\t%s\t%d.%03d\n' "$1" "$2" $((ms / 1000)) $((ms % 1000)) >>"$PARTS/steps.tsv"
}

step() {  # step NAME SECONDS COMMAND...: run under a timeout, record exit code and time, merge the figures
    local name=$1 limit=$2 start code
    shift 2
    echo "== $name (at most ${limit} s)"
    start=$(date +%s%N)
    timeout --kill-after=15 "$limit" "$@"
    code=$?
    record "$name" "$code" "$start"
    [ "$code" -eq 0 ] && echo "== $name: ok" || echo "== $name: FAILED (exit $code$( [ "$code" -ge 124 ] && echo ', timed out?'))"
    collect
}

setup() {
    local site="${TMPDIR:-/tmp}/labelkit-site" missing dist
    # importable module -> wheel name: labelkit's dependencies a CUDA image may lack
    missing=$("$PY" - <<'EOF'
import importlib.util
need = {"webdataset": "webdataset", "braceexpand": "braceexpand", "jsonschema": "jsonschema",
        "referencing": "referencing", "jsonschema_specifications": "jsonschema_specifications", "rpds": "rpds_py",
        "timm": "timm", "pyarrow": "pyarrow", "click": "click", "safetensors": "safetensors", "tqdm": "tqdm",
        "sklearn": "scikit_learn", "scipy": "scipy", "matplotlib": "matplotlib", "fsspec": "fsspec", "yaml": "PyYAML",
        "PIL": "pillow", "pytest": "pytest"}
print(" ".join(wheel for module, wheel in need.items() if importlib.util.find_spec(module) is None))
EOF
)
    # the SPDX licence field of pyproject.toml needs setuptools >= 77 to install labelkit
    if ! "$PY" -c "import labelkit.cli" 2>/dev/null && ! "$PY" -c \
            "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
        missing="$missing setuptools"
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    for dist in $missing; do  # pip picks the wheel that fits this Python from $WHEELS
        echo "installing $dist from $WHEELS/"
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "$dist" || echo "!! no wheel of $dist for this Python in $WHEELS/ (make gpu-wheels)"
    done
    if ! "$PY" -c "import labelkit.cli" 2>/dev/null; then
        echo "installing labelkit from this tree (editable, no dependencies)"
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
    fi
    "$PY" bench/gpu.py env --json "$PARTS/env.json"
}

echo "== setup"
start=$(date +%s%N)
setup  # in this shell, not under timeout: it exports PYTHONPATH, and installs from local files only
code=$?
record setup "$code" "$start"
collect
if [ "$code" -ne 0 ]; then
    echo "== setup failed (exit $code): see above"
    exit 1
fi

for name in "${STEPS[@]}"; do
    case $name in
        tests)
            # -o addopts= drops the default "-m 'not slow'"; tests/test_gpu.py holds every CUDA test
            step tests "${TIMEOUT_TESTS:-200}" "$PY" -m pytest -o addopts= -m gpu tests/test_gpu.py -p no:cacheprovider -q -rA \
                --junitxml="$OUT/junit.xml" ;;
        label-step)
            step label-step "${TIMEOUT_LABEL_STEP:-150}" "$PY" bench/gpu.py label-step $SMOKE --paper-seconds 40 --json "$PARTS/label-step.json" ;;
        throughput)
            step throughput "${TIMEOUT_THROUGHPUT:-130}" "$PY" bench/gpu.py throughput $SMOKE --json "$PARTS/throughput.json" ;;
    esac
done
collect
echo "== done: $OUT/gpu.json"
"$PY" - "$OUT/gpu.json" <<'EOF'
import json, sys
steps = json.load(open(sys.argv[1]))["steps"]
sys.exit(0 if all(s["exit"] == 0 for s in steps.values()) else 1)
EOF
