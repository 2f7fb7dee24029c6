"""triattention's calibration: per head of every compressed layer, the mean of the model's own
pre-RoPE queries and the mean modulus of each rotated pair (``reference.QueryStats``), over ordinary
text. Computed once per model; saved as ``.npz`` with the model's identity (a hash of its tensors'
names, shapes and types, not its path) and refused for another model.

The engine captures queries after RoPE (its query window); calibration decodes the text in chunks
of one window, reads each chunk's queries and rotates them back by their positions with the layer's
RoPE as llama.cpp applies it (``reference.Rope.unrotate``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import llama_cpp
import numpy as np

from . import _native
from .reference import QueryStats

FORMAT = "rkv-local triattention calibration 1"
DEFAULT_TOKENS = 4096
CHUNK = 64   # tokens per decode call: the query window the engine keeps while calibrating
BUILTIN_TEXT = Path(__file__).parent / "evals" / "data" / "math500.jsonl"


@dataclass(frozen=True)
class Calibration:
    """Query statistics of a model's compressed layers (``layers``, model layer indices)."""

    model_id: str
    layers: tuple[int, ...]
    centres: np.ndarray     # [n_layers, n_head, head_dim]
    abs_means: np.ndarray   # [n_layers, n_head, head_dim / 2]
    n_tokens: int
    source: str

    def stats(self, layer: int) -> QueryStats:
        i = self.layers.index(layer)
        return QueryStats(centre=self.centres[i], abs_mean=self.abs_means[i])

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"a calibration file ends in .npz, got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, format=FORMAT, model_id=self.model_id, layers=np.asarray(self.layers, dtype=np.int32),
                 centres=self.centres.astype(np.float32), abs_means=self.abs_means.astype(np.float32),
                 n_tokens=self.n_tokens, source=self.source)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration file {path} (make one with `rkv-local calibrate MODEL --out FILE`)")
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["format"]) != FORMAT:
                    raise ValueError(f"format {str(data['format'])!r}")
                return cls(model_id=str(data["model_id"]), layers=tuple(int(i) for i in data["layers"]),
                           centres=np.asarray(data["centres"]), abs_means=np.asarray(data["abs_means"]),
                           n_tokens=int(data["n_tokens"]), source=str(data["source"]))
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path} is not an rkv-local triattention calibration file: {exc}") from exc

    def check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise ValueError("this calibration was made for another model (its tensors differ); calibrate this one "
                             "with `rkv-local calibrate MODEL --out FILE`")

    def apply(self, ctx: int) -> None:
        """Hand the statistics to a context compressing with triattention."""
        from .llama import head_shape

        n_head, d = head_shape(llama_cpp.llama_get_model(ctx))
        if self.centres.shape[1:] != (n_head, d) or self.abs_means.shape[1:] != (n_head, d // 2):
            raise ValueError(f"the calibration's heads {self.centres.shape[1:]} are not the model's ({n_head}, {d})")
        layers = _native.compressed_layers(ctx)
        if tuple(layers) != self.layers:
            raise ValueError(f"the calibration covers layers {list(self.layers)}, the context compresses {layers}")
        for i, layer in enumerate(layers):
            _native.set_query_stats(ctx, layer, self.centres[i], self.abs_means[i])


def model_identity(model_path: str | os.PathLike[str]) -> str:
    """The model's identity (``_identity``), computed once per file and modification in a process."""
    stat = os.stat(model_path)
    return _identity(os.path.realpath(model_path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _identity(model_path: str, _size: int, _mtime_ns: int) -> str:
    """A hash of the model's architecture, its tensors' names, shapes and types, and the first 4 KiB
    of each tensor's data (fine-tunes of one base model share every shape, not their weights)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(model_path))
    arch = reader.fields.get("general.architecture")
    digest = hashlib.sha256(str(arch.contents() if arch is not None else "").encode())
    for t in reader.tensors:
        digest.update(f"{t.name}:{list(map(int, t.shape))}:{t.tensor_type.name};".encode())
        digest.update(np.ascontiguousarray(np.asarray(t.data).reshape(-1)[:4096]).view(np.uint8)[:4096].tobytes())
    return digest.hexdigest()


def default_path(model_id: str) -> Path:
    """Where an automatic calibration is cached: beside the downloaded models."""
    from .models import default_cache_dir

    return default_cache_dir() / "calibration" / f"triattention-{model_id[:24]}.npz"


def builtin_text(limit_chars: int = 200_000) -> str:
    """MATH-500's problems and solutions, as plain text (shipped with rkv_local)."""
    parts, size = [], 0
    with BUILTIN_TEXT.open() as f:
        for line in f:
            row = json.loads(line)
            part = f"Problem: {row['problem']}\nSolution: {row['solution']}\n\n"
            parts.append(part)
            size += len(part)
            if size >= limit_chars:
                break
    return "".join(parts)


def calibrate(model_path: str | os.PathLike[str], text: Optional[str] = None, n_tokens: int = DEFAULT_TOKENS,
              progress: bool = True, **llama_kwargs) -> Calibration:
    """The statistics of ``model_path`` over ``n_tokens`` tokens of ``text`` (default: the built-in text)."""
    from tqdm import tqdm

    from .llama import Llama, head_shape, n_ctx_train

    if n_tokens < CHUNK:
        raise ValueError(f"calibration needs at least {CHUNK} tokens, got {n_tokens}")
    n_train = n_ctx_train(os.fspath(model_path), False)
    if n_train:   # the whole text sits in one context of the model's training length
        n_tokens = min(n_tokens, (n_train - 2 * CHUNK) // CHUNK * CHUNK)
    source = "text" if text is not None else f"builtin:{BUILTIN_TEXT.name}"
    text = builtin_text() if text is None else text
    # a cache that never compresses (the budget holds every token), whose query window is one chunk
    llm = Llama(os.fspath(model_path), kv_budget=n_tokens + CHUNK, kv_buffer=CHUNK, kv_window=CHUNK,
                kv_method="snapkv", verbose=False, **llama_kwargs)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True)
        n_chunks = min(len(tokens), n_tokens) // CHUNK
        if n_chunks < 1:
            raise ValueError(f"the calibration text has {len(tokens)} tokens; at least {CHUNK} are needed")
        ctx = llm._ctx.ctx
        layers = _native.compressed_layers(ctx)
        ropes = [_native.rope(ctx, layer) for layer in layers]
        model = llm._model.model
        n_head, d = head_shape(model)
        n_embd_k = llama_cpp.llama_model_n_head_kv(model) * d
        for rope in ropes:
            if rope.n_rot != d:
                raise ValueError(f"triattention needs every dimension rotated (n_rot {rope.n_rot}, head size {d})")
        centres = np.zeros((len(layers), n_head, d))
        abs_means = np.zeros((len(layers), n_head, d // 2))
        for c in tqdm(range(n_chunks), desc="calibrating triattention", unit="chunk", disable=not progress):
            llm.eval(tokens[c * CHUNK:(c + 1) * CHUNK])
            positions = np.arange(c * CHUNK, (c + 1) * CHUNK)
            for i, (layer, rope) in enumerate(zip(layers, ropes)):
                # the window holds this chunk's queries; row r is the position congruent to r
                queries, _, _ = _native.layer_inputs(ctx, layer, CHUNK, n_head * d, n_embd_k, keys=False)
                pre = rope.unrotate(queries.reshape(CHUNK, n_head, d), positions)
                centres[i] += pre.sum(axis=0)
                abs_means[i] += rope.pair_moduli(pre).sum(axis=0)
        count = n_chunks * CHUNK
    finally:
        llm.close()
    return Calibration(model_identity(model_path), tuple(layers), centres / count, abs_means / count, count, source)


def resolve(model_path: str | os.PathLike[str], calibration: Optional[str | os.PathLike[str]],
            **llama_kwargs) -> tuple[Calibration, str]:
    """The calibration a triattention context uses, checked against the model, and its file: the file
    given, or the cached automatic one, made (once, with a warning) when there is none."""
    model_id = model_identity(model_path)
    path = Path(calibration) if calibration is not None else default_path(model_id)
    if calibration is None and not path.is_file():
        warnings.warn(f"kv_method='triattention' without kv_calibration: calibrating {Path(model_path).name} on "
                      f"{DEFAULT_TOKENS} tokens of built-in text, once; saved to {path}", RuntimeWarning,
                      stacklevel=3)
        calibrate(model_path, progress=False, **llama_kwargs).save(path)
    loaded = Calibration.load(path)
    loaded.check_model(model_id)
    return loaded, os.fspath(path)
