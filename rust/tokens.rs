//! Token counting, encoding and decoding for Hugging Face `tokenizer.json`s.
//!
//! Why it is built this way (the performance decisions, in one place):
//! - The `tokenizers` crate stays the reference: tests compare every fast
//!   path with it, and it loads anything the fast paths do not fully support.
//!   Where a fast path takes a file (`tokens/file.rs` reads it with serde) the
//!   crate is not loaded at all: its maps of owned strings held ~91 MiB for
//!   Gemma 3's vocabulary and ~12 MiB for SmolLM2's.
//! - Counting is the per-request hot path (admission needs the prompt's
//!   count before anything runs), and the crate spends most of its time on
//!   offsets, normalized-string bookkeeping and a backtracking regex. For the
//!   GPT-2 byte-level BPE family (SmolLM2, GPT-2, StarCoder, ...) `FastBpe`
//!   computes the same ids without them: a hand-written pre-tokenizer scanner
//!   (`pretok`), merge ranks in an FxHash map keyed by the id pair, and a
//!   per-call cache of words borrowed from the text (no allocation per word).
//!   Equality with the crate and with the Python package is proven by tests,
//!   not assumed. With a ByteLevel decoder and its added tokens in the
//!   vocabulary it decodes too (each token's bytes, joined, as lossy UTF-8)
//!   and the vocabulary is the arena of `tokens/file.rs`.
//! - SentencePiece-style BPE (Gemma 3, the Llama 2 family: a normalizer that
//!   writes spaces as `▁`, no pre-tokenizer, byte fallback) is `SpmBpe`: the
//!   arena and a merge table sorted by left id (~13 MiB for Gemma 3). Same ids
//!   and text as the crate, proven by tests.
//! - Large texts are cut where pieces always break (after a newline or tab
//!   before a non-space) and the parts are counted on rayon's pool; batches
//!   go to the pool when their total size pays for the hand-off.
//! - The incremental decoder of byte-level tokenizers works on bytes, so it
//!   never splits a UTF-8 character and matches `decode` exactly; other
//!   decoders re-decode a short window of ids.
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

mod bpe;
mod file;
mod pretok;
mod spm;

use bpe::{FastBpe, Segment};
use spm::SpmBpe;

/// A tokenizer file is invalid, or ids are out of range. Messages never
/// contain the text being counted, encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerError(pub String);

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TokenizerError {}

/// Texts at least this large are counted in parallel parts of about
/// `CHUNK` bytes; smaller ones are not worth the hand-off to the pool.
const PARALLEL_MIN: usize = 256 * 1024;
const CHUNK: usize = 64 * 1024;
/// A batch goes to the pool when its texts add up to this many bytes.
const BATCH_PARALLEL_MIN: usize = 32 * 1024;

/// The bytes every id decodes to under a ByteLevel decoder (what the crate's
/// `ByteLevel::decode_chain` produces per token before its final lossy UTF-8
/// conversion), and whether the token is special.
struct TokenBytes {
    offsets: Vec<u32>,
    bytes: Vec<u8>,
    present: Vec<bool>,
    special: Vec<bool>,
}

impl TokenBytes {
    /// The table of ids 0..n, `token(id)` giving each present id's string and whether it is special.
    fn collect<'v>(n: usize, token: impl Fn(u32) -> Option<(std::borrow::Cow<'v, str>, bool)>) -> TokenBytes {
        let c2b = bpe::char_to_byte();
        let mut out = TokenBytes {
            offsets: Vec::with_capacity(n + 1),
            bytes: Vec::new(),
            present: vec![false; n],
            special: vec![false; n],
        };
        out.offsets.push(0);
        for id in 0..n {
            if let Some((token, special)) = token(id as u32) {
                (out.present[id], out.special[id]) = (true, special);
                match bpe::token_bytes(&token, &c2b) {
                    Some(b) => out.bytes.extend(b),
                    None => out.bytes.extend(token.as_bytes()),
                }
            }
            out.offsets.push(out.bytes.len() as u32);
        }
        out
    }

    /// The crate's tokens up to `max_id` (special: the content of a special added token, as the crate decides).
    fn build(tk: &tokenizers::Tokenizer, max_id: u32) -> TokenBytes {
        let specials: std::collections::HashSet<String> =
            tk.get_added_tokens_decoder().into_values().filter(|t| t.special).map(|t| t.content).collect();
        TokenBytes::collect(max_id as usize + 1, |id| {
            let token = tk.id_to_token(id)?;
            let special = specials.contains(&token);
            Some((token.into(), special))
        })
    }

    /// A vocabulary read without the crate (`FastBpe::from_file`), `special` the ids of the special added tokens.
    fn from_vocab(vocab: &file::Vocab, special: &rustc_hash::FxHashSet<u32>) -> TokenBytes {
        TokenBytes::collect(vocab.len(), |id| Some((vocab.token(id)?.into(), special.contains(&id))))
    }

    fn get(&self, id: u32) -> Option<(&[u8], bool)> {
        let i = id as usize;
        if !*self.present.get(i)? {
            return None;
        }
        Some((&self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize], self.special[i]))
    }
}

/// Where the vocabulary lives: the crate (with the byte-level fast path
/// beside it where it applies), `SpmBpe` alone, or (byte-level BPE read
/// without the crate) a vocabulary beside `FastBpe` and `TokenBytes`.
enum Backend {
    Crate(tokenizers::Tokenizer),
    Spm(SpmBpe),
    Vocab(file::Vocab),
}

pub struct Tokenizer {
    backend: Backend,
    fast: Option<FastBpe>,
    token_bytes: Option<TokenBytes>,
    vocab_size: usize,
    /// The decoder has a ByteFallback step: a run of `<0xHH>` tokens decodes
    /// as a whole (one U+FFFD per byte when the run is not UTF-8), so the
    /// incremental decoder never ends a window inside one.
    byte_fallback: bool,
}

/// Per-call cache of words (borrowed from the text) -> their ids.
struct WordCache<'t> {
    words: FxHashMap<&'t [u8], (u32, u32)>,
    ids: Vec<u32>,
}

impl<'t> WordCache<'t> {
    fn new() -> Self {
        WordCache { words: FxHashMap::default(), ids: Vec::new() }
    }

    /// Ids of `piece`, appended to `out`.
    #[inline]
    fn encode(&mut self, fast: &FastBpe, piece: &'t [u8], out: &mut Vec<u32>) {
        if piece.len() <= 2 {
            return fast.encode_piece(piece, out);
        }
        if let Some(&(start, len)) = self.words.get(piece) {
            out.extend_from_slice(&self.ids[start as usize..(start + len) as usize]);
            return;
        }
        let before = out.len();
        fast.encode_piece(piece, out);
        let start = self.ids.len() as u32;
        self.ids.extend_from_slice(&out[before..]);
        self.words.insert(piece, (start, (out.len() - before) as u32));
    }

    #[inline]
    fn count(&mut self, fast: &FastBpe, piece: &'t [u8], scratch: &mut Vec<u32>) -> usize {
        if piece.len() == 1 && !fast.drops_bytes() {
            return 1;
        }
        if let Some(&(_, len)) = self.words.get(piece) {
            return len as usize;
        }
        scratch.clear();
        fast.encode_piece(piece, scratch);
        // Only the count is needed later: store no ids.
        self.words.insert(piece, (0, scratch.len() as u32));
        scratch.len()
    }
}

fn json_error(what: &str, e: &serde_json::Error) -> TokenizerError {
    // serde_json's messages can quote the input; keep only the position.
    TokenizerError(format!("{what} (line {}, column {})", e.line(), e.column()))
}

impl Tokenizer {
    /// Loads a tokenizer.json given as a string.
    pub fn from_str(json: &str) -> Result<Tokenizer, TokenizerError> {
        if let Some(file) = file::File::parse(json) {
            if let Some(spm) = SpmBpe::from_file(&file) {
                let vocab_size = spm.vocab_size();
                let byte_fallback = spm.byte_fallback_decoder();
                return Ok(Tokenizer { backend: Backend::Spm(spm), fast: None, token_bytes: None, vocab_size, byte_fallback });
            }
            if let Some((fast, vocab, special)) = FastBpe::from_file(&file) {
                let token_bytes = Some(TokenBytes::from_vocab(&vocab, &special));
                let vocab_size = vocab.len();
                let backend = Backend::Vocab(vocab);
                return Ok(Tokenizer { backend, fast: Some(fast), token_bytes, vocab_size, byte_fallback: false });
            }
        }
        Self::from_str_with_crate(json)
    }

    /// Loads a tokenizer.json with the `tokenizers` crate whatever its shape
    /// (the tests' reference for the paths that do without it).
    pub fn from_str_with_crate(json: &str) -> Result<Tokenizer, TokenizerError> {
        // The crate reports syntax and schema errors as serde_json errors.
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e: tokenizers::Error| {
            let what = "tokenizer.json is not valid JSON or not a tokenizer the tokenizers crate can load";
            match e.downcast_ref::<serde_json::Error>() {
                Some(e) => json_error(what, e),
                None => TokenizerError(what.into()),
            }
        })?;
        let fast = file::File::parse(json).and_then(|f| FastBpe::beside(&f, &inner));
        Ok(Self::from_crate(inner, fast))
    }

    /// Loads a tokenizer.json file.
    pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let json = std::fs::read_to_string(path)
            .map_err(|e| TokenizerError(format!("cannot read tokenizer file {}: {e}", path.display())))?;
        Self::from_str(&json)
    }

    fn from_crate(inner: tokenizers::Tokenizer, fast: Option<FastBpe>) -> Tokenizer {
        let byte_level_decoder = serde_json::to_value(inner.get_decoder())
            .ok()
            .and_then(|json| json.get("type")?.as_str().map(|t| t == "ByteLevel"))
            .unwrap_or(false);
        let token_bytes = byte_level_decoder.then(|| {
            let max_id = inner.get_vocab(true).values().copied().max().unwrap_or(0);
            TokenBytes::build(&inner, max_id)
        });
        let vocab_size = inner.get_vocab_size(true);
        let byte_fallback = serde_json::to_string(&inner.get_decoder()).is_ok_and(|d| d.contains("\"ByteFallback\""));
        Tokenizer { backend: Backend::Crate(inner), fast, token_bytes, vocab_size, byte_fallback }
    }

    /// Whether counting and encoding use one of the exact fast paths (the
    /// byte-level BPE, with or without the crate, or the SentencePiece BPE).
    pub fn fast_path(&self) -> bool {
        self.fast.is_some() || matches!(self.backend, Backend::Spm(_))
    }

    /// Whether the `tokenizers` crate holds the vocabulary (false when a fast
    /// path read the file without it).
    pub fn uses_crate(&self) -> bool {
        matches!(self.backend, Backend::Crate(_))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Crate(inner) => inner.token_to_id(token),
            Backend::Spm(spm) => spm.token_to_id(token),
            Backend::Vocab(vocab) => vocab.lookup(token.as_bytes()),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Crate(inner) => inner.id_to_token(id),
            Backend::Spm(spm) => spm.id_to_token(id).map(str::to_string),
            Backend::Vocab(vocab) => vocab.token(id).map(str::to_string),
        }
    }

    /// `len(encode(text))` with special tokens added, as the Python package's
    /// `len(Tokenizer.encode(text).ids)`.
    pub fn count(&self, text: &str) -> usize {
        let Some(fast) = &self.fast else {
            return self.crate_encode(text, true).len();
        };
        let (pre, post) = fast.special_ids(true);
        let specials = pre.len() + post.len();
        if text.len() >= PARALLEL_MIN {
            return specials
                + parts(fast, text)
                    .par_iter()
                    .map(|seg| count_segment(fast, seg))
                    .sum::<usize>();
        }
        let mut total = specials;
        let mut cache = WordCache::new();
        let mut scratch = Vec::new();
        fast.segments(text, &mut |seg| match seg {
            Segment::Added(_) => total += 1,
            Segment::Text(t) => fast.pieces(t, |p| total += cache.count(fast, p.as_bytes(), &mut scratch)),
        });
        total
    }

    /// `count` of every text, on rayon's pool when the batch is large.
    pub fn count_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Vec<usize> {
        let total: usize = texts.iter().map(|t| t.as_ref().len()).sum();
        if texts.len() > 1 && total >= BATCH_PARALLEL_MIN {
            texts.par_iter().map(|t| self.count(t.as_ref())).collect()
        } else {
            texts.iter().map(|t| self.count(t.as_ref())).collect()
        }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let Some(fast) = &self.fast else {
            return self.crate_encode(text, add_special_tokens);
        };
        let (pre, post) = fast.special_ids(add_special_tokens);
        let mut out = pre.to_vec();
        if text.len() >= PARALLEL_MIN {
            let parts: Vec<Vec<u32>> = parts(fast, text)
                .par_iter()
                .map(|seg| {
                    let mut ids = Vec::new();
                    encode_segment(fast, seg, &mut ids, &mut WordCache::new());
                    ids
                })
                .collect();
            out.extend(parts.into_iter().flatten());
        } else {
            let mut cache = WordCache::new();
            fast.segments(text, &mut |seg| encode_segment(fast, &seg, &mut out, &mut cache));
        }
        out.extend_from_slice(post);
        out
    }

    /// Ids of the whole text where there is no byte-level fast path: the
    /// SentencePiece path's, or the crate's.
    fn crate_encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let inner = match &self.backend {
            Backend::Crate(inner) => inner,
            Backend::Spm(spm) => {
                let (pre, post) = spm.special_ids(add_special_tokens);
                let mut out = pre.to_vec();
                spm.encode_into(text, &mut out);
                out.extend_from_slice(post);
                return out;
            }
            Backend::Vocab(_) => return Vec::new(), // never: this backend always has the fast path
        };
        // The crate fails only on configurations (e.g. a missing unk token),
        // never on text; its message is dropped as it may quote the input.
        match inner.encode_fast(text, add_special_tokens) {
            Ok(enc) => enc.get_ids().to_vec(),
            Err(_) => Vec::new(),
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        for &id in ids {
            let known = match (&self.token_bytes, &self.backend) {
                (Some(tb), _) => tb.get(id).is_some(),
                (None, Backend::Crate(inner)) => inner.id_to_token(id).is_some(),
                (None, Backend::Spm(_) | Backend::Vocab(_)) => (id as usize) < self.vocab_size,
            };
            if !known {
                return Err(TokenizerError(format!(
                    "token id {id} is not in the vocabulary (size {})",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        match &self.backend {
            Backend::Crate(inner) => inner
                .decode(ids, skip_special_tokens)
                .map_err(|_| TokenizerError("the tokenizer's decoder failed".into())),
            Backend::Spm(spm) => Ok(spm.decode(ids, skip_special_tokens)),
            Backend::Vocab(_) => {
                // The crate's ByteLevel decoder: every token's bytes joined, as lossy UTF-8.
                let mut bytes = Vec::new();
                for &id in ids {
                    if let Some((b, special)) = self.token_bytes.as_ref().and_then(|tb| tb.get(id)) {
                        if !(special && skip_special_tokens) {
                            bytes.extend_from_slice(b);
                        }
                    }
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// The bytes one token stands for in decoded text (what logprobs report per token), where the tokenizer says
    /// so exactly: byte-level BPE (the bytes its characters map back to, special tokens as their text) and the
    /// SentencePiece path (`SpmBpe::token_bytes`). `Ok(None)` for other shapes; an error for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Result<Option<Vec<u8>>, TokenizerError> {
        self.check_ids(&[id])?;
        Ok(match (&self.token_bytes, &self.backend) {
            (Some(tb), _) => tb.get(id).map(|(bytes, _)| bytes.to_vec()),
            (None, Backend::Spm(spm)) => spm.token_bytes(id),
            (None, Backend::Crate(_) | Backend::Vocab(_)) => None,
        })
    }

    /// Whether ByteFallback decodes token `id` as a byte (`<0xHH>`).
    fn is_byte_token(&self, id: u32) -> bool {
        match &self.backend {
            Backend::Spm(spm) => spm.id_to_token(id).is_some_and(spm::is_byte_token),
            _ => self.id_to_token(id).is_some_and(|t| spm::is_byte_token(&t)),
        }
    }

    /// A streaming decoder: see `IncrementalDecoder`.
    pub fn decoder(self: &Arc<Self>, skip_special_tokens: bool) -> IncrementalDecoder {
        IncrementalDecoder {
            tk: Arc::clone(self),
            skip_special_tokens,
            pending: Vec::new(),
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// The added-token split of `text`, with long plain-text segments cut at
/// safe places into parts of about `CHUNK` bytes.
fn parts<'t>(fast: &FastBpe, text: &'t str) -> Vec<Segment<'t>> {
    let mut out = Vec::new();
    fast.segments(text, &mut |seg| match seg {
        Segment::Text(t) if t.len() > 2 * CHUNK => {
            let b = t.as_bytes();
            let mut start = 0;
            let mut p = CHUNK;
            while p < b.len() {
                if pretok::is_safe_cut(fast.classes(), b, p) {
                    out.push(Segment::Text(&t[start..p]));
                    start = p;
                    p += CHUNK;
                } else {
                    p += 1;
                }
            }
            out.push(Segment::Text(&t[start..]));
        }
        seg => out.push(seg),
    });
    out
}

fn count_segment(fast: &FastBpe, seg: &Segment<'_>) -> usize {
    match seg {
        Segment::Added(_) => 1,
        Segment::Text(t) => {
            let mut n = 0;
            let mut cache = WordCache::new();
            let mut scratch = Vec::new();
            fast.pieces(t, |p| n += cache.count(fast, p.as_bytes(), &mut scratch));
            n
        }
    }
}

fn encode_segment<'t>(fast: &FastBpe, seg: &Segment<'t>, out: &mut Vec<u32>, cache: &mut WordCache<'t>) {
    match seg {
        Segment::Added(id) => out.push(*id),
        Segment::Text(t) => fast.pieces(t, |p| cache.encode(fast, p.as_bytes(), out)),
    }
}

/// Turns token ids into text as they arrive. The concatenation of every
/// `push` and the final `flush` equals `decode` of all the ids.
///
/// Byte-level tokenizers: the bytes of each token are appended to a buffer
/// and only complete UTF-8 is emitted; invalid bytes become U+FFFD exactly
/// where `String::from_utf8_lossy` (which the crate's decoder ends with) puts
/// them. Other decoders: the window of ids since the last emitted text is
/// re-decoded (as text-generation-inference does) and text is held back while
/// it ends in U+FFFD.
pub struct IncrementalDecoder {
    tk: Arc<Tokenizer>,
    skip_special_tokens: bool,
    pending: Vec<u8>,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl IncrementalDecoder {
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.push_many(&[id])
    }

    pub fn push_many(&mut self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.tk.check_ids(ids)?;
        let mut out = String::new();
        if let Some(tb) = &self.tk.token_bytes {
            // `check_ids` asked `tb.get` already: every id is there.
            for (bytes, special) in ids.iter().filter_map(|&id| tb.get(id)) {
                if !(special && self.skip_special_tokens) {
                    self.pending.extend_from_slice(bytes);
                }
            }
            drain_utf8(&mut self.pending, &mut out, false);
            return Ok(out);
        }
        for &id in ids {
            self.ids.push(id);
            out.push_str(&self.window(false)?);
        }
        Ok(out)
    }

    pub fn flush(&mut self) -> Result<String, TokenizerError> {
        let mut out = String::new();
        if self.tk.token_bytes.is_some() {
            drain_utf8(&mut self.pending, &mut out, true);
            return Ok(out);
        }
        out.push_str(&self.window(true)?);
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        Ok(out)
    }

    fn window(&mut self, last: bool) -> Result<String, TokenizerError> {
        if !last && self.tk.byte_fallback {
            // A byte token may be followed by more of its run: wait for the run's end.
            if self.ids.last().is_some_and(|&id| self.tk.is_byte_token(id)) {
                return Ok(String::new());
            }
        }
        let before = self.tk.decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let now = self.tk.decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        if now.len() > before.len() && (last || !now.ends_with('\u{FFFD}')) {
            if let Some(new) = now.strip_prefix(before.as_str()) {
                self.prefix = self.read;
                self.read = self.ids.len();
                return Ok(new.to_string());
            }
        }
        Ok(String::new())
    }
}

/// Moves the complete UTF-8 at the start of `pending` into `out` (invalid
/// sequences as U+FFFD); an incomplete character at the end stays, unless
/// `last`, when it also becomes U+FFFD.
fn drain_utf8(pending: &mut Vec<u8>, out: &mut String, last: bool) {
    let mut pos = 0;
    while pos < pending.len() {
        match std::str::from_utf8(&pending[pos..]) {
            Ok(s) => {
                out.push_str(s);
                pos = pending.len();
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&pending[pos..pos + valid]).expect("valid prefix"));
                pos += valid;
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        pos += n;
                    }
                    None if last => {
                        out.push('\u{FFFD}');
                        pos = pending.len();
                    }
                    None => break,
                }
            }
        }
    }
    pending.drain(..pos);
}

#[cfg(test)]
mod tests;
