"""Fixtures: a tiny random-weight BERT sentence-embedding model, converted, and the real all-MiniLM-L6-v2.

  tiny_encoder_source  a folder in all-MiniLM-L6-v2's layout (model.safetensors, config.json, a WordPiece
                       tokenizer.json, modules.json with Normalize, 1_Pooling/config.json mean pooling,
                       sentence_bert_config.json max_seq_length 32).  Session-scoped.
  tiny_encoder_dir     that folder converted (`cheapest.convert.bert.convert_encoder`), named tiny-minilm.
  minilm_dir           the real all-MiniLM-L6-v2, pulled and converted once (slow).  Session-scoped.

`numpy_encoder_forward(source, ids)` is an independent float64 forward pass of the safetensors weights (BERT:
embeddings + LayerNorm, post-norm layers, exact GELU, mean pooling over the real tokens, L2 normalization).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from fixtures_model import pulled
from math import erf, sqrt

TINY_WORDS = ["the", "a", "man", "woman", "is", "eating", "food", "bread", "piece", "of", "girl", "carrying",
              "baby", "dog", "runs", "in", "park", "hello", "world", "canary", "secret", "##s", "##ing", "."]
TINY_HIDDEN, TINY_HEADS, TINY_LAYERS, TINY_FF, TINY_MAX = 32, 4, 2, 64, 32


def write_tiny_encoder(folder: Path, seed: int = 3) -> Path:
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    vocab_list = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
                  *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), *TINY_WORDS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.save(str(folder / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    h, f = TINY_HIDDEN, TINY_FF

    def r(*shape: int, std: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": r(len(vocab), h, std=0.5),
         "embeddings.position_embeddings.weight": r(TINY_MAX * 2, h),
         "embeddings.token_type_embeddings.weight": r(2, h),
         "embeddings.LayerNorm.weight": 1 + r(h, std=0.1), "embeddings.LayerNorm.bias": r(h, std=0.1)}
    for i in range(TINY_LAYERS):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            w[p + f"attention.self.{n}.weight"], w[p + f"attention.self.{n}.bias"] = r(h, h), r(h, std=0.05)
        w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"] = r(h, h), r(h, std=0.05)
        w[p + "attention.output.LayerNorm.weight"] = 1 + r(h, std=0.1)
        w[p + "attention.output.LayerNorm.bias"] = r(h, std=0.1)
        w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = r(f, h), r(f, std=0.05)
        w[p + "output.dense.weight"], w[p + "output.dense.bias"] = r(h, f), r(h, std=0.05)
        w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"] = 1 + r(h, std=0.1), r(h, std=0.1)
    save_file(w, str(folder / "model.safetensors"))
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": h, "num_hidden_layers": TINY_LAYERS,
              "num_attention_heads": TINY_HEADS, "intermediate_size": f, "vocab_size": len(vocab),
              "max_position_embeddings": TINY_MAX * 2, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
              "hidden_act": "gelu", "position_embedding_type": "absolute", "pad_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": h,
                                                                  "pooling_mode_mean_tokens": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": TINY_MAX}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return folder


def numpy_encoder_forward(source: Path, ids: Sequence[int]) -> np.ndarray:
    """The normalized mean-pooled sentence vector of one unpadded input, float64, from the safetensors file."""
    from safetensors.numpy import load_file

    c = json.loads((source / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(source / "model.safetensors")).items()}
    eps, heads = c["layer_norm_eps"], c["num_attention_heads"]

    def ln(x: np.ndarray, name: str) -> np.ndarray:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def lin(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    ids = np.asarray(ids)
    s = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:s] \
        + w["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm")
    d = x.shape[1] // heads
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").reshape(s, heads, d) for n in ("query", "key", "value"))
        sc = np.einsum("shd,thd->hst", q, k) / np.sqrt(d)
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        ctx = np.einsum("hst,thd->shd", sc, v).reshape(s, -1)
        x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        x = ln(lin(gelu(lin(x, p + "intermediate.dense")), p + "output.dense") + x, p + "output.LayerNorm")
    pooled = x.mean(0)
    return pooled / max(np.linalg.norm(pooled), 1e-12)


@pytest.fixture(scope="session")
def tiny_encoder_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder") / "source")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tiny_encoder_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny encoder converted, as tiny-minilm (both graphs, tokenizer, sentence-transformers files)."""
    from cheapest.convert.bert import convert_encoder

    out = tmp_path_factory.mktemp("tiny_encoder_model") / "tiny-minilm"
    return convert_encoder(tiny_encoder_source, out)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 from its PyPI package, converted once (slow)."""
    return pulled("all-MiniLM-L6-v2")
