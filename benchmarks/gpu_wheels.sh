# Sourced by the benchmarks/gpu_*.sh scripts: the GPU machine's missing packages, from wheels carried along.
#
#   ensure_wheels SCRIPT_NAME "deepspeed, webdataset"    # the modules the script needs
#
# When the modules do not all import, the wheels in $WHEELS_DIR (made by `bash benchmarks/gpu_train_step.sh
# --fetch-wheels` on a machine with network access) are installed into /tmp/fastenc-site without the network and put
# on PYTHONPATH; exits 2 if there are none, 1 if the modules still do not import. Needs PY, WHEELS_DIR and stamp().
ensure_wheels() {
    local name=$1 modules=$2
    "$PY" -c "import $modules" 2>/dev/null && return 0
    if ! ls "$WHEELS_DIR"/deepspeed-*.whl >/dev/null 2>&1; then
        echo "$name: $modules do not all import and $WHEELS_DIR holds no wheels: run" \
             "'bash benchmarks/gpu_train_step.sh --fetch-wheels' on a machine with network access and carry" \
             "$WHEELS_DIR along" >&2
        exit 2
    fi
    stamp "installing the carried wheels from $WHEELS_DIR into /tmp/fastenc-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastenc-site \
        "$WHEELS_DIR"/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/fastenc-site"
    "$PY" -c "import $modules" || exit 1
}
