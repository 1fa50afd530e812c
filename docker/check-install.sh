#!/usr/bin/env bash
# Runs docker/Dockerfile's install steps in a fresh virtual environment on a machine without Docker
# (Debian, its python3), and then what the image is for: `dalishare --help`, the imports, and each
# command of docker/compose.yaml with --help. It mirrors the Dockerfile's RUN steps; the COPY lines
# are read from the Dockerfile itself, so a folder the image leaves out is missed here too.
#
#   bash docker/check-install.sh            # prints each step with its duration; exit 0 = all passed
#
# Differences from the image built with the Dockerfile's default build arguments, on purpose:
#   - python3 is this machine's (Debian 12: 3.11), as in the default BASE (debian:bookworm-slim);
#   - torch and torchvision come from the ordinary package index, pinned to torch==2.14.1 and
#     torchvision==0.29.1 (the README's pair; a CUDA 13 build), because the default TORCH_INDEX
#     (download.pytorch.org/whl/cu126) cannot be reached here;
#   - no apt-get step (the base image's python3 and python3-venv are this machine's).
# docker/check-image.sh builds the image itself (buildah, a CPU torch) and runs the demo and tests in it.
# Everything goes into a temporary folder, removed at the end (KEEP=1 keeps it).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dockerfile=$repo/docker/Dockerfile
work=$(mktemp -d "${TMPDIR:-/tmp}/dalishare-install-check.XXXXXX")
cleanup() { if [[ "${KEEP:-0}" != 1 ]]; then rm -rf "$work"; else echo "kept $work"; fi; }
trap cleanup EXIT

export PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1   # the Dockerfile's ENV
export DALISHARE_RUNTIME_DIR=$work/run
start_all=$EPOCHREALTIME
step() {  # step NAME COMMAND...: run it, its output to the log, and print the outcome and duration
    local name=$1 t0 rc
    shift
    t0=$EPOCHREALTIME
    echo "== $name: $*" >> "$work/log"
    if "$@" >> "$work/log" 2>&1; then rc=0; else rc=$?; fi
    printf '%-60s %s %7.1f s\n' "$name" "$([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)")" \
        "$(awk "BEGIN {print $EPOCHREALTIME - $t0}")"
    if [[ $rc != 0 ]]; then
        echo "--- last lines of its output:"
        tail -n 30 "$work/log"
        exit 1
    fi
}

echo "install check of docker/Dockerfile in $work ($(python3 --version), $(uname -m))"
step "RUN python3 -m venv /opt/venv" python3 -m venv "$work/venv"
export PATH=$work/venv/bin:$PATH VIRTUAL_ENV=$work/venv
step "RUN pip install --upgrade pip" pip install --upgrade pip
step "RUN pip install \$TORCH_SPEC (here: torch==2.14.1 torchvision==0.29.1)" \
    pip install torch==2.14.1 torchvision==0.29.1

# WORKDIR /opt/dalishare, then every COPY line, as Docker does it: a folder's contents go into the
# destination folder; files go into it when it ends with / or there are several, else become it.
mkdir -p "$work/dalishare"
copy_lines=0
while read -r _ args; do
    read -ra parts <<< "$args"
    dest=$work/dalishare/${parts[-1]}
    sources=("${parts[@]:0:${#parts[@]}-1}")
    for src in "${sources[@]}"; do
        [[ -e "$repo/$src" ]] || { echo "COPY $src: not in the repository"; exit 1; }
        if [[ -d "$repo/$src" ]]; then
            mkdir -p "$dest" && cp -r "$repo/$src/." "$dest/"
        elif [[ $dest == */ || ${#sources[@]} -gt 1 ]]; then
            mkdir -p "$dest" && cp "$repo/$src" "$dest/"
        else
            mkdir -p "$(dirname "$dest")" && cp "$repo/$src" "$dest"
        fi
    done
    copy_lines=$((copy_lines + 1))
done < <(grep -E '^COPY ' "$dockerfile")
echo "COPY: $copy_lines lines; /opt/dalishare holds: $(ls "$work/dalishare" | tr '\n' ' ')"
cd "$work/dalishare"
find . -name __pycache__ -prune -exec rm -rf {} +   # a fresh copy, as the build context would be

step "RUN pip install -e '.[gpu,test]'" pip install -e '.[gpu,test]'
step "RUN dalishare --help" dalishare --help
step "RUN python -c 'import dalishare, nvidia.dali, cupy, zmq'" \
    python -c "import dalishare, nvidia.dali, cupy, zmq; assert dalishare.__file__.startswith('$work'), dalishare.__file__"
step "RUN mkdir -p /run/dalishare && chmod 0700" bash -c "mkdir -p '$DALISHARE_RUNTIME_DIR' && chmod 0700 '$DALISHARE_RUNTIME_DIR'"
step "pip check" pip check

# What docker/compose.yaml runs in the image: each service's program, with --help.
while IFS= read -r command; do
    read -ra argv <<< "$command"
    head=("${argv[@]:0:2}")   # `python examples/x.py` or `dalishare serve`
    step "compose: ${head[*]} --help" "${head[@]}" --help
done < <(python - "$repo/docker/compose.yaml" <<'EOF'
import sys, yaml
for name, service in yaml.safe_load(open(sys.argv[1]))["services"].items():
    command = service["command"]
    print(command if isinstance(command, str) else " ".join(command))
EOF
)

echo "versions: $(python -c '
import importlib.metadata as m, platform
names = ["torch", "torchvision", "nvidia-dali-cuda120", "cupy-cuda12x", "pyzmq", "lightning", "accelerate"]
print("python " + platform.python_version() + ", " + ", ".join(f"{n} {m.version(n)}" for n in names))')"
echo "venv size: $(du -sh "$work/venv" | cut -f1)"
printf 'all steps passed in %.0f s\n' "$(awk "BEGIN {print $EPOCHREALTIME - $start_all}")"
