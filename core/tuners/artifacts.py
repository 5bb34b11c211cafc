"""Adaptation artifacts: safetensors only (no pickle anywhere), bound to the base model they were trained on.

Two artifacts per version:
- the *servable* artifact: what a batch row carries for the user, by method (core/tuners/registry.py):
      kv                      (L, 2, H, P, D)  the prefix KV       methods prefix, pt-peft
      lora.<module path>.A    (r, in)          per adapted          methods lora, pt-peft
      lora.<module path>.B    (out, r)         projection, scale folded into B
  in fp16 or bf16, plus metadata;
- the optional *training state*: a prefix's reparameterization embedding and MLP, so training can
  continue (method prefix only).

Metadata (strings, as safetensors requires): format version, method, base model id and weights
fingerprint, geometry, LoRA rank and targets, dtype, training config, metrics, and the sha256 of
the tensors (names and bytes, in name order). The blob store also checks the sha256 of the whole
file; the tensor checksum catches corruption of a file read elsewhere.

Format versions: "2" (any method) is written; "1" (prefix only: `kv`, its checksum over the KV
bytes alone) is still read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.engine.adaptation import Adaptation
from core.engine.lora import LoRAWeights, target_modules
from core.engine.model import BaseModel, PrefixGeometry
from core.errors import CorruptArtifact, IncompatibleBaseModel
from core.tuners.registry import LORA, METHODS, PREFIX, STORED_METHODS

FORMAT = "steer-prefix"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
STATE_FORMAT = "steer-prefix-state"
STATE_FORMAT_VERSION = "1"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_LORA = "lora."
_PARTS = {name: METHODS[name].stores for name in STORED_METHODS}
"""method -> (has a KV, has a LoRA), from the registry"""


@dataclass
class Prefix:
    """A servable version of any method: its prefix KV and/or LoRA, and where it came from."""

    kv: torch.Tensor | None  # (L, 2, H, P, D)
    base_model_id: str
    base_fingerprint: str
    training_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    lora: LoRAWeights | None = None
    method: str = PREFIX

    @property
    def prefix_len(self) -> int:
        return 0 if self.kv is None else self.kv.shape[3]

    @property
    def adaptation(self) -> Adaptation:
        """What a batch row carries for this version."""
        return Adaptation(kv=self.kv, lora=self.lora)


def _parts_text(method: str) -> str:
    has_kv, has_lora = _PARTS[method]
    return f"{'a' if has_kv else 'no'} prefix KV and {'a' if has_lora else 'no'} LoRA"


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """Format 1's checksum: the KV's bytes."""
    return hashlib.sha256(_bytes(tensor)).hexdigest()


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Format 2's checksum: every tensor's name and bytes, in name order (a renamed or swapped
    tensor fails it too)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + _bytes(tensors[name]))
    return digest.hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _geometry_meta(g: PrefixGeometry) -> dict[str, str]:
    return {"num_layers": str(g.num_layers), "num_kv_heads": str(g.num_kv_heads), "head_dim": str(g.head_dim)}


def _lora_targets(weights: LoRAWeights) -> list[str]:
    """The projection names a LoRA adapts (its module paths' last parts), e.g. ["q_proj", "v_proj"]."""
    return sorted({name.rsplit(".", 1)[-1] for name in weights.modules})


def save_prefix(prefix: Prefix, dtype: str = "float16") -> bytes:
    """Serialize a servable version to safetensors bytes (the export form)."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError("prefixes are stored in float16 or bfloat16")
    has_kv, has_lora = _PARTS.get(prefix.method, (None, None))
    if has_kv is None:
        raise ValueError(f"cannot store method {prefix.method!r}; one of {', '.join(STORED_METHODS)}")
    lora = prefix.lora if prefix.lora is not None and prefix.lora.modules else None
    if (prefix.kv is not None, lora is not None) != (has_kv, has_lora):
        raise ValueError(f"method {prefix.method!r} stores {_parts_text(prefix.method)}")

    def stored(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(device="cpu", dtype=_DTYPES[dtype]).contiguous()

    tensors: dict[str, torch.Tensor] = {}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": prefix.method,
        "base_model_id": prefix.base_model_id,
        "base_fingerprint": prefix.base_fingerprint,
        "prefix_len": str(prefix.prefix_len),
        "dtype": dtype,
        "training_config": json.dumps(prefix.training_config, sort_keys=True),
        "metrics": json.dumps(prefix.metrics, sort_keys=True),
    }
    if prefix.kv is not None:
        tensors["kv"] = stored(prefix.kv)
        L, _, H, _, D = tensors["kv"].shape
        metadata.update(_geometry_meta(PrefixGeometry(L, H, D)))
    if lora is not None:
        for name, (a, b) in lora.modules.items():
            tensors[f"{_LORA}{name}.A"], tensors[f"{_LORA}{name}.B"] = stored(a), stored(b)
        metadata["lora_rank"] = str(lora.rank)
        metadata["lora_targets"] = json.dumps(_lora_targets(lora))
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise ValueError(f"the adaptation does not fit {dtype} (non-finite values once converted)")
    metadata["tensor_sha256"] = _tensors_sha256(tensors)
    return st_save(tensors, metadata=metadata)


def _read(data: bytes, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = st_load(data)

        metadata = _header_metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptArtifact(f"not a readable safetensors file: {exc}") from exc
    if metadata.get("format") != expected_format:
        raise CorruptArtifact(f"not a {expected_format} artifact (format={metadata.get('format')!r})")
    return tensors, metadata


def _header_metadata(data: bytes) -> dict[str, str]:
    """Metadata from the safetensors header (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length beyond end of file")
    return json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__") or {}


def check_compatible(metadata: dict[str, str], base: BaseModel) -> None:
    if metadata.get("base_model_id") != base.model_id or metadata.get("base_fingerprint") != base.fingerprint:
        raise IncompatibleBaseModel(
            f"prefix was trained on base model {metadata.get('base_model_id')!r} "
            f"(fingerprint {str(metadata.get('base_fingerprint'))[:12]}), "
            f"not on the loaded {base.model_id!r} (fingerprint {base.fingerprint[:12]})"
        )
    if "num_layers" not in metadata and metadata.get("method") == LORA:
        return  # a LoRA alone has no KV geometry; its projections are checked against the model
    if _geometry_meta(base.geometry) != {k: metadata.get(k) for k in ("num_layers", "num_kv_heads", "head_dim")}:
        raise IncompatibleBaseModel("prefix geometry does not match the base model")


def load_prefix(data: bytes, base: BaseModel, *, as_stored: bool = False) -> Prefix:
    """Parse, verify and bind a servable artifact (format 1 or 2) to `base`, on its device in the
    model's dtype, or with `as_stored` in the precision it was stored in (fp16 or bf16).
    Raises CorruptArtifact / IncompatibleBaseModel."""
    tensors, metadata = _read(data, FORMAT)
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CorruptArtifact(f"unsupported prefix format version {version!r}")
    method = PREFIX if version == "1" else metadata.get("method")
    if method not in _PARTS:
        raise CorruptArtifact(f"prefix artifact names no known method ({method!r})")
    checksum = _tensor_sha256(tensors["kv"]) if version == "1" and "kv" in tensors else _tensors_sha256(tensors)
    if checksum != metadata.get("tensor_sha256"):
        raise CorruptArtifact("prefix tensor checksum mismatch: the artifact was altered or truncated")
    has_kv, has_lora = _PARTS[method]
    kv = tensors.pop("kv", None)
    if (kv is not None) != has_kv or (bool(tensors) != has_lora):
        raise CorruptArtifact(f"a {method!r} artifact holds {_parts_text(method)}")
    check_compatible(metadata, base)
    if kv is not None:
        _check_kv(kv, base)
    lora = _lora_weights(tensors, metadata, base) if has_lora else None
    return Prefix(
        kv=None if kv is None else kv.to(device=base.device, dtype=kv.dtype if as_stored else base.dtype),
        base_model_id=metadata["base_model_id"],
        base_fingerprint=metadata["base_fingerprint"],
        training_config=json.loads(metadata.get("training_config") or "{}"),
        metrics=json.loads(metadata.get("metrics") or "{}"),
        lora=None if lora is None else lora.to(base.device, None if as_stored else base.dtype),
        method=method,
    )


def _check_kv(kv: torch.Tensor, base: BaseModel) -> None:
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise CorruptArtifact("prefix artifact has no (L, 2, H, P, D) tensor 'kv'")
    g = base.geometry
    if (kv.shape[0], kv.shape[2], kv.shape[4]) != (g.num_layers, g.num_kv_heads, g.head_dim):
        raise IncompatibleBaseModel(f"prefix tensor shape {tuple(kv.shape)} does not fit the base model")
    if not torch.isfinite(kv).all():
        raise CorruptArtifact("prefix tensor holds non-finite values")


def _lora_weights(tensors: dict[str, torch.Tensor], metadata: dict[str, str], base: BaseModel) -> LoRAWeights:
    """The artifact's `lora.<path>.A/B` pairs, checked: every projection exists in `base` with the
    stored in/out features, A (r, in) and B (out, r) agree on r, and every value is finite."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        path, _, part = name.removeprefix(_LORA).rpartition(".")
        if not name.startswith(_LORA) or part not in ("A", "B") or not path:
            raise CorruptArtifact(f"unexpected tensor {name!r} in a prefix artifact")
        pairs.setdefault(path, {})[part] = tensor
    try:
        targets = tuple(json.loads(metadata.get("lora_targets") or "[]"))
        shapes = target_modules(base.model, targets) if targets else {}
    except (ValueError, TypeError) as exc:
        raise IncompatibleBaseModel(f"the LoRA's projections are not in the base model: {exc}") from exc
    for path, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CorruptArtifact(f"LoRA projection {path!r} lacks its A or B matrix")
        if path not in shapes:
            raise IncompatibleBaseModel(f"the LoRA adapts {path!r}, not a projection of the base model")
    modules = {}
    for path in (p for p in shapes if p in pairs):  # the model's order, as training made them
        pair, (in_features, out_features) = pairs[path], shapes[path]
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CorruptArtifact(f"LoRA projection {path!r} has mismatched A {tuple(a.shape)} and B {tuple(b.shape)}")
        if (a.shape[1], b.shape[0]) != (in_features, out_features):
            raise IncompatibleBaseModel(
                f"LoRA projection {path!r} is ({a.shape[1]} -> {b.shape[0]}), the base model's is "
                f"({in_features} -> {out_features})"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CorruptArtifact(f"LoRA projection {path!r} holds non-finite values")
        modules[path] = (a, b)
    weights = LoRAWeights(modules)
    if metadata.get("lora_rank") != str(weights.rank):
        raise CorruptArtifact(f"LoRA rank {weights.rank} does not match the recorded {metadata.get('lora_rank')!r}")
    return weights


def save_training_state(state: dict[str, torch.Tensor], config: dict, base: BaseModel) -> bytes:
    """Serialize a PrefixEncoder state_dict (reparameterization included) so training can resume."""
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in state.items()}
    metadata = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "base_model_id": base.model_id,
        "base_fingerprint": base.fingerprint,
        **_geometry_meta(base.geometry),
        "prefix_config": json.dumps(config, sort_keys=True),
    }
    return st_save(tensors, metadata=metadata)


def load_training_state(data: bytes, base: BaseModel) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of `save_training_state`: (state_dict, prefix config dict)."""
    tensors, metadata = _read(data, STATE_FORMAT)
    check_compatible(metadata, base)
    return tensors, json.loads(metadata.get("prefix_config") or "{}")
