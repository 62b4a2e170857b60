//! The exact, compact path for SentencePiece-style BPE tokenizers: the shape
//! the converter writes for GGUF's `llama` tokenizer model (Gemma 3, the
//! Llama 2 family) and Hugging Face's own files of that family.
//!
//! Why it exists: the `tokenizers` crate keeps Gemma 3's 262,144 tokens and
//! 513,511 merges in hash maps of owned strings (vocab, reverse vocab, merge
//! map, added-vocabulary tries): ~91 MiB resident for one worker, a quarter
//! of the whole loaded model. Here the vocabulary is one byte arena with
//! offsets and a hash table of ids into it, and the merges a table sorted by
//! left id: ~13 MiB, and it loads in a fraction of the time. When this path
//! takes a file the crate is not loaded at all.
//!
//! `SpmBpe::from_json` accepts only a shape it fully reproduces: normalizer
//! none, `Prepend` or `Replace` with a string pattern (alone or in a
//! Sequence); no pre-tokenizer; a BPE model without dropout, subword
//! prefix/suffix or `ignore_merges`, with dense ids; added tokens that are
//! vocabulary entries at their own ids, unnormalized, without
//! strip/single-word rules; post-processor none or a single-sequence
//! TemplateProcessing; a decoder chain of `Replace` (string pattern),
//! `ByteFallback`, `Fuse` and `Strip` (start only); no truncation or padding.
//! Anything else returns `None` and the caller loads the crate.
//!
//! What it computes is what the crate computes, step for step: added tokens
//! are cut out of the raw text (leftmost-longest), each remaining segment is
//! normalized, becomes one word of characters (a character missing from the
//! vocabulary becomes its `<0xHH>` byte tokens, or the unknown token, as in
//! the crate's `BPE::merge_word`, quirks included), and the word is merged by
//! lowest rank, leftmost first (`merge_heap`, the crate's `Word::merge_all`).
//! Decoding applies the decoder chain to the tokens' strings as the crate's
//! decoders do. Equality with the crate and with the Python package is
//! proven by tests (rust/tokens/tests.rs, tests/core/test_tokens.py, and on
//! Gemma 3's own file in tests/engine/test_gemma3.py).
use rustc_hash::FxHashSet;
use serde_json::Value;
use std::borrow::Cow;

use super::bpe::{merge_heap, post_processor_shape, AddedSplitter, Segment};
use super::file::{merge_list, File, Merge, Vocab, NONE};

/// A normalizer step, applied to each segment between added tokens.
enum Norm {
    /// `Prepend`: put this before a non-empty segment.
    Prepend(String),
    /// `Replace` with a string pattern: every non-overlapping occurrence.
    Replace(String, String),
}

/// A decoder step over the tokens' strings (the crate's `decode_chain`).
enum Dec {
    Replace(String, String),
    ByteFallback,
    Fuse,
    /// `Strip(content, start, 0)`: up to `start` leading `content` characters.
    Strip(char, usize),
}

pub struct SpmBpe {
    vocab: Vocab,
    /// Ids of the one-byte (ASCII) tokens, `NONE` when missing.
    ascii: [u32; 128],
    /// The merges, grouped by left id (`merge_start[left]..merge_start[left + 1]`) and sorted by right id.
    merge_start: Vec<u32>,
    merge_right: Vec<u32>,
    /// (rank, merged id) of each merge.
    merge_to: Vec<(u32, u32)>,
    /// `byte_fallback`: each byte's `<0xHH>` token, `NONE` when missing.
    byte_ids: Option<Box<[u32; 256]>>,
    unk: Option<u32>,
    fuse_unk: bool,
    normalizer: Vec<Norm>,
    decoder: Vec<Dec>,
    added: AddedSplitter,
    special: FxHashSet<u32>,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

/// `Replace`'s string pattern and content, `None` for a regex pattern.
fn replace_of(v: &Value) -> Option<(String, String)> {
    let pattern = v.get("pattern")?.get("String")?.as_str()?;
    let content = v.get("content")?.as_str()?;
    (!pattern.is_empty()).then(|| (pattern.to_string(), content.to_string()))
}

/// A step list: the value itself, or a Sequence's items under `key`.
fn steps<'v>(v: &'v Value, key: &str) -> Option<Vec<&'v Value>> {
    if v.get("type")?.as_str()? == "Sequence" {
        Some(v.get(key)?.as_array()?.iter().collect())
    } else {
        Some(vec![v])
    }
}

fn normalizer_shape(v: &Value) -> Option<Vec<Norm>> {
    if v.is_null() {
        return Some(vec![]);
    }
    steps(v, "normalizers")?
        .into_iter()
        .map(|n| match n.get("type")?.as_str()? {
            "Prepend" => Some(Norm::Prepend(n.get("prepend")?.as_str()?.to_string())),
            "Replace" => replace_of(n).map(|(p, c)| Norm::Replace(p, c)),
            _ => None,
        })
        .collect()
}

fn decoder_shape(v: &Value) -> Option<Vec<Dec>> {
    steps(v, "decoders")?
        .into_iter()
        .map(|d| match d.get("type")?.as_str()? {
            "Replace" => replace_of(d).map(|(p, c)| Dec::Replace(p, c)),
            "ByteFallback" => Some(Dec::ByteFallback),
            "Fuse" => Some(Dec::Fuse),
            "Strip" => {
                let mut content = d.get("content")?.as_str()?.chars();
                let c = content.next()?;
                let start = usize::try_from(d.get("start")?.as_u64()?).ok()?;
                (content.next().is_none() && d.get("stop")?.as_u64()? == 0).then_some(Dec::Strip(c, start))
            }
            _ => None,
        })
        .collect()
}

impl SpmBpe {
    /// The tokenizer in `json` when it has the shape this path reproduces;
    /// `None` otherwise (and for anything invalid: the crate then loads the
    /// file and reports what is wrong).
    pub fn from_file(file: &File<'_>) -> Option<SpmBpe> {
        let (shape, model) = (&file.shape, &file.model);
        if !shape.pre_tokenizer.is_null() || !shape.truncation.is_null() || !shape.padding.is_null() {
            return None;
        }
        let normalizer = normalizer_shape(&shape.normalizer)?;
        let decoder = decoder_shape(&shape.decoder)?;
        let (prefix, suffix) = post_processor_shape(Some(&shape.post_processor))?;
        if model.kind.as_deref() != Some("BPE")
            || model.dropout.is_some_and(|d| d != 0.0)
            || model.continuing_subword_prefix.is_some()
            || model.end_of_word_suffix.is_some()
            || model.ignore_merges == Some(true)
        {
            return None;
        }
        let mut spm = Self::over(Some(Vocab::new(&model.vocab.0)?).filter(Vocab::dense)?)?;
        spm.merges(&model.merges)?;
        if let Some(unk) = &model.unk_token {
            spm.unk = Some(spm.lookup(unk.as_bytes())?);
        }
        spm.fuse_unk = model.fuse_unk.unwrap_or(false);
        if model.byte_fallback == Some(true) {
            let mut ids = Box::new([NONE; 256]);
            for (b, id) in ids.iter_mut().enumerate() {
                // The crate's own spelling of a byte token.
                *id = spm.lookup(format!("<{b:#04X}>").as_bytes()).unwrap_or(NONE);
            }
            spm.byte_ids = Some(ids);
        }
        let mut raw = Vec::with_capacity(shape.added_tokens.len());
        let mut contents = FxHashSet::default();
        for t in &shape.added_tokens {
            if t.single_word || t.lstrip || t.rstrip || t.normalized || t.content.is_empty()
                || spm.lookup(t.content.as_bytes()) != Some(t.id)
                || !contents.insert(t.id)
            {
                return None;
            }
            if t.special {
                spm.special.insert(t.id);
            }
            raw.push((t.content.clone(), t.id));
        }
        spm.added = AddedSplitter::new(&raw, &[])?;
        if prefix.iter().chain(&suffix).any(|&id| id as usize >= spm.vocab.len()) {
            return None;
        }
        spm.normalizer = normalizer;
        spm.decoder = decoder;
        spm.prefix = prefix;
        spm.suffix = suffix;
        Some(spm)
    }

    /// An empty tokenizer over `vocab`, its one-byte tokens indexed.
    fn over(vocab: Vocab) -> Option<SpmBpe> {
        let mut ascii = [NONE; 128];
        for id in 0..vocab.len() as u32 {
            if let [b] = vocab.text(id) {
                if *b < 128 {
                    ascii[*b as usize] = id;
                }
            }
        }
        Some(SpmBpe {
            vocab,
            ascii,
            merge_start: Vec::new(),
            merge_right: Vec::new(),
            merge_to: Vec::new(),
            byte_ids: None,
            unk: None,
            fuse_unk: false,
            normalizer: Vec::new(),
            decoder: Vec::new(),
            added: AddedSplitter::new(&[], &[])?,
            special: FxHashSet::default(),
            prefix: Vec::new(),
            suffix: Vec::new(),
        })
    }

    /// The merges (`file::merge_list`) sorted by (left, right) for lookup; a
    /// pair listed twice keeps its last rank, as the crate's map does.
    fn merges(&mut self, merges: &[Merge<'_>]) -> Option<()> {
        let mut table = merge_list(merges, &self.vocab)?;
        table.sort_unstable();
        // Sorted by rank within a pair: the last of each run is the last listed.
        table.dedup_by(|later, earlier| {
            let same = (later.0, later.1) == (earlier.0, earlier.1);
            if same {
                *earlier = *later;
            }
            same
        });
        let n = self.vocab.len();
        self.merge_start = Vec::with_capacity(n + 1);
        self.merge_right = table.iter().map(|m| m.1).collect();
        self.merge_to = table.iter().map(|m| (m.2, m.3)).collect();
        let mut at = 0;
        for left in 0..=n as u32 {
            while at < table.len() && table[at].0 < left {
                at += 1;
            }
            self.merge_start.push(at as u32);
        }
        Some(())
    }

    fn lookup(&self, text: &[u8]) -> Option<u32> {
        self.vocab.lookup(text)
    }

    #[inline]
    fn merge_of(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        let range = self.merge_start[a as usize] as usize..self.merge_start[a as usize + 1] as usize;
        let at = self.merge_right[range.clone()].binary_search(&b).ok()?;
        Some(self.merge_to[range.start + at])
    }

    // --- encoding ---------------------------------------------------------------------------------

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn special_ids(&self, add_special_tokens: bool) -> (&[u32], &[u32]) {
        if add_special_tokens {
            (&self.prefix, &self.suffix)
        } else {
            (&[], &[])
        }
    }

    /// The ids of `text` without the post-processor's, appended to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        self.added.split(text, &mut |seg| match seg {
            Segment::Added(id) => out.push(id),
            Segment::Text(t) => self.encode_segment(t, out),
        })
    }

    fn normalize<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut s = Cow::Borrowed(text);
        for step in &self.normalizer {
            match step {
                Norm::Prepend(p) if !s.is_empty() => s = Cow::Owned(format!("{p}{s}")),
                Norm::Prepend(_) => {}
                Norm::Replace(pattern, content) => {
                    if s.contains(pattern.as_str()) {
                        s = Cow::Owned(s.replace(pattern.as_str(), content));
                    }
                }
            }
        }
        s
    }

    fn encode_segment(&self, text: &str, out: &mut Vec<u32>) {
        let word = self.normalize(text);
        let start = out.len();
        // The crate's `merge_word`: a pending unknown token is written
        // before the next known character, but not before byte tokens.
        let mut unk: Option<u32> = None;
        for (i, c) in word.char_indices() {
            let ch = &word.as_bytes()[i..i + c.len_utf8()];
            let id = if ch.len() == 1 { Some(self.ascii[ch[0] as usize]).filter(|&id| id != NONE) } else { self.lookup(ch) };
            if let Some(id) = id {
                out.extend(unk.take());
                out.push(id);
                continue;
            }
            if let Some(bytes) = &self.byte_ids {
                if ch.iter().all(|&b| bytes[b as usize] != NONE) {
                    out.extend(ch.iter().map(|&b| bytes[b as usize]));
                    continue;
                }
            }
            if let Some(unk_id) = self.unk {
                if !(unk.is_some() && self.fuse_unk) {
                    out.extend(unk.replace(unk_id));
                }
            }
        }
        out.extend(unk);
        if out.len() - start >= 2 {
            let merged = merge_heap(&out[start..], |a, b| self.merge_of(a, b));
            out.truncate(start);
            out.extend(merged);
        }
    }

    // --- vocabulary and decoding ------------------------------------------------------------------

    /// Whether the decoder chain has a ByteFallback step.
    pub fn byte_fallback_decoder(&self) -> bool {
        self.decoder.iter().any(|d| matches!(d, Dec::ByteFallback))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.lookup(token.as_bytes())
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.vocab.token(id)
    }

    /// The bytes token `id` stands for on its own: its string through the decoder's per-token steps (`Replace`,
    /// and `ByteFallback`, which makes a `<0xHH>` token its byte); `Fuse` joins and `Strip` trims the whole
    /// text, so neither applies to one token. `None` for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let mut token = self.id_to_token(id)?.to_string();
        for step in &self.decoder {
            match step {
                Dec::Replace(pattern, content) => token = token.replace(pattern.as_str(), content),
                Dec::ByteFallback => {
                    if let Some(b) = byte_of(&token) {
                        return Some(vec![b]);
                    }
                }
                Dec::Fuse | Dec::Strip(..) => {}
            }
        }
        Some(token.into_bytes())
    }

    /// The crate's `Tokenizer::decode` for known ids: the tokens' strings
    /// (special ones dropped when asked) through the decoder chain, joined.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let mut tokens: Vec<String> = ids
            .iter()
            .filter(|id| !(skip_special_tokens && self.special.contains(id)))
            .filter_map(|&id| self.id_to_token(id).map(str::to_string))
            .collect();
        for step in &self.decoder {
            tokens = match step {
                Dec::Replace(pattern, content) => {
                    tokens.into_iter().map(|t| t.replace(pattern.as_str(), content)).collect()
                }
                Dec::ByteFallback => byte_fallback(tokens),
                Dec::Fuse => vec![tokens.concat()],
                Dec::Strip(c, start) => tokens
                    .into_iter()
                    .map(|t| {
                        let cut: usize = t.chars().take(*start).take_while(|x| x == c).map(char::len_utf8).sum();
                        t[cut..].to_string()
                    })
                    .collect(),
            };
        }
        tokens.concat()
    }
}

/// The byte a `<0xHH>` token stands for, as the crate's ByteFallback reads it.
fn byte_of(token: &str) -> Option<u8> {
    if token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') {
        token.get(3..5).and_then(|h| u8::from_str_radix(h, 16).ok())
    } else {
        None
    }
}

/// Whether ByteFallback decodes this token as a byte.
pub fn is_byte_token(token: &str) -> bool {
    byte_of(token).is_some()
}

/// The crate's `ByteFallback::decode_chain`: runs of `<0xHH>` tokens become
/// their bytes' text, or one U+FFFD per byte when not valid UTF-8.
fn byte_fallback(tokens: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut bytes: Vec<u8> = Vec::new();
    let flush = |bytes: &mut Vec<u8>, out: &mut Vec<String>| {
        if bytes.is_empty() {
            return;
        }
        match String::from_utf8(std::mem::take(bytes)) {
            Ok(s) => out.push(s),
            Err(e) => out.extend(std::iter::repeat_n("\u{FFFD}".to_string(), e.as_bytes().len())),
        }
    };
    for t in tokens {
        match byte_of(&t) {
            Some(b) => bytes.push(b),
            None => {
                flush(&mut bytes, &mut out);
                out.push(t);
            }
        }
    }
    flush(&mut bytes, &mut out);
    out
}
