# Sourced by gpu_check.sh and gpu_check_models.sh. On a GPU machine without network and without
# diffusers (a test and benchmark reference), install the diffusers and importlib_metadata wheels
# carried in .whl/ (`carry: [".whl"]`) into a private folder and put it on PYTHONPATH. Only these
# two, so nothing in .whl/ shadows the machine's torch or numpy. Returns 1 if the install failed.
install_carried_wheels() {
    local py="$1" wheels
    "$py" -c "import diffusers" 2>/dev/null && return 0
    wheels=$(ls .whl/diffusers-*.whl .whl/importlib_metadata-*.whl 2>/dev/null)
    if [ -z "$wheels" ]; then
        echo "no diffusers here and no wheels in .whl/: the diffusers comparisons will skip" \
            "(make them with benchmarks/fetch_wheels.sh where there is network; carry .whl)"
        return 0
    fi
    echo "installing carried wheels: $(echo $wheels)"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fastdiff-site $wheels || return 1
    export PYTHONPATH="/tmp/fastdiff-site${PYTHONPATH:+:$PYTHONPATH}"
}
