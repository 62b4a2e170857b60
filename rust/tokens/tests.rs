//! The fast path against the `tokenizers` crate, on a byte-level BPE trained
//! here (nothing is downloaded). The Python tests compare with the Python
//! package as well.
use super::*;
use std::collections::HashSet;
use std::sync::OnceLock;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper};
use tokenizers::{PreTokenizerWrapper, TokenizerBuilder, TokenizerImpl};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const POOL: &[&str] = &[
    "a", "e", "t", "the", "The", " ", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "0", "1", "7", "42", "٣", "²",
    "'s", "'ll", "'", "\"", "(", ")", ":", ";", ".", ",", "!", "?", "-", "_", "=", "==", "é", "ü", "ñ", "ß", "Ω",
    "日本", "語", "中文", "한국어", "😀", "👍🏽", "🇫🇷", "\u{200d}", "\u{a0}", "\u{3000}", "\u{2028}", "ج", "ש",
    "def", "return", "self", " x", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im", "end|>", "𝔘", "\u{e000}",
    "\u{10ffff}", "\u{ffff}", "\u{0301}", "\u{1d7d8}", "\u{4}", "\u{40000}", "\u{7f}",
];

fn random_text(rng: &mut Rng, max_parts: usize) -> String {
    let n = rng.below(max_parts + 1);
    (0..n).map(|_| POOL[rng.below(POOL.len())]).collect()
}

fn corpus() -> Vec<String> {
    let mut lines: Vec<String> = [include_str!("../tokens.rs"), include_str!("bpe.rs"), include_str!("pretok.rs")]
        .iter()
        .flat_map(|s| s.lines().map(str::to_string))
        .collect();
    let mut rng = Rng(0x5EED);
    lines.extend((0..3000).map(|_| random_text(&mut rng, 12)));
    lines
}

/// A SmolLM2-shaped tokenizer (Digits + ByteLevel, ByteLevel decoder,
/// special tokens), trained on `corpus()`; returned as tokenizer.json.
fn trained_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let pre = PreTokenizerWrapper::Sequence(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ]));
        let mut tk: TokenizerImpl<ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper> =
            TokenizerBuilder::new()
                .with_model(BPE::default().into())
                .with_pre_tokenizer(Some(pre))
                .with_decoder(Some(ByteLevelDecoder::default().into()))
                .build()
                .unwrap();
        let specials: Vec<AddedToken> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(1500)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<_>>())
            .special_tokens(specials)
            .build()
            .into();
        tk.train(&mut trainer, corpus().into_iter()).unwrap();
        tk.to_string(false).unwrap()
    })
}

fn both(json: &str) -> (Arc<Tokenizer>, tokenizers::Tokenizer) {
    (Arc::new(Tokenizer::from_str(json).unwrap()), json.parse().unwrap())
}

fn reference(tk: &tokenizers::Tokenizer, text: &str, special: bool) -> Vec<u32> {
    tk.encode(text, special).unwrap().get_ids().to_vec()
}

#[test]
fn fast_path_is_taken_and_exact_on_random_text() {
    let (ours, theirs) = both(trained_json());
    assert!(ours.fast_path() && !ours.uses_crate());
    let mut rng = Rng(42);
    for _ in 0..20_000 {
        let text = random_text(&mut rng, 10);
        let want = reference(&theirs, &text, true);
        assert_eq!(ours.encode(&text, true), want, "{text:?}");
        assert_eq!(ours.count(&text), want.len(), "{text:?}");
    }
}

#[test]
fn long_words_use_the_heap_merge_and_agree() {
    let (ours, theirs) = both(trained_json());
    let mut rng = Rng(7);
    for _ in 0..300 {
        let unit = POOL[rng.below(POOL.len())];
        let text = unit.repeat(1 + rng.below(80)) + &random_text(&mut rng, 3);
        assert_eq!(ours.encode(&text, true), reference(&theirs, &text, true), "{text:?}");
    }
}

#[test]
fn large_texts_counted_in_parallel_parts_agree() {
    let (ours, theirs) = both(trained_json());
    let mut rng = Rng(9);
    let mut text = String::new();
    while text.len() < 3 * PARALLEL_MIN {
        text.push_str(include_str!("bpe.rs"));
        text.push_str(&random_text(&mut rng, 50));
    }
    let want = reference(&theirs, &text, true);
    assert_eq!(ours.count(&text), want.len());
    assert_eq!(ours.encode(&text, true), want);
    let batch = vec![text.as_str(), "", "hello 123", &text[..1000]];
    let counts: Vec<usize> = batch.iter().map(|t| reference(&theirs, t, true).len()).collect();
    assert_eq!(ours.count_batch(&batch), counts);
}

#[test]
fn byte_level_without_the_crate_and_beside_it_agree() {
    // The same file through the path that reads it itself and through the crate-backed one (an added token
    // outside the vocabulary keeps the crate): same ids, text and lookups.
    let (own, theirs) = both(trained_json());
    assert!(!own.uses_crate());
    let mut json: serde_json::Value = serde_json::from_str(trained_json()).unwrap();
    let next = own.vocab_size() as u64;
    json["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
        "id": next, "content": "<extra>", "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true}));
    let beside = Tokenizer::from_str(&json.to_string()).unwrap();
    assert!(beside.uses_crate() && beside.fast_path());
    let crate_only = Tokenizer::from_str_with_crate(trained_json()).unwrap();
    let mut rng = Rng(21);
    for _ in 0..3000 {
        let text = random_text(&mut rng, 10);
        let ids = own.encode(&text, true);
        assert_eq!(ids, reference(&theirs, &text, true), "{text:?}");
        assert_eq!(beside.encode(&text, true), ids, "{text:?}");
        for skip in [false, true] {
            let want = theirs.decode(&ids, skip).unwrap();
            assert_eq!(own.decode(&ids, skip).unwrap(), want);
            assert_eq!(crate_only.decode(&ids, skip).unwrap(), want);
        }
    }
    for id in 0..own.vocab_size() as u32 + 1 {
        let token = theirs.id_to_token(id);
        assert_eq!(own.id_to_token(id), token);
        if let Some(t) = token {
            assert_eq!(own.token_to_id(&t), theirs.token_to_id(&t));
        }
    }
    assert_eq!(own.vocab_size(), theirs.get_vocab_size(true));
}

#[test]
fn template_post_processor_and_ignore_merges_shapes() {
    let mut json: serde_json::Value = serde_json::from_str(trained_json()).unwrap();
    let bos = json["added_tokens"][0]["id"].as_u64().unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [bos], "tokens": ["<|endoftext|>"]}}
    });
    json["model"]["ignore_merges"] = serde_json::Value::Bool(true);
    let (ours, theirs) = both(&json.to_string());
    assert!(ours.fast_path());
    let mut rng = Rng(3);
    for _ in 0..3000 {
        let text = random_text(&mut rng, 8);
        for special in [true, false] {
            assert_eq!(ours.encode(&text, special), reference(&theirs, &text, special), "{text:?}");
        }
        assert_eq!(ours.count(&text), reference(&theirs, &text, true).len());
    }
}

#[test]
fn bytes_without_a_token_are_dropped_like_the_crate_does() {
    // SmolLM2's vocabulary lacks 21 byte symbols (0x04, 0xF1, 0xF5..); the
    // crate skips them silently when there is no unk token.
    let mut json: serde_json::Value = serde_json::from_str(trained_json()).unwrap();
    let b2c = bpe::byte_to_char();
    let gone: Vec<String> = [0x04u8, 0x06, 0xC0, 0xF1, 0xF5, 0xFF].iter().map(|b| b2c[*b as usize].to_string()).collect();
    let model = &mut json["model"];
    let vocab = model["vocab"].as_object_mut().unwrap();
    vocab.retain(|tok, _| !gone.iter().any(|g| tok.contains(g.as_str())));
    let merges = model["merges"].as_array_mut().unwrap();
    merges.retain(|m| {
        let m = m.as_array().unwrap();
        !m.iter().any(|side| gone.iter().any(|g| side.as_str().unwrap().contains(g.as_str())))
    });
    let (ours, theirs) = both(&json.to_string());
    assert!(ours.fast_path());
    let mut rng = Rng(5);
    for _ in 0..5000 {
        let text = random_text(&mut rng, 10);
        let want = reference(&theirs, &text, true);
        assert_eq!(ours.encode(&text, true), want, "{text:?}");
        assert_eq!(ours.count(&text), want.len(), "{text:?}");
    }
    for text in ["\u{4}", "a\u{4}b", "\u{4}\u{4}", "\u{40000}", "x \u{40000}y"] {
        assert_eq!(ours.count(text), reference(&theirs, text, true).len(), "{text:?}");
    }
    // With an unk token the crate emits it instead: not the fast path's shape.
    json["model"]["unk_token"] = serde_json::Value::String("a".into());
    assert!(!Tokenizer::from_str(&json.to_string()).unwrap().fast_path());
}

#[test]
fn unsupported_shapes_fall_back_to_the_crate() {
    let mut json: serde_json::Value = serde_json::from_str(trained_json()).unwrap();
    json["normalizer"] = serde_json::json!({"type": "Lowercase"});
    let (ours, theirs) = both(&json.to_string());
    assert!(!ours.fast_path() && ours.uses_crate());
    for text in ["Hello World 123", "", "<|im_start|>user\nHI"] {
        assert_eq!(ours.encode(text, true), reference(&theirs, text, true));
        assert_eq!(ours.count(text), reference(&theirs, text, true).len());
    }
}

#[test]
fn incremental_decoding_matches_decode() {
    let (ours, theirs) = both(trained_json());
    let mut rng = Rng(11);
    let vocab = ours.vocab_size() as u64;
    for round in 0..2000 {
        // Real encodings (multi-byte characters split across tokens) and
        // random ids (invalid UTF-8, lone continuation bytes).
        let ids: Vec<u32> = if round % 2 == 0 {
            reference(&theirs, &random_text(&mut rng, 10), true)
        } else {
            (0..rng.below(12)).map(|_| (rng.next() % vocab) as u32).collect()
        };
        for skip in [false, true] {
            let mut dec = ours.decoder(skip);
            let mut got = String::new();
            for &id in &ids {
                got.push_str(&dec.push(id).unwrap());
            }
            got.push_str(&dec.flush().unwrap());
            assert_eq!(got, theirs.decode(&ids, skip).unwrap(), "{ids:?}");
            assert_eq!(got, ours.decode(&ids, skip).unwrap());
        }
    }
}

#[test]
fn errors_name_no_text() {
    let (ours, _) = both(trained_json());
    let vocab = ours.vocab_size() as u32;
    let err = ours.decode(&[1, vocab + 5], false).unwrap_err();
    assert!(err.0.contains(&format!("{}", vocab + 5)), "{err}");
    assert!(ours.decoder(false).push(u32::MAX).is_err());
    let err = Tokenizer::from_str("{\"canary-7f3a\": [1, 2").err().unwrap();
    assert!(!err.0.contains("canary"), "{err}");
    let err = Tokenizer::from_str("{\"model\": \"canary-7f3a\"}").err().unwrap();
    assert!(!err.0.contains("canary"), "{err}");
    assert!(Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).is_err());
}

// --- the SentencePiece BPE path (no crate at run time) ---------------------------------------------

/// A Gemma-shaped tokenizer: spaces normalized to `▁`, no pre-tokenizer (a
/// segment is one word, merges cross spaces), byte fallback tokens, added
/// tokens at their vocabulary ids, `<s>` before a sequence, the Llama 2
/// decoder chain. Trained on `corpus()`; returned as a JSON tree.
fn spm_json() -> serde_json::Value {
    static JSON: OnceLock<String> = OnceLock::new();
    let text = JSON.get_or_init(|| {
        use tokenizers::normalizers::replace::Replace;
        let mut tk: TokenizerImpl<ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper> =
            TokenizerBuilder::new()
                .with_model(BPE::default().into())
                .with_normalizer(Some(Replace::new(" ", "▁").unwrap().into()))
                .build()
                .unwrap();
        let specials: Vec<AddedToken> =
            ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"].iter().map(|t| AddedToken::from(t.to_string(), true)).collect();
        let mut trainer: TrainerWrapper =
            BpeTrainerBuilder::new().vocab_size(1200).show_progress(false).special_tokens(specials).build().into();
        tk.train(&mut trainer, corpus().into_iter().take(3000)).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&tk.to_string(false).unwrap()).unwrap();
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        let mut next = vocab.len() as u64;
        for b in 0..256 {
            let token = format!("<0x{b:02X}>");
            if !vocab.contains_key(&token) {
                vocab.insert(token, next.into());
                next += 1;
            }
        }
        // A user-defined (not special) added token that is also a vocabulary entry.
        vocab.insert("<tool>".into(), next.into());
        json["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
            "id": next, "content": "<tool>", "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": false}));
        for t in json["added_tokens"].as_array_mut().unwrap() {
            t["normalized"] = false.into();
        }
        json["model"]["unk_token"] = "<unk>".into();
        json["model"]["byte_fallback"] = true.into();
        json["model"]["fuse_unk"] = true.into();
        json["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        json["post_processor"] = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        });
        json["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
        json.to_string()
    });
    serde_json::from_str(text).unwrap()
}

/// Ours (the SentencePiece path, asserted) against the crate on the same
/// file: ids with and without the post-processor, counts, decoding (both
/// ways, incremental too) of real and random ids, vocabulary lookups.
fn assert_spm_exact(json: &serde_json::Value, rounds: usize) {
    let text = json.to_string();
    let ours = Arc::new(Tokenizer::from_str(&text).unwrap());
    assert!(!ours.uses_crate() && ours.fast_path());
    let crate_tk = Tokenizer::from_str_with_crate(&text).unwrap();
    assert!(crate_tk.uses_crate());
    let theirs: tokenizers::Tokenizer = text.parse().unwrap();
    assert_eq!(ours.vocab_size(), theirs.get_vocab_size(true));
    for id in 0..ours.vocab_size() as u32 + 2 {
        let token = theirs.id_to_token(id);
        assert_eq!(ours.id_to_token(id), token);
        if let Some(t) = token {
            assert_eq!(ours.token_to_id(&t), theirs.token_to_id(&t));
        }
    }
    let mut rng = Rng(0x5b);
    let vocab = ours.vocab_size() as u64;
    for round in 0..rounds {
        let text = if round % 7 == 6 { POOL[rng.below(POOL.len())].repeat(1 + rng.below(60)) } else { random_text(&mut rng, 12) };
        for special in [true, false] {
            assert_eq!(ours.encode(&text, special), reference(&theirs, &text, special), "{text:?}");
        }
        assert_eq!(ours.count(&text), reference(&theirs, &text, true).len(), "{text:?}");
        let ids: Vec<u32> = if round % 2 == 0 {
            reference(&theirs, &text, true)
        } else {
            (0..rng.below(12)).map(|_| (rng.next() % vocab) as u32).collect()
        };
        for skip in [false, true] {
            let want = theirs.decode(&ids, skip).unwrap();
            assert_eq!(ours.decode(&ids, skip).unwrap(), want, "{ids:?}");
            let mut dec = ours.decoder(skip);
            let mut got: String = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
            got.push_str(&dec.flush().unwrap());
            assert_eq!(got, want, "{ids:?}");
        }
    }
    let long: String = corpus().concat();
    assert_eq!(ours.encode(&long, true), reference(&theirs, &long, true));
}

#[test]
fn sentencepiece_path_is_exact_without_the_crate() {
    assert_spm_exact(&spm_json(), 6000);
}

#[test]
fn sentencepiece_variants_are_exact() {
    // A space prefix (Prepend runs on each segment between added tokens).
    let mut json = spm_json();
    json["normalizer"]["normalizers"]
        .as_array_mut()
        .unwrap()
        .insert(0, serde_json::json!({"type": "Prepend", "prepend": "▁"}));
    assert_spm_exact(&json, 1500);
    // The legacy merge form ("left right", after a "#version" line); a pair listed twice keeps its last rank.
    let mut json = spm_json();
    let merges = json["model"]["merges"].as_array().unwrap().clone();
    let mut lines: Vec<serde_json::Value> = vec!["#version: 0.2".into()];
    lines.extend(merges.iter().map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()).into()));
    lines.push(lines[1].clone());
    json["model"]["merges"] = lines.into();
    assert_spm_exact(&json, 1500);
    // Without byte fallback: unknown characters become `<unk>`, fused or not.
    for fuse in [true, false] {
        let mut json = spm_json();
        json["model"]["byte_fallback"] = false.into();
        json["model"]["fuse_unk"] = fuse.into();
        assert_spm_exact(&json, 1500);
    }
    // Some byte tokens missing: a character needing one is unknown, and a
    // pending unknown token is written after the byte tokens that follow it.
    let mut json = spm_json();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    let mut ids: Vec<(String, u64)> = vocab.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
    ids.sort_by_key(|e| e.1);
    let gone: Vec<String> = ["<0x80>", "<0x98>", "<0xF0>"].iter().map(|s| s.to_string()).collect();
    vocab.clear();
    let mut next = 0u64;
    let mut renumber = std::collections::HashMap::new();
    for (tok, id) in ids {
        if !gone.contains(&tok) {
            vocab.insert(tok, next.into());
            renumber.insert(id, next);
            next += 1;
        }
    }
    for t in json["added_tokens"].as_array_mut().unwrap() {
        t["id"] = renumber[&t["id"].as_u64().unwrap()].into();
    }
    assert_spm_exact(&json, 3000);
}

#[test]
fn sentencepiece_shape_refusals_fall_back_to_the_crate() {
    let shapes: [(&str, serde_json::Value); 5] = [
        ("pre_tokenizer", serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true})),
        ("normalizer", serde_json::json!({"type": "NFKC"})),
        ("decoder", serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true})),
        ("truncation", serde_json::json!({"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0})),
        ("model", serde_json::Value::Null),
    ];
    for (key, value) in shapes {
        let mut json = spm_json();
        if key == "model" {
            json["model"]["dropout"] = 0.5.into();
        } else {
            json[key] = value;
        }
        let text = json.to_string();
        let ours = Tokenizer::from_str(&text).unwrap();
        assert!(ours.uses_crate(), "{key}");
        let theirs: tokenizers::Tokenizer = text.parse().unwrap();
        if key != "model" {
            for t in ["Hello  World 123", "", "<|im_start|>user\nhi 日本"] {
                assert_eq!(ours.encode(t, true), reference(&theirs, t, true), "{key}");
            }
        }
    }
    // An added token that is not its vocabulary entry, or a normalized one.
    let mut json = spm_json();
    json["added_tokens"][1]["normalized"] = true.into();
    assert!(Tokenizer::from_str(&json.to_string()).unwrap().uses_crate());
    // Invalid files are still reported by the crate.
    let mut json = spm_json();
    json["model"]["merges"][0] = serde_json::json!(["not-a-token", "x"]);
    assert!(Tokenizer::from_str(&json.to_string()).is_err());
}

