//! tokenizer.json read without the `tokenizers` crate, for the paths that do
//! without it (`spm`, and the byte-level BPE in `bpe`): the parts that decide
//! a tokenizer's shape as JSON values, the model typed with its strings
//! borrowed from the file where no escape forces a copy, and the vocabulary
//! as one byte arena with a hash table of ids.
use hashbrown::HashTable;
use rustc_hash::FxHasher;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;
use std::hash::Hasher;

/// An id slot with no token.
pub(super) const NONE: u32 = u32::MAX;

/// A tokenizer.json: its shape and its model, both borrowing from the text.
pub(super) struct File<'a> {
    pub(super) shape: Shape<'a>,
    pub(super) model: Model<'a>,
}

impl<'a> File<'a> {
    /// `None` for anything that is not a BPE model's file serde can read; the
    /// crate then loads it (and reports what is wrong).
    pub(super) fn parse(json: &'a str) -> Option<File<'a>> {
        let shape: Shape = serde_json::from_str(json).ok()?;
        let model: Model = serde_json::from_str(shape.model.get()).ok()?;
        Some(File { shape, model })
    }
}

/// The parts of a tokenizer.json that decide the shape; the model stays raw
/// until the shape is known.
#[derive(Deserialize)]
pub(super) struct Shape<'a> {
    #[serde(default)]
    pub(super) normalizer: Value,
    #[serde(default)]
    pub(super) pre_tokenizer: Value,
    #[serde(default)]
    pub(super) post_processor: Value,
    #[serde(default)]
    pub(super) decoder: Value,
    #[serde(default)]
    pub(super) truncation: Value,
    #[serde(default)]
    pub(super) padding: Value,
    #[serde(default)]
    pub(super) added_tokens: Vec<AddedToken>,
    #[serde(borrow)]
    pub(super) model: &'a RawValue,
}

#[derive(Deserialize)]
pub(super) struct AddedToken {
    pub(super) id: u32,
    pub(super) content: String,
    #[serde(default)]
    pub(super) single_word: bool,
    #[serde(default)]
    pub(super) lstrip: bool,
    #[serde(default)]
    pub(super) rstrip: bool,
    #[serde(default)]
    pub(super) normalized: bool,
    #[serde(default)]
    pub(super) special: bool,
}

/// (A missing optional field reads as None: serde's own rule for `Option`.)
#[derive(Deserialize)]
pub(super) struct Model<'a> {
    #[serde(rename = "type", default)]
    pub(super) kind: Option<Cow<'a, str>>,
    pub(super) dropout: Option<f64>,
    pub(super) unk_token: Option<String>,
    pub(super) continuing_subword_prefix: Option<String>,
    pub(super) end_of_word_suffix: Option<String>,
    pub(super) fuse_unk: Option<bool>,
    pub(super) byte_fallback: Option<bool>,
    pub(super) ignore_merges: Option<bool>,
    #[serde(borrow)]
    pub(super) vocab: Entries<'a>,
    #[serde(borrow)]
    pub(super) merges: Vec<Merge<'a>>,
}

/// A JSON object's entries in file order (the vocabulary: token -> id),
/// borrowed from the file where no escape forces a copy.
pub(super) struct Entries<'a>(pub(super) Vec<(Cow<'a, str>, u64)>);

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Entries<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of token -> id")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Entries<'a>, M::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((k, v)) = map.next_entry::<Cow<'a, str>, u64>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// One merge: `"left right"` (the legacy string form) or `["left", "right"]`.
pub(super) enum Merge<'a> {
    Line(Cow<'a, str>),
    Pair(Cow<'a, str>, Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for Merge<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Merge<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a merge")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Merge<'a>, E> {
                Ok(Merge::Line(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Merge<'a>, E> {
                Ok(Merge::Line(Cow::Owned(s.to_owned())))
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Merge<'a>, S::Error> {
                let a: Cow<'a, str> = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let b: Cow<'a, str> = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(Merge::Pair(a, b))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

fn hash(s: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(s);
    h.finish()
}

/// A vocabulary of distinct tokens with ids below n (`dense` when every id in
/// 0..n has one): every token's text in one arena, and the ids in a hash table
/// keyed by that text.
pub(super) struct Vocab {
    /// Every token's text, id after id (nothing for an id without a token).
    arena: Vec<u8>,
    /// Token `id` is `arena[offsets[id]..offsets[id + 1]]`.
    offsets: Vec<u32>,
    /// Which ids have a token.
    present: Vec<bool>,
    /// Ids, hashed by their token's text.
    index: HashTable<u32>,
}

impl Vocab {
    /// `None` for a token listed twice, an id given twice, or ids so sparse
    /// that a table by id would be mostly holes.
    pub(super) fn new(entries: &[(Cow<'_, str>, u64)]) -> Option<Vocab> {
        let n = entries.iter().map(|(_, id)| id.saturating_add(1)).max().unwrap_or(0);
        let n = usize::try_from(n).ok().filter(|&n| n <= 2 * entries.len() + 1024)?;
        let mut by_id: Vec<u32> = vec![NONE; n];
        for (i, (_, id)) in entries.iter().enumerate() {
            let slot = &mut by_id[*id as usize];
            if *slot != NONE {
                return None;
            }
            *slot = i as u32;
        }
        let total: usize = entries.iter().map(|(t, _)| t.len()).sum();
        let mut arena = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0u32);
        for &i in &by_id {
            if i != NONE {
                arena.extend_from_slice(entries[i as usize].0.as_bytes());
            }
            offsets.push(u32::try_from(arena.len()).ok()?);
        }
        let present = by_id.iter().map(|&i| i != NONE).collect();
        let mut vocab = Vocab { arena, offsets, present, index: HashTable::with_capacity(entries.len()) };
        for id in (0..n as u32).filter(|&id| vocab.present[id as usize]) {
            let text = vocab.text(id);
            if vocab.lookup(text).is_some() {
                return None; // the same token twice
            }
            let h = hash(text);
            let (arena, offsets) = (&vocab.arena, &vocab.offsets);
            vocab.index.insert_unique(h, id, |&other| {
                hash(&arena[offsets[other as usize] as usize..offsets[other as usize + 1] as usize])
            });
        }
        Some(vocab)
    }

    /// Every id in 0..len() has a token.
    pub(super) fn dense(&self) -> bool {
        self.index.len() == self.len()
    }

    pub(super) fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Token `id`'s text (`id` < `len()`; empty for an id without a token).
    pub(super) fn text(&self, id: u32) -> &[u8] {
        &self.arena[self.offsets[id as usize] as usize..self.offsets[id as usize + 1] as usize]
    }

    /// Token `id`'s text as a string, `None` past the vocabulary.
    pub(super) fn token(&self, id: u32) -> Option<&str> {
        if self.present.get(id as usize).copied().unwrap_or(false) {
            // The arena holds whole tokens, each from a JSON string.
            std::str::from_utf8(self.text(id)).ok()
        } else {
            None
        }
    }

    pub(super) fn lookup(&self, text: &[u8]) -> Option<u32> {
        self.index.find(hash(text), |&id| self.text(id) == text).copied()
    }
}

/// The merges as the crate reads them: (left, right, rank, merged id) in list
/// order, rank the position in the list (after `#version` lines for the string
/// form); every part and every joined pair must be a token, and the list one
/// form or the other. `None` otherwise.
pub(super) fn merge_list(merges: &[Merge<'_>], vocab: &Vocab) -> Option<Vec<(u32, u32, u32, u32)>> {
    let strings = merges.iter().all(|m| matches!(m, Merge::Line(_)));
    if !strings && !merges.iter().all(|m| matches!(m, Merge::Pair(..))) {
        return None;
    }
    let mut table = Vec::with_capacity(merges.len());
    let mut joined = Vec::new();
    let lines = merges.iter().filter(|m| !matches!(m, Merge::Line(l) if l.starts_with("#version")));
    for (rank, m) in lines.enumerate() {
        let (a, b) = match m {
            Merge::Line(l) => {
                let mut parts = l.split(' ');
                let (a, b) = (parts.next()?, parts.next()?);
                if parts.next().is_some() {
                    return None;
                }
                (a, b)
            }
            Merge::Pair(a, b) => (a.as_ref(), b.as_ref()),
        };
        joined.clear();
        joined.extend_from_slice(a.as_bytes());
        joined.extend_from_slice(b.as_bytes());
        let (a, b, to) = (vocab.lookup(a.as_bytes())?, vocab.lookup(b.as_bytes())?, vocab.lookup(&joined)?);
        table.push((a, b, u32::try_from(rank).ok()?, to));
    }
    Some(table)
}
