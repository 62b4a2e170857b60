//! The exact fast path for GPT-2-style byte-level BPE tokenizers.
//!
//! `FastBpe::from_file` (the crate not loaded at all; also needs a ByteLevel
//! decoder and every added token in the vocabulary) and `FastBpe::beside`
//! (beside the crate) read the file themselves and accept only a shape they
//! fully
//! reproduces (no normalizer; pre-tokenizer ByteLevel(add_prefix_space=false,
//! use_regex=true), optionally after Digits; a BPE model without dropout,
//! subword prefix/suffix, with all 256 byte symbols; added tokens without
//! strip/single-word rules; post-processor none, ByteLevel or a single-sequence
//! TemplateProcessing; no truncation or padding). Anything else returns `None`
//! and the caller uses the `tokenizers` crate itself.
//!
//! What it computes is what the crate computes: added tokens are cut out
//! first (leftmost-longest, non-normalized tokens before normalized ones),
//! the rest is pre-tokenized (see `pretok`), and every piece is merged by
//! lowest merge rank, leftmost first, like the crate's `Word::merge_all`.
use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::Value;
use std::collections::BinaryHeap;
use std::cmp::Reverse;

use super::file::{merge_list, File, Vocab};
use super::pretok::{self, Classes, Digits};

/// GPT-2's byte -> printable character table (`bytes_to_unicode`).
pub fn byte_to_char() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

/// Inverse of `byte_to_char`: the bytes a byte-level token stands for, or
/// `None` when it holds a character outside the alphabet.
pub fn token_bytes(token: &str, table: &FxHashMap<char, u8>) -> Option<Vec<u8>> {
    token.chars().map(|c| table.get(&c).copied()).collect()
}

pub fn char_to_byte() -> FxHashMap<char, u8> {
    byte_to_char().iter().enumerate().map(|(b, c)| (*c, b as u8)).collect()
}

/// A text segment after added-token splitting.
pub enum Segment<'t> {
    Text(&'t str),
    Added(u32),
}

/// Cuts added tokens out of a text exactly like the crate's
/// `AddedVocabulary::extract_and_normalize` without a normalizer.
pub(super) struct AddedSplitter {
    raw: Option<(AhoCorasick, Vec<u32>)>,
    normalized: Option<(AhoCorasick, Vec<u32>)>,
}

impl AddedSplitter {
    /// The splitter of these (content, id) tokens, matched on the raw text
    /// and on the normalized text; `None` when a set cannot be built.
    pub(super) fn new(raw: &[(String, u32)], normalized: &[(String, u32)]) -> Option<AddedSplitter> {
        let with_ids = |tokens: &[(String, u32)]| -> Option<Option<(AhoCorasick, Vec<u32>)>> {
            if tokens.is_empty() {
                return Some(None);
            }
            Some(Some((Self::build(tokens)?, tokens.iter().map(|t| t.1).collect())))
        };
        Some(AddedSplitter { raw: with_ids(raw)?, normalized: with_ids(normalized)? })
    }

    fn build(tokens: &[(String, u32)]) -> Option<AhoCorasick> {
        if tokens.is_empty() {
            return None;
        }
        AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(c, _)| c.as_str()))
            .ok()
    }

    fn split_with<'t>(ac: &(AhoCorasick, Vec<u32>), text: &'t str, out: &mut dyn FnMut(Segment<'t>)) {
        let mut last = 0;
        for m in ac.0.find_iter(text) {
            if m.start() > last {
                out(Segment::Text(&text[last..m.start()]));
            }
            out(Segment::Added(ac.1[m.pattern().as_usize()]));
            last = m.end();
        }
        if last < text.len() {
            out(Segment::Text(&text[last..]));
        }
    }

    pub(super) fn split<'t>(&self, text: &'t str, out: &mut dyn FnMut(Segment<'t>)) {
        match (&self.raw, &self.normalized) {
            (None, None) => {
                if !text.is_empty() {
                    out(Segment::Text(text))
                }
            }
            (Some(raw), None) => Self::split_with(raw, text, out),
            (None, Some(norm)) => Self::split_with(norm, text, out),
            (Some(raw), Some(norm)) => Self::split_with(raw, text, &mut |seg| match seg {
                Segment::Text(t) => Self::split_with(norm, t, out),
                added => out(added),
            }),
        }
    }
}

/// Words at least this long use the heap merge (O(n log n)); shorter ones
/// the simple scan, which is faster for the usual few-byte words.
const HEAP_MERGE_MIN: usize = 48;
/// `byte_id` of a byte the vocabulary has no token for.
const MISSING: u32 = u32::MAX;

pub struct FastBpe {
    classes: &'static Classes,
    digits: Digits,
    added: AddedSplitter,
    byte_id: [u32; 256],
    /// Some byte has no token (`MISSING` in `byte_id`).
    missing: bool,
    /// (left id << 32 | right id) -> (rank, merged id)
    merges: FxHashMap<u64, (u32, u32)>,
    /// `ignore_merges`: words found whole in the vocabulary (as raw bytes).
    whole_words: Option<FxHashMap<Vec<u8>, u32>>,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

fn is_false(v: Option<&Value>) -> bool {
    matches!(v, None | Some(Value::Bool(false)))
}

impl FastBpe {
    /// The fast path read from the file itself, with its vocabulary, so that
    /// the crate need not be loaded at all: where the decoder is ByteLevel
    /// (decoding is then each token's bytes, joined, as lossy UTF-8:
    /// `TokenBytes`) and every added token is the vocabulary's token at its
    /// own id. Returns the fast path, the vocabulary and the ids of the special
    /// added tokens.
    pub fn from_file(file: &File<'_>) -> Option<(FastBpe, Vocab, FxHashSet<u32>)> {
        if file.shape.decoder.get("type").and_then(Value::as_str) != Some("ByteLevel") {
            return None;
        }
        Self::read(file, None)
    }

    /// The fast path beside the crate's `tk`, loaded from the same file (any
    /// decoder; added tokens may lie outside the model's vocabulary, at the
    /// ids the crate gave them).
    pub fn beside(file: &File<'_>, tk: &tokenizers::Tokenizer) -> Option<FastBpe> {
        Self::read(file, Some(tk)).map(|(fast, _, _)| fast)
    }

    fn read(file: &File<'_>, beside: Option<&tokenizers::Tokenizer>) -> Option<(FastBpe, Vocab, FxHashSet<u32>)> {
        let (shape, model) = (&file.shape, &file.model);
        if !shape.normalizer.is_null() || !shape.truncation.is_null() || !shape.padding.is_null() {
            return None;
        }
        let digits = pre_tokenizer_shape(&shape.pre_tokenizer)?;
        let (prefix, suffix) = post_processor_shape(Some(&shape.post_processor))?;
        if model.kind.as_deref() != Some("BPE")
            || model.dropout.is_some_and(|d| d != 0.0)
            || model.continuing_subword_prefix.as_deref().is_some_and(|p| !p.is_empty())
            || model.end_of_word_suffix.as_deref().is_some_and(|p| !p.is_empty())
        {
            return None;
        }
        let vocab = Vocab::new(&model.vocab.0)?;
        if beside.is_none() && !vocab.dense() {
            return None; // the vocabulary is the tokenizer's: every id must have a token
        }
        let b2c = byte_to_char();
        let mut byte_id = [MISSING; 256];
        for (b, id) in byte_id.iter_mut().enumerate() {
            *id = vocab.lookup(b2c[b].to_string().as_bytes()).unwrap_or(MISSING);
        }
        // A byte without a token is dropped by the crate when there is no
        // unk token and no byte fallback (SmolLM2 lacks 21, e.g. 0x04, 0xF5):
        // do the same; with either of those, leave it to the crate.
        let missing = byte_id.contains(&MISSING);
        if missing && (model.unk_token.is_some() || model.byte_fallback == Some(true)) {
            return None;
        }
        let mut merges = FxHashMap::default();
        merges.reserve(model.merges.len());
        for (a, b, rank, to) in merge_list(&model.merges, &vocab)? {
            merges.insert((a as u64) << 32 | b as u64, (rank, to)); // a pair listed twice keeps its last rank
        }
        let whole_words = (model.ignore_merges == Some(true)).then(|| {
            let c2b = char_to_byte();
            (0..vocab.len() as u32)
                .filter_map(|id| Some((token_bytes(vocab.token(id)?, &c2b)?, id)))
                .collect::<FxHashMap<_, _>>()
        });
        let (mut raw, mut normalized, mut special) = (vec![], vec![], FxHashSet::default());
        let mut ids = FxHashSet::default();
        for t in &shape.added_tokens {
            let id = match beside {
                None => vocab.lookup(t.content.as_bytes()),
                Some(tk) => tk.token_to_id(&t.content),
            };
            if t.single_word || t.lstrip || t.rstrip || t.content.is_empty() || id != Some(t.id) || !ids.insert(t.id) {
                return None;
            }
            if t.special {
                special.insert(t.id);
            }
            if t.normalized { &mut normalized } else { &mut raw }.push((t.content.clone(), t.id));
        }
        if beside.is_none() && prefix.iter().chain(&suffix).any(|&id| id as usize >= vocab.len()) {
            return None;
        }
        let added = AddedSplitter::new(&raw, &normalized)?;
        let fast = FastBpe { classes: pretok::classes(), digits, added, byte_id, missing, merges, whole_words, prefix, suffix };
        Some((fast, vocab, special))
    }

    pub fn special_ids(&self, add_special_tokens: bool) -> (&[u32], &[u32]) {
        if add_special_tokens {
            (&self.prefix, &self.suffix)
        } else {
            (&[], &[])
        }
    }

    /// Whether some bytes have no token and are dropped.
    pub fn drops_bytes(&self) -> bool {
        self.missing
    }

    pub fn classes(&self) -> &'static Classes {
        self.classes
    }

    /// Added-token split of a whole text.
    pub fn segments<'t>(&self, text: &'t str, out: &mut dyn FnMut(Segment<'t>)) {
        self.added.split(text, out)
    }

    /// Pre-tokenized pieces of a segment of plain text.
    #[inline]
    pub fn pieces<'t>(&self, text: &'t str, f: impl FnMut(&'t str)) {
        pretok::for_each_piece(self.classes, self.digits, text, f)
    }

    #[inline(always)]
    fn merge_of(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.merges.get(&((a as u64) << 32 | b as u64)).copied()
    }

    /// BPE of one piece; appends its ids to `out`.
    pub fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if let Some(words) = &self.whole_words {
            if let Some(id) = words.get(piece) {
                out.push(*id);
                return;
            }
        }
        let start = out.len();
        out.extend(piece.iter().map(|b| self.byte_id[*b as usize]));
        if self.missing {
            let mut kept = start;
            for i in start..out.len() {
                if out[i] != MISSING {
                    out[kept] = out[i];
                    kept += 1;
                }
            }
            out.truncate(kept);
        }
        let n = out.len() - start;
        if n < 2 {
            return;
        }
        if n >= HEAP_MERGE_MIN {
            let merged = merge_heap(&out[start..], |a, b| self.merge_of(a, b));
            out.truncate(start);
            out.extend(merged);
        } else {
            self.merge_scan(out, start);
        }
    }

    /// The lowest-rank, leftmost merge until none applies, on `ids[start..]`
    /// in place. Keeps each pair's rank so a merge costs two lookups.
    fn merge_scan(&self, ids: &mut Vec<u32>, start: usize) {
        let mut ranks: [(u32, u32); HEAP_MERGE_MIN] = [(u32::MAX, 0); HEAP_MERGE_MIN];
        let mut n = ids.len() - start;
        let sym = &mut ids[start..];
        for i in 0..n - 1 {
            ranks[i] = self.merge_of(sym[i], sym[i + 1]).unwrap_or((u32::MAX, 0));
        }
        loop {
            let mut best = u32::MAX;
            let mut at = 0;
            for (i, r) in ranks[..n - 1].iter().enumerate() {
                if r.0 < best {
                    best = r.0;
                    at = i;
                }
            }
            if best == u32::MAX {
                break;
            }
            sym[at] = ranks[at].1;
            sym.copy_within(at + 2..n, at + 1);
            ranks.copy_within(at + 1..n - 1, at);
            n -= 1;
            if at > 0 {
                ranks[at - 1] = self.merge_of(sym[at - 1], sym[at]).unwrap_or((u32::MAX, 0));
            }
            if at + 1 < n {
                ranks[at] = self.merge_of(sym[at], sym[at + 1]).unwrap_or((u32::MAX, 0));
            }
            if n == 1 {
                break;
            }
        }
        ids.truncate(start + n);
    }
}

/// The same merge order with a priority queue of (rank, position), for
/// long words; stale entries are skipped as in the crate (`Word::merge_all`).
/// `merge_of(left, right)` is a pair's (rank, merged id).
pub(super) fn merge_heap(syms: &[u32], merge_of: impl Fn(u32, u32) -> Option<(u32, u32)>) -> Vec<u32> {
    let n = syms.len();
    let mut id = syms.to_vec();
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let mut alive = vec![true; n];
    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        if let Some((rank, new_id)) = merge_of(id[i], id[i + 1]) {
            heap.push(Reverse((rank, i, new_id)));
        }
    }
    while let Some(Reverse((_, pos, new_id))) = heap.pop() {
        if !alive[pos] || next[pos] >= n {
            continue;
        }
        let right = next[pos];
        if merge_of(id[pos], id[right]).map(|m| m.1) != Some(new_id) {
            continue;
        }
        id[pos] = new_id;
        alive[right] = false;
        next[pos] = next[right];
        if next[pos] < n {
            prev[next[pos]] = pos;
        }
        if prev[pos] < n {
            let p = prev[pos];
            if let Some((rank, nid)) = merge_of(id[p], id[pos]) {
                heap.push(Reverse((rank, p, nid)));
            }
        }
        if next[pos] < n {
            if let Some((rank, nid)) = merge_of(id[pos], id[next[pos]]) {
                heap.push(Reverse((rank, pos, nid)));
            }
        }
    }
    (0..n).filter(|i| alive[*i]).map(|i| id[i]).collect()
}

/// `None` unless the pre-tokenizer is ByteLevel (no prefix space, GPT-2
/// regex), alone or after one Digits step.
fn pre_tokenizer_shape(pt: &Value) -> Option<Digits> {
    let byte_level = |v: &Value| {
        v.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && is_false(v.get("add_prefix_space"))
            && v.get("use_regex").and_then(Value::as_bool).unwrap_or(true)
    };
    if byte_level(pt) {
        return Some(Digits::None);
    }
    if pt.get("type")?.as_str()? != "Sequence" {
        return None;
    }
    match pt.get("pretokenizers")?.as_array()?.as_slice() {
        [only] if byte_level(only) => Some(Digits::None),
        [digits, last] if byte_level(last) && digits.get("type")?.as_str()? == "Digits" => {
            if digits.get("individual_digits")?.as_bool()? {
                Some(Digits::Individual)
            } else {
                Some(Digits::Contiguous)
            }
        }
        _ => None,
    }
}

/// The ids a post-processor puts before and after a single sequence.
pub(super) fn post_processor_shape(pp: Option<&Value>) -> Option<(Vec<u32>, Vec<u32>)> {
    let pp = match pp {
        None | Some(Value::Null) => return Some((vec![], vec![])),
        Some(v) => v,
    };
    match pp.get("type")?.as_str()? {
        "ByteLevel" => Some((vec![], vec![])),
        "Sequence" => {
            let mut out = (vec![], vec![]);
            for p in pp.get("processors")?.as_array()? {
                let (pre, post) = post_processor_shape(Some(p))?;
                if !pre.is_empty() || !post.is_empty() {
                    if !out.0.is_empty() || !out.1.is_empty() {
                        return None;
                    }
                    out = (pre, post);
                }
            }
            Some(out)
        }
        "TemplateProcessing" => {
            let specials = pp.get("special_tokens")?.as_object()?;
            let (mut pre, mut post, mut seen) = (vec![], vec![], 0);
            for piece in pp.get("single")?.as_array()? {
                if let Some(seq) = piece.get("Sequence") {
                    if seq.get("id")?.as_str()? != "A" {
                        return None;
                    }
                    seen += 1;
                } else {
                    let name = piece.get("SpecialToken")?.get("id")?.as_str()?;
                    let ids = specials.get(name)?.get("ids")?.as_array()?;
                    let target = if seen == 0 { &mut pre } else { &mut post };
                    for id in ids {
                        target.push(u32::try_from(id.as_u64()?).ok()?);
                    }
                }
            }
            (seen == 1).then_some((pre, post))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_to_char();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        let c2b = char_to_byte();
        assert_eq!(c2b.len(), 256);
        assert_eq!(token_bytes("Ġhello", &c2b).unwrap(), b" hello");
        assert_eq!(token_bytes("<|im_start|>", &c2b).unwrap(), b"<|im_start|>");
        assert!(token_bytes("日", &c2b).is_none());
    }
}
