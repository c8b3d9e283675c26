#!/usr/bin/env bash
# One command for a machine with one CUDA GPU, Python with torch and transformers, and no
# network (issue #21):
#
#   bash scripts/gpu_check.sh --prepare DIR   # on a networked machine: the wheels, into DIR
#   bash scripts/gpu_check.sh --install DIR   # on the GPU machine: install only (a part)
#   bash scripts/gpu_check.sh [DIR]           # on the GPU machine: install, then run
#                                             # (default DIR: .gpu-wheels)
#
# --prepare downloads, for the GPU machine's Python (GPU_PY, default 3.12) and platform, the
# distributions evomerge's GPU path imports (measured by scripts/gpu_check.py deps) less the
# ones the GPU image already has (GPU_HAS), without their dependencies, plus a wheel of
# evomerge itself, pinned to the versions installed here. The wheels are split into parts
# DIR/1, DIR/2... of at most PART_MIB (default 60) each: a device tool that carries 64 MiB per
# call takes one part per call (--install), the last call runs the checks.
# The default mode installs them offline (pip --no-index --no-deps)
# into .gpu-site (a folder beside the code, kept between calls on a warm machine) and runs
# scripts/gpu_check.py: merges on cuda vs cpu, the hf search on the zoo with the same
# trials on both, one in-place candidate of a ~1.1B model; the table goes to results/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_PY=${GPU_PY:-3.12}
# what the GPU image ships (FACTS.md, "The GPU machine"): never downloaded
GPU_HAS=${GPU_HAS:-"torch transformers tokenizers safetensors huggingface-hub peft accelerate
pandas numpy pyyaml packaging tqdm filelock fsspec jinja2 markupsafe requests urllib3 idna
certifi charset-normalizer typing-extensions python-dateutil pytz tzdata six regex psutil
sympy networkx mpmath hf-xet triton nvidia-.* setuptools pydantic pydantic-core
annotated-types typing-inspection anyio httpx httpcore h11 sniffio click shellingham rich
typer typer-slim markdown-it-py mdurl pygments"}
# imported only because they are installed here (datasets patches whatever is loaded): optional
GPU_SKIP=${GPU_SKIP:-"scipy threadpoolctl setuptools"}

prepare() {
    local dir=$1
    mkdir -p "$dir"
    local py=${PYTHON:-python}
    local keep=()
    while read -r dist; do
        local skip=0
        for has in $GPU_HAS $GPU_SKIP; do
            if [[ ${dist%%==*} =~ ^${has}$ ]]; then skip=1; break; fi
        done
        [[ $skip == 1 ]] || keep+=("$dist")
    done < <("$py" scripts/gpu_check.py deps 2>/dev/null | tr '_A-Z' '-a-z')
    echo "downloading for python $GPU_PY: ${keep[*]}" >&2
    "$py" -m pip download --quiet --no-deps --dest "$dir" --only-binary=:all: \
        --python-version "$GPU_PY" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 "${keep[@]}"
    "$py" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$dir" .
    split_parts "$dir" "${PART_MIB:-60}"
    du -sh "$dir"/* >&2
}

split_parts() {  # largest first into the first part with room (first-fit decreasing)
    local dir=$1 limit=$(( $2 * 1024 * 1024 ))
    local sizes=()
    while read -r size whl; do
        local k=1
        while (( ${sizes[$k]:-0} + size > limit )); do k=$((k + 1)); done
        if (( size > limit )); then echo "$whl alone exceeds $2 MiB" >&2; exit 1; fi
        sizes[$k]=$(( ${sizes[$k]:-0} + size ))
        mkdir -p "$dir/$k"
        mv "$dir/$whl" "$dir/$k/"
    done < <(cd "$dir" && find . -maxdepth 1 -name '*.whl' -printf '%s %f\n' | sort -rn)
}

install() {
    local dir=$1
    local py=${PYTHON:-python3}
    local wheels=()
    mapfile -t wheels < <(find "$dir" -name '*.whl' 2>/dev/null)
    (( ${#wheels[@]} )) || return 0
    "$py" -m pip install --quiet --no-index --no-deps --upgrade --target .gpu-site "${wheels[@]}"
}

check() {
    local py=${PYTHON:-python3}
    mkdir -p results/gpu
    PYTHONPATH="$PWD:$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
        HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
        timeout 480 "$py" scripts/gpu_check.py run results/gpu
}

case ${1:-} in
    --prepare) prepare "${2:?usage: gpu_check.sh --prepare DIR}" ;;
    --install) install "${2:?usage: gpu_check.sh --install DIR}" ;;
    *) install "${1:-.gpu-wheels}"; check ;;
esac
