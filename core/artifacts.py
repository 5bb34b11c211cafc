"""Prefix artifacts: safetensors only (no pickle anywhere), bound to the base model they were trained on.

Two artifacts per prefix version:
- the *prefix* (what serving needs): one tensor `kv` (L, 2, H, P, D) in fp16 or bf16 plus metadata;
- the optional *training state*: the reparameterization embedding and MLP, so training can continue.

Metadata (strings, as safetensors requires): format version, base model id and weights fingerprint,
geometry, dtype, training config, metrics, and the sha256 of the tensor bytes. The blob store also
checks the sha256 of the whole file; the tensor checksum catches corruption of a file read elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.errors import CorruptArtifact, IncompatibleBaseModel
from core.model import BaseModel, PrefixGeometry

FORMAT = "steer-prefix"
FORMAT_VERSION = "1"
STATE_FORMAT = "steer-prefix-state"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Prefix:
    """A servable prefix: its KV tensor and where it came from."""

    kv: torch.Tensor  # (L, 2, H, P, D)
    base_model_id: str
    base_fingerprint: str
    training_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def prefix_len(self) -> int:
        return self.kv.shape[3]


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _geometry_meta(g: PrefixGeometry) -> dict[str, str]:
    return {"num_layers": str(g.num_layers), "num_kv_heads": str(g.num_kv_heads), "head_dim": str(g.head_dim)}


def save_prefix(prefix: Prefix, dtype: str = "float16") -> bytes:
    """Serialize a prefix to safetensors bytes (the export form)."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError("prefixes are stored in float16 or bfloat16")
    kv = prefix.kv.detach().to(device="cpu", dtype=_DTYPES[dtype]).contiguous()
    L, _, H, P, D = kv.shape
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model_id": prefix.base_model_id,
        "base_fingerprint": prefix.base_fingerprint,
        "prefix_len": str(P),
        **_geometry_meta(PrefixGeometry(L, H, D)),
        "dtype": dtype,
        "training_config": json.dumps(prefix.training_config, sort_keys=True),
        "metrics": json.dumps(prefix.metrics, sort_keys=True),
        "tensor_sha256": _tensor_sha256(kv),
    }
    return st_save({"kv": kv}, metadata=metadata)


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
    if _geometry_meta(base.geometry) != {k: metadata.get(k) for k in ("num_layers", "num_kv_heads", "head_dim")}:
        raise IncompatibleBaseModel("prefix geometry does not match the base model")


def load_prefix(data: bytes, base: BaseModel) -> Prefix:
    """Parse, verify and bind a prefix artifact to `base`. Raises CorruptArtifact / IncompatibleBaseModel."""
    tensors, metadata = _read(data, FORMAT)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CorruptArtifact(f"unsupported prefix format version {metadata.get('format_version')!r}")
    kv = tensors.get("kv")
    if kv is None or kv.dim() != 5 or kv.shape[1] != 2:
        raise CorruptArtifact("prefix artifact has no (L, 2, H, P, D) tensor 'kv'")
    if _tensor_sha256(kv) != metadata.get("tensor_sha256"):
        raise CorruptArtifact("prefix tensor checksum mismatch: the artifact was altered or truncated")
    check_compatible(metadata, base)
    g = base.geometry
    if (kv.shape[0], kv.shape[2], kv.shape[4]) != (g.num_layers, g.num_kv_heads, g.head_dim):
        raise IncompatibleBaseModel(f"prefix tensor shape {tuple(kv.shape)} does not fit the base model")
    if not torch.isfinite(kv).all():
        raise CorruptArtifact("prefix tensor holds non-finite values")
    return Prefix(
        kv=kv.to(device=base.device, dtype=base.dtype),
        base_model_id=metadata["base_model_id"],
        base_fingerprint=metadata["base_fingerprint"],
        training_config=json.loads(metadata.get("training_config") or "{}"),
        metrics=json.loads(metadata.get("metrics") or "{}"),
    )


def save_training_state(state: dict[str, torch.Tensor], config: dict, base: BaseModel) -> bytes:
    """Serialize a PrefixEncoder state_dict (reparameterization included) so training can resume."""
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in state.items()}
    metadata = {
        "format": STATE_FORMAT,
        "format_version": FORMAT_VERSION,
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
