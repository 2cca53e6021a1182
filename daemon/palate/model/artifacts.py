"""Self-describing reward-model artifacts: to/from bytes (for the encrypted store) and dirs.

An artifact is one safetensors blob: the trainable tensors (LoRA matrices and head) plus,
in the header's ``__metadata__``, a JSON config naming everything needed to rebuild the
model: base model id and content hash, tokenizer hash, LoRA config, max tokens, score
mean/std, calibration temperature and a training-data summary. A directory artifact is the
same blob as ``model.safetensors`` next to a readable copy of the config (``config.json``).

The blob is written and read in memory (no temp file: weights learnt from user data must
never touch the disk in plaintext outside the encrypted store).

Loading checks every tensor name and shape against the model the config describes and
reports *all* mismatches at once; a base whose hash differs from the recorded one is refused
(the adapter would silently score differently on other weights).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from palate.model.blas import ensure_fast_blas

    ensure_fast_blas()
except ImportError:  # pragma: no cover
    pass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from palate.errors import PalateError
from palate.model.reward_model import LoraConfig, RewardModel
from palate.model.scoring import Calibration, PrefixSource, Scorer

__all__ = [
    "FORMAT",
    "ArtifactError",
    "LoadedModel",
    "ModelArtifact",
    "from_bytes",
    "load_dir",
    "load_model",
    "save_dir",
    "to_bytes",
]

FORMAT = "palate-reward-model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

_DTYPES = {"F32": np.float32, "F16": np.float16}
_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


class ArtifactError(PalateError):
    """An artifact is malformed or does not fit the model it describes."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__("model_error", message, {"reason": "bad_artifact", **details})


@dataclass
class ModelArtifact:
    """Weights (name -> float32 array) and the config that describes them."""

    tensors: dict[str, np.ndarray]
    config: dict[str, Any] = field(default_factory=dict)


def build_config(
    base: Any,
    lora: LoraConfig,
    max_tokens: int,
    calibration: Calibration,
    data_summary: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    members: int = 1,
) -> dict[str, Any]:
    """The JSON config of an artifact (see module docstring)."""
    return {
        "format": FORMAT,
        "base_model": {
            "id": base.model_id,
            "content_hash": base.content_hash,
            "tokenizer_hash": base.tokenizer_hash,
            "hidden_size": int(base.hidden_size),
            "num_layers": int(base.num_layers),
        },
        "lora": lora.to_json(),
        "head": {"pooling": "last_token", "padding": "right", "outputs": members},
        # K heads on the shared trunk, each trained on its own bootstrap resample; the score
        # is their mean (model/ensemble.py). Absent in older artifacts: one member.
        "ensemble": {"members": members, "kind": "heads", "resample": "poisson-bootstrap"},
        "max_tokens": int(max_tokens),
        "calibration": {
            "mean": calibration.mean,
            "std": calibration.std,
            "temperature": calibration.temperature,
            "member_offsets": list(calibration.member_offsets),
            "offset": calibration.offset,
        },
        "training_data": data_summary or {},
        "metrics": metrics or {},
        "train_config": train_config or {},
    }


def to_bytes(artifact: ModelArtifact) -> bytes:
    """Serialise as safetensors bytes, config JSON in ``__metadata__``."""
    header: dict[str, Any] = {"__metadata__": {"palate": json.dumps(artifact.config)}}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(artifact.tensors):
        arr = np.ascontiguousarray(artifact.tensors[name])
        if arr.dtype not in _NAMES:
            arr = arr.astype(np.float32)
        raw = arr.tobytes()
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def from_bytes(blob: bytes, expect: str = FORMAT) -> ModelArtifact:
    """Parse bytes written by :func:`to_bytes`; every structural problem is an ArtifactError.

    ``expect`` is the format the config must name (policy adapters use their own)."""
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
        meta = header.pop("__metadata__", {})
        config = json.loads(meta["palate"])
    except Exception as exc:
        raise ArtifactError(f"not a Palate model artifact ({type(exc).__name__}: {exc})") from exc
    if config.get("format") != expect:
        raise ArtifactError(
            f"unsupported artifact format {config.get('format')!r} (expected {expect})"
        )
    data = memoryview(blob)[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    for name, spec in header.items():
        start, end = spec["data_offsets"]
        if spec["dtype"] not in _DTYPES or end > len(data):
            raise ArtifactError(f"tensor {name!r} is corrupt or truncated", tensor=name)
        arr = np.frombuffer(data[start:end], dtype=_DTYPES[spec["dtype"]])
        tensors[name] = arr.reshape(spec["shape"]).astype(np.float32)
    return ModelArtifact(tensors=tensors, config=config)


def save_dir(artifact: ModelArtifact, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``path`` (created if needed)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS_FILE).write_bytes(to_bytes(artifact))
    (out / CONFIG_FILE).write_text(json.dumps(artifact.config, indent=2) + "\n")
    return out


def load_dir(path: str | Path, expect: str = FORMAT) -> ModelArtifact:
    p = Path(path)
    weights = p / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(
            f"{p} is not a Palate model directory (no {WEIGHTS_FILE}); "
            "create one with `palate train --data FILE --output DIR`",
            path=str(p),
        )
    return from_bytes(weights.read_bytes(), expect)


def artifact_from_model(model: RewardModel, config: dict[str, Any]) -> ModelArtifact:
    """The model's trainable tensors under ``config``; its ensemble size is the model's."""
    members = int(model.members)
    config = {
        **config,
        "head": {**config.get("head", {}), "outputs": members},
        "ensemble": {**config.get("ensemble", {}), "members": members},
    }
    return ModelArtifact(
        tensors={k: np.array(v, dtype=np.float32) for k, v in model.trainable_state().items()},
        config=config,
    )


@dataclass
class LoadedModel:
    """A reward model rebuilt from an artifact, ready to score."""

    model: RewardModel
    base: Any
    config: dict[str, Any]
    calibration: Calibration

    def scorer(
        self, token_budget: int = 4096, n_streams: int = 1, prefix: PrefixSource | None = None
    ) -> Scorer:
        return Scorer(
            self.model,
            self.base.tokenizer,
            int(self.config["max_tokens"]),
            self.calibration,
            token_budget=token_budget,
            n_streams=n_streams,
            prefix=prefix,
        )


def load_model(artifact: ModelArtifact, base: Any | None = None) -> LoadedModel:
    """Rebuild the reward model of ``artifact`` on its base model.

    ``base`` may be passed when already loaded (the daemon keeps one); otherwise it is
    loaded from the recorded id. A differing content or tokenizer hash is an error.
    """
    cfg = artifact.config
    want = cfg["base_model"]
    if base is None:
        from palate.model.base_model import load_base_model

        base = load_base_model(want["id"])
    problems = [
        f"{key}: artifact has {want[key]!r}, base has {getattr(base, key)!r}"
        for key in ("content_hash", "tokenizer_hash")
        if want.get(key) != getattr(base, key)
    ]
    if problems:
        raise ArtifactError(
            f"artifact was trained on a different base than {base.model_id!r}: "
            + "; ".join(problems),
            problems=problems,
        )
    members = int(cfg.get("ensemble", {}).get("members", 1))
    model = RewardModel(base.model, LoraConfig.from_json(cfg["lora"]), members=members)
    expected = {k: tuple(v.shape) for k, v in model.trainable_state().items()}
    got = {k: tuple(v.shape) for k, v in artifact.tensors.items()}
    issues = [f"missing tensor {k} {expected[k]}" for k in sorted(expected.keys() - got.keys())]
    issues += [f"unexpected tensor {k} {got[k]}" for k in sorted(got.keys() - expected.keys())]
    issues += [
        f"shape mismatch {k}: artifact {got[k]}, model {expected[k]}"
        for k in sorted(expected.keys() & got.keys())
        if expected[k] != got[k]
    ]
    if issues:
        raise ArtifactError(
            f"artifact does not fit its model ({len(issues)} problems): " + "; ".join(issues),
            problems=issues,
        )
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in artifact.tensors.items()]))
    mx.eval(model.parameters())
    c = cfg["calibration"]
    calib = Calibration(
        float(c["mean"]),
        float(c["std"]),
        float(c["temperature"]),
        tuple(float(x) for x in c.get("member_offsets", ())),
        float(c.get("offset", 0.0)),
    )
    return LoadedModel(model=model, base=base, config=cfg, calibration=calib)
