"""A SmolLM2-shaped byte-level BPE tokenizer trained here, and texts to count.

Shared by tests/core/test_tokens.py and bench/bench_tokens.py. Nothing comes from a model hub: the
corpus is Python source from the standard library on disk plus generated multilingual text, and the
`tokenizers` package trains the BPE with SmolLM2's pipeline (Digits(individual) + ByteLevel, ByteLevel
decoder and post-processor, ChatML special tokens).
"""

from __future__ import annotations

import random
import sysconfig
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Fragments for generated text: scripts, digits, whitespace runs, emoji (incl. ZWJ and flags),
# combining marks, contractions and the special tokens.
FRAGMENTS = [
    "the", "The", "of", "and", "in", "cheap", "token", "count", " ", "  ", "    ", "\n", "\n\n", "\t", "\r\n",
    "0", "1", "2024", "3.14", "١٢٣", "²", "Ⅻ", "'s", "'ll", "'re", "'", '"', "(", ")", "{", "}", ":", ";", ".",
    ",", "!", "?", "-", "_", "=", "==", "->", "é", "ü", "ñ", "ß", "Ω", "café", "naïve", "Straße", "résumé",
    "日本語", "中文", "東京", "한국어", "안녕", "Привет", "мир", "مرحبا", "שלום", "नमस्ते", "ไทย", "Ελληνικά",
    "😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "\u200d", "\u00a0", "\u3000", "\u2028", "e\u0301", "𝔘𝔫𝔦", "\ue000",
    "def", "return", "self", "import", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im", "end|>",
]


def generated_text(rng: random.Random, n_fragments: int) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(n_fragments))


@cache
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))


@cache
def python_source(max_bytes: int = 2_000_000) -> str:
    """Standard-library Python source, in a fixed order, up to `max_bytes` (about 10 MB at most)."""
    parts: list[str] = []
    size = 0
    for path in _stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode())
        if size >= max_bytes:
            break
    return "".join(parts).encode()[:max_bytes].decode("utf-8", errors="ignore")


@cache
def trained_tokenizer_json(vocab_size: int = 16_000) -> str:
    """tokenizer.json of a BPE trained on stdlib source plus generated multilingual text."""
    rng = random.Random(1234)
    corpus = python_source(1_500_000).splitlines(keepends=True)
    corpus += [generated_text(rng, rng.randint(1, 40)) for _ in range(20_000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok.to_str()


def smollm2_tokenizer_path() -> Path | None:
    """SmolLM2's tokenizer.json when the converter has produced it in this checkout."""
    root = Path(__file__).resolve().parent.parent / ".data" / "models"
    found = sorted(root.glob("SmolLM2*/tokenizer.json"))
    return found[0] if found else None


SPM_CONTROL = ["<start_of_turn>", "<end_of_turn>"]


@cache
def spm_tokenizer_json(add_space_prefix: bool = False, vocab_size: int = 6_000) -> str:
    """A Gemma-shaped SentencePiece BPE tokenizer.json, written by the converter itself
    (`cheapest.convert.tokenizer_build.tokenizer_json`, the `llama` tokenizer model) from pieces trained here:
    spaces as "▁", no pre-tokenizer (merges cross spaces), the 256 <0xNN> byte pieces, control tokens and a
    user-defined one, <bos> before a sequence."""
    from tokenizers import normalizers

    from cheapest.convert.gguf_reader import TokenizerData

    rng = random.Random(11)
    corpus = python_source(400_000).splitlines(keepends=True)
    corpus += [generated_text(rng, rng.randint(1, 30)) for _ in range(6_000)]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    trainer_tok.train_from_iterator(corpus, trainer=trainer)
    vocab = trainer_tok.get_vocab()
    pieces = sorted((p for p in vocab if not (len(p) == 6 and p.startswith("<0x"))), key=vocab.__getitem__)
    head = ["<pad>", "<eos>", "<bos>", "<unk>", *SPM_CONTROL, "<tool>"]
    tokens = head + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3, 3, 3, 2, 3, 3, 4] + [6] * 256 + [1] * len(pieces)
    data = TokenizerData(model="llama", pre="default", tokens=tokens, token_types=types, merges=[], scores=None,
                         bos_token_id=2, eos_token_id=1, unk_token_id=3, pad_token_id=0, add_bos_token=True,
                         add_eos_token=False, add_space_prefix=add_space_prefix, chat_template=None)
    from cheapest.convert.tokenizer_build import tokenizer_json

    return tokenizer_json(data)
