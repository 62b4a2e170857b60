//! The GPT-2 byte-level pre-tokenizer, hand-written.
//!
//! It splits text exactly where the `tokenizers` crate's ByteLevel step does
//! with the regex
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//! (optionally after a `Digits` step), without running a backtracking regex.
//!
//! Exactness depends on using the same character classes as the crate: the
//! crate runs that regex on Oniguruma, whose Unicode tables may be older or
//! newer than Rust's. So the classes `\p{L}`, `\p{N}` and `\s` are read once
//! per process out of Oniguruma itself (scanning a string of every scalar
//! value), and the `Digits` step uses `char::is_numeric`, as the crate does.
use std::sync::OnceLock;

const L: u8 = 1; // \p{L}
const N: u8 = 2; // \p{N}
const WS: u8 = 4; // \s
const NUMERIC: u8 = 8; // char::is_numeric (the Digits pre-tokenizer)

/// Character classes of every scalar value, as a two-level table: 256-entry
/// blocks (deduplicated; most of the code space shares a few blocks) indexed
/// by the code point's high bits.
pub struct Classes {
    index: Vec<u16>,
    blocks: Vec<[u8; 256]>,
}

impl Classes {
    fn build() -> Classes {
        let mut flat = vec![0u8; 0x11_0000];
        let mut all = String::with_capacity(4 * 0x11_0000);
        for cp in 0..0x11_0000u32 {
            if let Some(c) = char::from_u32(cp) {
                all.push(c);
                if c.is_numeric() {
                    flat[cp as usize] |= NUMERIC;
                }
            }
        }
        for (pattern, flag) in [(r"\p{L}+", L), (r"\p{N}+", N), (r"\s+", WS)] {
            let re = onig::Regex::new(pattern).expect("constant pattern");
            for (start, end) in re.find_iter(&all) {
                for c in all[start..end].chars() {
                    flat[c as usize] |= flag;
                }
            }
        }
        let mut index = Vec::with_capacity(0x11_0000 / 256);
        let mut blocks: Vec<[u8; 256]> = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for chunk in flat.chunks_exact(256) {
            let block: [u8; 256] = chunk.try_into().expect("256 bytes");
            let next = blocks.len() as u16;
            let at = *seen.entry(block).or_insert_with(|| {
                blocks.push(block);
                next
            });
            index.push(at);
        }
        Classes { index, blocks }
    }

    #[inline(always)]
    fn of(&self, c: u32) -> u8 {
        self.blocks[self.index[(c >> 8) as usize] as usize][(c & 0xff) as usize]
    }
}

/// The process-wide class table (built on first use, about 0.1 s).
pub fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(Classes::build)
}

/// How the optional `Digits` step before ByteLevel splits numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Digits {
    None,
    /// `Digits(individual_digits=true)`: every numeric character alone.
    Individual,
    /// `Digits(individual_digits=false)`: runs of numeric characters.
    Contiguous,
}

/// Class and UTF-8 length of the character starting at byte `i` of a `str`.
#[inline(always)]
fn class_at(cls: &Classes, b: &[u8], i: usize) -> (u8, usize) {
    let b0 = b[i];
    if b0 < 0x80 {
        return (cls.blocks[cls.index[0] as usize][b0 as usize], 1);
    }
    // `b` comes from a `str`, so the sequence is valid UTF-8.
    let (cp, len) = if b0 < 0xE0 {
        (((b0 as u32 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 as u32 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((b0 as u32 & 0x07) << 18)
                | ((b[i + 1] as u32 & 0x3F) << 12)
                | ((b[i + 2] as u32 & 0x3F) << 6)
                | (b[i + 3] as u32 & 0x3F),
            4,
        )
    };
    (cls.of(cp), len)
}

#[inline(always)]
fn is_other(class: u8) -> bool {
    class & (L | N | WS) == 0
}

/// End of the run of characters satisfying `keep`, starting at `i`.
#[inline(always)]
fn run_end(cls: &Classes, b: &[u8], mut i: usize, keep: impl Fn(u8) -> bool) -> usize {
    while i < b.len() {
        let (c, len) = class_at(cls, b, i);
        if !keep(c) {
            break;
        }
        i += len;
    }
    i
}

/// End of the regex match that starts at byte `i` of `b` (the regex always
/// matches at the start of the rest of its piece: its alternatives cover
/// every character, so the pieces tile the input).
#[inline]
fn piece_end(cls: &Classes, b: &[u8], i: usize) -> usize {
    let n = b.len();
    let b0 = b[i];
    // 's 't 're 've 'm 'll 'd
    if b0 == b'\'' && i + 1 < n {
        match b[i + 1] {
            b's' | b't' | b'm' | b'd' => return i + 2,
            b'r' | b'v' if i + 2 < n && b[i + 2] == b'e' => return i + 3,
            b'l' if i + 2 < n && b[i + 2] == b'l' => return i + 3,
            _ => {}
        }
    }
    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`, in that order
    let (c0, len0) = class_at(cls, b, i);
    let (start, class) = if b0 == b' ' && i + 1 < n {
        let (c1, _) = class_at(cls, b, i + 1);
        (i + 1, c1)
    } else {
        (i, c0)
    };
    if class & L != 0 {
        return run_end(cls, b, start, |c| c & L != 0);
    }
    if class & N != 0 {
        return run_end(cls, b, start, |c| c & N != 0);
    }
    if is_other(class) {
        return run_end(cls, b, start, is_other);
    }
    // Here the character at `i` is whitespace (a ' ' followed by whitespace
    // or by nothing cannot start the three alternatives above either).
    // `\s+(?!\S)` then `\s+`: a whitespace run leaves its last character to
    // the next piece when a non-space follows and the run is longer than one.
    let mut j = i + len0;
    let mut last = i;
    while j < n {
        let (c, len) = class_at(cls, b, j);
        if c & WS == 0 {
            return if last > i { last } else { j };
        }
        last = j;
        j += len;
    }
    n
}

/// Calls `f` with every pre-tokenized piece of `text` (no added tokens in it),
/// in order. Pieces are never empty.
#[inline]
pub fn for_each_piece<'t>(cls: &Classes, digits: Digits, text: &'t str, mut f: impl FnMut(&'t str)) {
    let b = text.as_bytes();
    let scan = |s: usize, e: usize, f: &mut dyn FnMut(&'t str)| {
        let seg = &b[..e];
        let mut i = s;
        while i < e {
            let end = piece_end(cls, seg, i);
            f(&text[i..end]);
            i = end;
        }
    };
    if digits == Digits::None {
        scan(0, b.len(), &mut f);
        return;
    }
    // The Digits step isolates numeric characters first; the regex then runs
    // on each part separately (so "  1" gives "  ", "1", not " ", " 1").
    let mut i = 0;
    let mut seg_start = 0;
    while i < b.len() {
        let (c, len) = class_at(cls, b, i);
        if c & NUMERIC != 0 {
            scan(seg_start, i, &mut f);
            let mut end = i + len;
            if digits == Digits::Contiguous {
                end = run_end(cls, b, end, |c| c & NUMERIC != 0);
                scan(i, end, &mut f);
            } else {
                f(&text[i..end]);
            }
            i = end;
            seg_start = end;
        } else {
            i += len;
        }
    }
    scan(seg_start, b.len(), &mut f);
}

/// Is `p` a place where pieces always break, whatever surrounds it? True
/// between an ASCII non-space and an ASCII whitespace ("x" | " y", "):" |
/// "\n"): the piece holding the non-space comes from an alternative whose
/// runs never take whitespace, and from `p` on the scan only looks forward.
/// Used to cut large texts into parts counted in parallel.
pub fn is_safe_cut(cls: &Classes, b: &[u8], p: usize) -> bool {
    if p == 0 || p >= b.len() || b[p - 1] >= 0x80 || b[p] >= 0x80 {
        return false;
    }
    let ws = |i: usize| class_at(cls, b, i).0 & WS != 0;
    !ws(p - 1) && ws(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(digits: Digits, text: &str) -> Vec<&str> {
        let mut out = vec![];
        for_each_piece(classes(), digits, text, |p| out.push(p));
        out
    }

    #[test]
    fn gpt2_examples() {
        assert_eq!(pieces(Digits::None, "Hello world"), ["Hello", " world"]);
        assert_eq!(pieces(Digits::None, "   x"), ["  ", " x"]);
        assert_eq!(pieces(Digits::None, "a  \n\tb"), ["a", "  \n", "\t", "b"]);
        assert_eq!(pieces(Digits::None, "x   "), ["x", "   "]);
        assert_eq!(pieces(Digits::None, "I'll don't 'x ''s"), ["I", "'ll", " don", "'t", " '", "x", " ''", "s"]);
        assert_eq!(pieces(Digits::None, "abc123 45"), ["abc", "123", " 45"]);
        assert_eq!(pieces(Digits::None, "f(x)=y;"), ["f", "(", "x", ")=", "y", ";"]);
        assert_eq!(pieces(Digits::None, "é 日本語 😀!"), ["é", " 日本語", " 😀!"]);
    }

    #[test]
    fn digits_split_before_the_regex() {
        assert_eq!(pieces(Digits::Individual, "  1"), ["  ", "1"]);
        assert_eq!(pieces(Digits::Individual, "a12 b"), ["a", "1", "2", " b"]);
        assert_eq!(pieces(Digits::Contiguous, "a12 b"), ["a", "12", " b"]);
        assert_eq!(pieces(Digits::Individual, "x ٣"), ["x", " ", "٣"]);
    }

    #[test]
    fn classes_agree_with_unicode_for_common_characters() {
        let c = classes();
        assert_eq!(c.of('a' as u32) & L, L);
        assert_eq!(c.of('日' as u32) & L, L);
        assert_eq!(c.of('7' as u32) & (N | NUMERIC), N | NUMERIC);
        assert_eq!(c.of(' ' as u32) & WS, WS);
        assert_eq!(c.of('\u{3000}' as u32) & WS, WS);
        assert!(is_other(c.of('!' as u32)));
        assert!(is_other(c.of('😀' as u32)));
    }

    #[test]
    fn safe_cuts_do_not_change_pieces() {
        let texts = [
            "def f(x):\n    return x  \n\nclass A:\n\tpass\nx=1\n2\r\ny\n\n z\n's\n\t\nq",
            include_str!("bpe.rs"),
        ];
        let mut cuts = 0;
        for text in texts {
            for digits in [Digits::None, Digits::Individual] {
                let all = pieces(digits, text);
                let b = text.as_bytes();
                for p in 1..b.len() {
                    if is_safe_cut(classes(), b, p) {
                        cuts += 1;
                        let mut split = pieces(digits, &text[..p]);
                        split.extend(pieces(digits, &text[p..]));
                        assert_eq!(split, all, "cut at {p}");
                    }
                }
            }
        }
        assert!(cuts > 100);
    }
}
