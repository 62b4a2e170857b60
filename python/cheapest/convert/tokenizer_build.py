"""Build `tokenizer.json` / `tokenizer_config.json` from a GGUF's tokenizer metadata.

The `tokenizers` library assembles the pipeline (no hand-written BPE):
- `gpt2` vocabularies (SmolLM2, Llama 3): the GGUF's vocabulary and merges become a byte-level BPE model,
  the pre-tokenizer is chosen from `tokenizer.ggml.pre` the same way llama.cpp chooses its split regex;
- `llama` (SentencePiece BPE: Llama 2, Mistral): merges are derived from the piece scores the way Hugging
  Face's LlamaConverter does, with "▁" for spaces and byte fallback (<0xNN> pieces).
Control / user-defined tokens become added tokens so they are matched whole (`<|im_start|>` is one id).
"""

from __future__ import annotations

import json
from typing import Any, cast

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .gguf_reader import TokenizerData, UnsupportedModelError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3 split (also used by several Llama-3 derived GGUFs).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":
        # SmolLM / SmolLM2: every digit is its own pre-token, then GPT-2's byte-level split.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in ("gpt-2", "gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama3", "llama-v3", "llama-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise UnsupportedModelError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: smollm, gpt-2, llama-bpe)")


def _spm_merges(data: TokenizerData, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two known pieces, best-scoring merged piece first (HF's
    `generate_merges`: ties by left then right piece length, within a piece by the parts' ids)."""
    scores = data.scores or [-float(i) for i in range(len(data.tokens))]
    found: list[tuple[str, str, float]] = []
    for pid, piece in enumerate(data.tokens):
        if data.token_types[pid] != TOKEN_NORMAL:
            continue
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((left, right, scores[pid]) for left, right in local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def build_tokenizer(data: TokenizerData) -> Tokenizer:
    if data.model not in ("gpt2", "llama"):
        raise UnsupportedModelError(
            f"unsupported GGUF tokenizer model {data.model!r}: supported are 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece BPE)"
        )
    vocab = {tok: i for i, tok in enumerate(data.tokens)}
    if len(vocab) != len(data.tokens):
        raise UnsupportedModelError("GGUF vocabulary has duplicate tokens")
    if data.model == "gpt2":
        # GGUF merges are "left right" lines, i.e. pairs
        merges = [cast(tuple[str, str], tuple(m.split(" ", 1))) for m in data.merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _pre_tokenizer(data.pre)
        tok.decoder = decoders.ByteLevel()
    else:
        unk = data.tokens[data.unk_token_id] if data.unk_token_id is not None else None
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(data, vocab), unk_token=unk, fuse_unk=True,
                                   byte_fallback=True))
        steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "\u2581")]
        if data.add_space_prefix:
            steps.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(steps)
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if data.add_space_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
    if data.add_bos_token and data.bos_token_id is not None:
        bos = data.tokens[data.bos_token_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, data.bos_token_id)]
        )
    elif data.model == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(t, special=(kind == TOKEN_CONTROL), normalized=False, single_word=False, lstrip=False, rstrip=False)
        for t, kind in zip(data.tokens, data.token_types)
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    # Ids are already in the vocabulary, so these keep their GGUF ids.
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    return tok


def tokenizer_json(data: TokenizerData) -> str:
    """The tokenizer.json, its merges written as "left right" strings where no part holds a space (the format
    the tokenizers library reads as well as pairs): loading Gemma 3's 513k merges as pairs peaked at ~350 MiB
    and left ~96 MiB resident, as strings ~160 MiB and ~91 MiB."""
    text = build_tokenizer(data).to_str(pretty=True)
    tree = json.loads(text)
    merges = tree["model"].get("merges") or []
    if not all(isinstance(pair, list) and len(pair) == 2 and " " not in pair[0] + pair[1] for pair in merges):
        return text
    tree["model"]["merges"] = [f"{left} {right}" for left, right in merges]
    return json.dumps(tree, ensure_ascii=False, indent=2)


def _token(data: TokenizerData, idx: int | None) -> str | None:
    return None if idx is None or not (0 <= idx < len(data.tokens)) else data.tokens[idx]


def tokenizer_config(data: TokenizerData, *, context_length: int) -> dict[str, Any]:
    added_decoder = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": kind == TOKEN_CONTROL,
        }
        for i, (t, kind) in enumerate(zip(data.tokens, data.token_types))
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    }
    special = {
        "bos_token": _token(data, data.bos_token_id),
        "eos_token": _token(data, data.eos_token_id),
        "pad_token": _token(data, data.pad_token_id),
        "unk_token": _token(data, data.unk_token_id),
    }
    config: dict[str, Any] = {
        "add_bos_token": data.add_bos_token,
        "add_eos_token": data.add_eos_token,
        "added_tokens_decoder": added_decoder,
        **{k: v for k, v in special.items() if v is not None},
        "chat_template": data.chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if data.chat_template is None:
        del config["chat_template"]
    return config


def tokenizer_config_json(data: TokenizerData, *, context_length: int) -> str:
    return json.dumps(tokenizer_config(data, context_length=context_length), indent=2, ensure_ascii=False) + "\n"
