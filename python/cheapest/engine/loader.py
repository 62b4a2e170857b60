"""Reads a model directory (cheapest.model_layout) and opens it on the best execution provider.

Directories written by `cheapest model convert` say in config.json how each graph must be driven; exports made
elsewhere are inspected instead (a GroupQueryAttention or cheapest.GroupAttention node means a right-padded shared
KV buffer, anything else a plain concatenating cache). On the CPU provider the directory's onnx/model_cpu.onnx is served where
present: the same graph with the core's custom operators, whose library is the core's extension module itself,
registered on every session.

Only metadata is logged: model id, provider, thread count, graph file.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec
import onnx
import onnxruntime as ort

from cheapest.engine.types import EngineError
from cheapest.model_layout import (
    CONFIG, CPU_GRAPH, FUSED_GRAPH, GENERATION_CONFIG, ONNX_DIR, REFERENCE_GRAPH, TOKENIZER, TOKENIZER_CONFIG, GenerationConfig,
    GraphContract, ModelConfig, token_ids,
)

log = logging.getLogger("cheapest.engine")

KvLayout = Literal["shared_buffer", "concat"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# Served graph first; the fp32 reference graph only when nothing else is there.
_GRAPH_PREFERENCE = (Path(FUSED_GRAPH).name, "model_q4.onnx", "model_int4.onnx", "model_quantized.onnx",
                     "model_fp16.onnx")
_REFERENCE_GRAPH = Path(REFERENCE_GRAPH).name


class IncrementalDecoder(Protocol):
    def push(self, id: int) -> str: ...
    def flush(self) -> str: ...


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...
    def decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder: ...
    def token_bytes(self, id: int) -> bytes | None: ...


@dataclass(frozen=True)
class ModelSpec:
    model_dir: Path
    model_id: str
    graph_path: Path
    context_length: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    kv_layout: KvLayout
    tokenizer_config: dict[str, Any] = field(repr=False)
    generation_config: dict[str, Any] = field(repr=False)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise EngineError(f"cannot read {path.name} in the model directory") from e


def _decode(path: Path, data: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as e:
        raise EngineError(f"{path.name} in the model directory lacks the model dimensions") from e
    except msgspec.DecodeError as e:
        raise EngineError(f"{path.name} in the model directory is not a JSON object") from e


def _read_dict(path: Path) -> dict[str, Any]:
    """tokenizer_config.json: free-form (the chat template reads any special-token key)."""
    data = _read_bytes(path)
    if data is None:
        return {}
    value = _decode(path, data, dict[str, Any])
    assert isinstance(value, dict)
    return value


def choose_graph(model_dir: Path, graph: str | None = None) -> Path:
    onnx_dir = model_dir / ONNX_DIR
    if graph is not None:
        path = onnx_dir / graph
        if not path.is_file():
            raise EngineError(f"graph {graph} not found in the model directory")
        return path
    for name in _GRAPH_PREFERENCE:
        if (onnx_dir / name).is_file():
            return onnx_dir / name
    others = sorted(p for p in onnx_dir.glob("model*.onnx") if p.name != _REFERENCE_GRAPH)
    if others:
        return others[0]
    if (onnx_dir / _REFERENCE_GRAPH).is_file():
        return onnx_dir / _REFERENCE_GRAPH
    raise EngineError("no onnx/model*.onnx in the model directory")


def served_graph(model_dir: str | os.PathLike[str], providers: Sequence[str]) -> str | None:
    """The graph file a session on `providers` should load, or None for choose_graph's default: the CPU
    provider prefers CPU_GRAPH when the directory has it."""
    cpu_graph = Path(model_dir) / CPU_GRAPH
    if providers and providers[0] == CPU and cpu_graph.is_file():
        return cpu_graph.name
    return None


def _graph_has_op(graph_path: Path, *op_types: str) -> bool:
    model = onnx.load(str(graph_path), load_external_data=False)
    return any(node.op_type in op_types for node in model.graph.node)


def read_model_dir(model_dir: str | os.PathLike[str], *, graph: str | None = None) -> ModelSpec:
    model_dir = Path(model_dir)
    raw_config = _read_bytes(model_dir / CONFIG)
    if raw_config is None:
        raise EngineError("the model directory has no config.json")
    config: ModelConfig = _decode(model_dir / CONFIG, raw_config, ModelConfig)
    raw_generation = _read_bytes(model_dir / GENERATION_CONFIG)
    generation: GenerationConfig = (GenerationConfig() if raw_generation is None
                                    else _decode(model_dir / GENERATION_CONFIG, raw_generation, GenerationConfig))
    graph_path = choose_graph(model_dir, graph)
    ours = config.cheapest
    model_id = (ours.model_id if ours is not None else None) or config.name_or_path or model_dir.name
    bos = token_ids(generation.bos_token_id) or token_ids(config.bos_token_id)
    spec = ModelSpec(
        model_dir=model_dir,
        model_id=model_id.rsplit("/", 1)[-1],
        graph_path=graph_path,
        context_length=config.max_position_embeddings or 2048,
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=config.head_dim or config.hidden_size // config.num_attention_heads,
        vocab_size=config.vocab_size,
        eos_token_ids=frozenset(token_ids(generation.eos_token_id) | token_ids(config.eos_token_id)),
        bos_token_id=min(bos) if bos else None,
        kv_layout=_kv_layout(ours.graphs if ours is not None else {}, model_dir, graph_path),
        tokenizer_config=_read_dict(model_dir / TOKENIZER_CONFIG),
        generation_config=msgspec.to_builtins(generation),
    )
    if not (model_dir / TOKENIZER).is_file():
        raise EngineError("the model directory has no tokenizer.json")
    return spec


def _kv_layout(graphs: dict[str, GraphContract], model_dir: Path, graph_path: Path) -> KvLayout:
    declared = graphs.get(graph_path.relative_to(model_dir).as_posix())
    if declared is not None:
        return "shared_buffer" if declared.kv_padding == "right" else "concat"
    # GroupAttention: the core's operator with GroupQueryAttention's cache semantics (rust/ortops/attention.rs).
    return "shared_buffer" if _graph_has_op(graph_path, "GroupQueryAttention", "GroupAttention") else "concat"


# --- tokenizer ------------------------------------------------------------------------------------------------


class _TextDiffDecoder:
    """Streaming detokenization for the `tokenizers` fallback (cheapest_core.Tokenizer.decoder() is the fast
    path). It decodes everything generated so far at each token and emits what is new, holding back trailing
    U+FFFD (an incomplete UTF-8 sequence that later bytes may complete), so the pieces add up to exactly
    decode(all ids). O(n) per token: fine for a fallback, which is why the core's decoder exists."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._emitted = 0  # characters of the full decode already handed out

    def push(self, id: int) -> str:
        self._ids.append(id)
        text = str(self._tok.decode(self._ids, skip_special_tokens=self._skip)).rstrip("\ufffd")
        if len(text) <= self._emitted:
            return ""
        piece, self._emitted = text[self._emitted :], len(text)
        return piece

    def flush(self) -> str:
        text = str(self._tok.decode(self._ids, skip_special_tokens=self._skip))
        piece, self._emitted = text[self._emitted :], len(text)
        return piece


class _HfTokenizer:
    """Adapter over the `tokenizers` package with cheapest_core.Tokenizer's interface."""

    def __init__(self, path: Path) -> None:
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return _TextDiffDecoder(self._tok, skip_special_tokens)

    def token_bytes(self, id: int) -> bytes | None:
        return None  # the package has no exact per-token bytes: the engine asks llguidance


class AddedToken(msgspec.Struct):
    """One of tokenizer.json's `added_tokens`, the fields the engine reads."""

    id: int
    content: str = ""
    special: bool = False


class AddedTokens(msgspec.Struct):
    added_tokens: list[AddedToken] = []

    @classmethod
    def read(cls, path: Path) -> list[AddedToken]:
        return msgspec.json.decode(path.read_bytes(), type=cls).added_tokens


class TextTokenizer:
    """The model's tokenizer for text that must stay text (message content): special tokens typed into it are
    encoded as the characters they are made of, never as the control tokens (`tokenizers`'
    `encode_special_tokens`). `special_ids`: the ids such text must not produce. The second tokenizer is built
    the first time typed control tokens need it (~25 MiB a model that most workers never spend)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._tok: Any = None
        self._lock = threading.Lock()
        added = AddedTokens.read(path)
        self.special_ids = frozenset(t.id for t in added if t.special)

    def encode(self, text: str) -> list[int]:
        with self._lock:
            if self._tok is None:
                import tokenizers

                tok = tokenizers.Tokenizer.from_file(str(self._path))
                tok.encode_special_tokens = True
                self._tok = tok
        return list(self._tok.encode(text, add_special_tokens=False).ids)


def release_freed_heap() -> None:
    """Hand heap memory freed while loading back to the OS. glibc's malloc keeps freed blocks for reuse, and
    parsing a large tokenizer.json (Gemma 3's peaks at ~160 MiB, ~350 with its merges written as pairs) would leave
    most of that resident for the worker's life (measured with pairs: 317 -> 124 MiB anonymous after Gemma 3's
    tokenizer). Also called after long prefills (runner.TRIM_AFTER_TOKENS). No-op where the C library has no
    malloc_trim."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def load_tokenizer(model_dir: Path) -> Tokenizer:
    path = model_dir / TOKENIZER
    try:
        from cheapest_core import Tokenizer as CoreTokenizer
    except ImportError:
        return _HfTokenizer(path)
    tokenizer: Tokenizer = CoreTokenizer.from_file(str(path))
    return tokenizer


# --- execution providers and sessions -------------------------------------------------------------------------


def cuda_device_count() -> int:
    """GPUs the CUDA driver sees (0 without a driver), asked without loading ONNX Runtime's CUDA provider."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise EngineError(f"execution provider not available: {', '.join(missing)}")
        return list(requested)
    if CUDA in available and cuda_device_count() > 0:
        return [CUDA, CPU]
    return [CPU]


def default_threads() -> int:
    """Physical cores are what matmul threads scale with; hyperthreads only add contention."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores)


SPIN_US = 50  # see session_options


# Several models in one process: what ONNX Runtime shares and what it does not. The environment (one per process)
# is shared anyway. Each session's CPU arena keeps its own high-water mark of activations, so two models held two
# peaks; registered once in the environment, one arena serves every session that asks for it (a 1,000-token
# prefill on SmolLM2 then Gemma 3: ~90 MiB less). The global intra-op thread pool (use_per_session_threads=False)
# was measured too and left out: its threads spin without the bound session_options sets (see SPIN_US), and
# Gemma 3's decode fell from 19 to 8 tok/s on a busy 2-core box, for no memory saved (idle threads cost stacks).
_shared_arena_lock = threading.Lock()
_shared_arena = False


def share_cpu_arena() -> None:
    """Register one CPU arena in the process's ONNX Runtime environment (once; later calls do nothing)."""
    global _shared_arena
    with _shared_arena_lock:
        if not _shared_arena:
            ort.create_and_register_allocator(
                ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT), None)
            _shared_arena = True


def session_options(threads: int | None, *, spin_us: int = SPIN_US, shared_arena: bool = False,
                    huge_pages: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if shared_arena:
        share_cpu_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # ORT's warnings name nodes and shapes only, but keep the service log quiet
    # A decode step is ~200 short parallel sections. Pool threads that sleep between them pay a wake-up each
    # (SmolLM2, 2 cores, idle box: 16.9 ms/step sleeping vs 11.3 ms spinning up to 50 us); spinning without a
    # bound starves everything else on a busy box (8 vs 45-50 tok/s beside a ~1.9-core job). Bounded at
    # 50 us, beside one busy core: 21.9 vs 17.4 ms/step. spin_us=0: pool threads always sleep.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us > 0 else "0")
    if spin_us > 0:
        opts.add_session_config_entry("session.intra_op.spin_duration_us", str(int(spin_us)))
    _register_core_ops(opts, huge_pages)
    return opts


def _register_core_ops(opts: ort.SessionOptions, huge_pages: bool) -> None:
    """The core's ONNX Runtime operators (domain `cheapest`, rust/ortops): its extension module is also the
    custom-op library. Without the core, graphs that use them fail to load by operator name.

    `huge_pages` (process-wide, for the operators the next session creates): each copies its weights out of the
    session's mapping of the model file into transparent huge pages (rust/ortops/pages.rs). A decode step reads
    every weight once, and in 4 KiB pages that is one TLB miss per page: SmolLM2's batch-1 step took 6.95 ms
    mapped and 5.90 ms copied, Gemma 3's 9.75 and 8.87 ms (2-core KVM box, bench/ab_builds.py). Resident memory
    stays one copy; only workers on one host no longer share the file's pages, each holds its own."""
    try:
        from cheapest_core import _cheapest_core
    except ImportError:
        return
    _cheapest_core.set_huge_page_weights(huge_pages)
    opts.register_custom_ops_library(_cheapest_core.__file__)


def open_session(spec: ModelSpec, *, threads: int | None = None, providers: Iterable[str] | None = None,
                 spin_us: int = SPIN_US, shared_arena: bool = False, huge_pages: bool = True) -> ort.InferenceSession:
    chosen = choose_providers(list(providers) if providers is not None else None)
    try:
        session = ort.InferenceSession(str(spec.graph_path), providers=chosen,
                                       sess_options=session_options(threads, spin_us=spin_us,
                                                                    shared_arena=shared_arena and chosen == [CPU],
                                                                    huge_pages=huge_pages))
    except Exception as e:  # ORT raises its own exception types; surface a generic engine failure
        raise EngineError("the model graph could not be loaded") from e
    log.info(
        "model loaded: id=%s provider=%s threads=%d graph=%s kv=%s",
        spec.model_id, session.get_providers()[0], threads or default_threads(), spec.graph_path.name,
        spec.kv_layout,
    )
    return session
