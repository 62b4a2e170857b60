//! Stop strings over streamed text, in time linear in the text whatever the stops.
//!
//! A completion streams as pieces of text (one per token). Text may be
//! emitted only once it cannot be the start of a stop string; when a stop
//! string appears, everything from the earliest one on is dropped. The
//! semantics, for each `push(piece)`, with `held` the text withheld so far:
//!
//! - `text = held + piece`; if any stop occurs in `text`, the answer is
//!   `text` up to the earliest start of an occurrence, and "stopped";
//!   `held` becomes empty (a later push starts afresh);
//! - otherwise `held` becomes the longest suffix of `text` that is a proper
//!   prefix of some stop, and the rest of `text` is the answer.
//!
//! `flush()` gives `held` back (the stream ended without a stop).
//!
//! # Why an automaton
//!
//! Checking each stop against the held text at every push costs, per push,
//! the held length times the stops' lengths (and, for the withheld suffix,
//! their squares), and the held text can be as long as a stop: crafted stops
//! made a 1,024-token completion cost seconds of the scheduler thread. An
//! Aho-Corasick automaton over the stops' UTF-8 bytes, whose state is kept
//! from one push to the next, reads each byte once: one transition
//! (amortized O(1), failure links included). Its state is the longest suffix
//! of the text read so far that is a prefix of a stop, so the state's depth
//! *is* the length of the text to withhold, and a match state lists the
//! stops ending here, whose lengths give their starts. UTF-8 is
//! self-synchronizing, so byte matches and the withheld suffix always fall
//! on character boundaries. The withheld bytes sit at the end of a buffer
//! that is compacted only when its dead front outgrows them, so keeping a
//! long suffix costs nothing per push either.
//!
//! # Bounds
//!
//! At most `MAX_STOPS` stop strings of at most `MAX_STOP_CHARS` characters:
//! OpenAI's API takes up to 4 stop sequences; 16 leaves room for
//! a model's own stops added to a request's. The automaton then has at most
//! 16 x 1,024 byte states, built in microseconds.

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::nfa::contiguous::NFA;
use aho_corasick::Anchored;
use rustc_hash::FxHashMap;

pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_CHARS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopError {
    TooMany { count: usize },
    TooLong { index: usize, chars: usize },
    /// The automaton could not be built (not expected within the bounds).
    Build,
}

impl std::fmt::Display for StopError {
    // Never the stop text itself: it is request content.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopError::TooMany { count } => write!(f, "at most {MAX_STOPS} stop strings are allowed, got {count}"),
            StopError::TooLong { index, chars } => write!(
                f,
                "stop string {index} is {chars} characters long; at most {MAX_STOP_CHARS} are allowed"
            ),
            StopError::Build => write!(f, "the stop strings could not be compiled"),
        }
    }
}

impl std::error::Error for StopError {}

/// The automaton and what it needs besides: built once per request.
struct Stops {
    nfa: NFA,
    /// Depth (bytes) of every state: the length of the withheld suffix.
    depth: FxHashMap<StateID, usize>,
    /// Bytes of the longest stop.
    longest: usize,
    /// The stops, by pattern id (empty ones left out).
    texts: Vec<String>,
}

impl Stops {
    fn new(stops: &[&str]) -> Result<Option<Stops>, StopError> {
        if stops.len() > MAX_STOPS {
            return Err(StopError::TooMany { count: stops.len() });
        }
        for (index, stop) in stops.iter().enumerate() {
            let chars = stop.chars().count();
            if chars > MAX_STOP_CHARS {
                return Err(StopError::TooLong { index, chars });
            }
        }
        // An empty stop would match everywhere; like the API, it means nothing.
        let stops: Vec<&str> = stops.iter().copied().filter(|s| !s.is_empty()).collect();
        if stops.is_empty() {
            return Ok(None);
        }
        let nfa = NFA::builder().prefilter(false).build(&stops).map_err(|_| StopError::Build)?;
        let start = nfa.start_state(Anchored::No).map_err(|_| StopError::Build)?;
        // Every state is a prefix of some stop, reached by reading that prefix
        // from the start state, so walking the stops labels every state.
        let mut depth = FxHashMap::default();
        depth.insert(start, 0);
        for stop in &stops {
            let mut sid = start;
            for (i, &b) in stop.as_bytes().iter().enumerate() {
                sid = nfa.next_state(Anchored::No, sid, b);
                depth.insert(sid, i + 1);
            }
        }
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let texts = stops.iter().map(|s| (*s).to_owned()).collect();
        Ok(Some(Stops { nfa, depth, longest, texts }))
    }
}

/// One completion's stop strings; see the module doc for the semantics.
pub struct StopMatcher {
    stops: Option<Stops>,
    state: StateID,
    /// `buf[held..]` is the withheld text; `buf[..held]` is dead, kept until
    /// it outgrows the live part so that withholding costs O(1) per push.
    buf: Vec<u8>,
    held: usize,
    /// The pattern id of the latest stop found (the earliest in its text; of
    /// several starting there, the first to end).
    matched: Option<usize>,
}

/// Text out of bytes this module cut on character boundaries.
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        // Unreachable (cuts fall on boundaries); lossy rather than a panic.
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

impl StopMatcher {
    pub fn new(stops: &[&str]) -> Result<StopMatcher, StopError> {
        let stops = Stops::new(stops)?;
        let state = match &stops {
            Some(s) => s.nfa.start_state(Anchored::No).map_err(|_| StopError::Build)?,
            None => StateID::ZERO,
        };
        Ok(StopMatcher { stops, state, buf: Vec::new(), held: 0, matched: None })
    }

    /// (text safe to emit, a stop string was found).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let Some(stops) = &self.stops else {
            return (piece.to_owned(), false);
        };
        let nfa = &stops.nfa;
        let base = self.buf.len() - self.held; // bytes withheld before this piece
        let mut earliest: Option<(usize, usize)> = None; // (start, pattern) of the earliest stop, in `held + piece`
        let mut state = self.state;
        for (i, &b) in piece.as_bytes().iter().enumerate() {
            let end = base + i + 1;
            if let Some((cut, _)) = earliest {
                // A stop ending here or later starts at `end - longest` or later.
                if end.saturating_sub(stops.longest) >= cut {
                    break;
                }
            }
            state = nfa.next_state(Anchored::No, state, b);
            if nfa.is_match(state) {
                for k in 0..nfa.match_len(state) {
                    let pattern = nfa.match_pattern(state, k);
                    let start = end - nfa.pattern_len(pattern);
                    if earliest.map_or(true, |(e, _)| start < e) {
                        earliest = Some((start, pattern.as_usize()));
                    }
                }
            }
        }
        if let Some((cut, pattern)) = earliest {
            self.matched = Some(pattern);
            let live = &self.buf[self.held..];
            let out = if cut <= live.len() {
                text(&live[..cut])
            } else {
                let mut out = Vec::with_capacity(cut);
                out.extend_from_slice(live);
                out.extend_from_slice(&piece.as_bytes()[..cut - live.len()]);
                text(&out)
            };
            self.reset();
            return (out, true);
        }
        self.state = state;
        let keep = stops.depth.get(&state).copied().unwrap_or(0);
        let total = base + piece.len();
        let emit = total - keep;
        let live_len = self.buf.len() - self.held;
        let out = if emit <= live_len {
            // Everything emitted was already withheld.
            let out = text(&self.buf[self.held..self.held + emit]);
            self.held += emit;
            self.buf.extend_from_slice(piece.as_bytes());
            out
        } else {
            let from_piece = emit - live_len;
            let mut out = Vec::with_capacity(emit);
            out.extend_from_slice(&self.buf[self.held..]);
            out.extend_from_slice(&piece.as_bytes()[..from_piece]);
            self.held = self.buf.len();
            self.buf.extend_from_slice(&piece.as_bytes()[from_piece..]);
            text(&out)
        };
        if self.held > self.buf.len() - self.held {
            self.buf.drain(..self.held);
            self.held = 0;
        }
        (out, false)
    }

    /// The latest stop string found, if any.
    pub fn matched(&self) -> Option<&str> {
        let stops = self.stops.as_ref()?;
        stops.texts.get(self.matched?).map(String::as_str)
    }

    /// The withheld text, which no stop string followed; the matcher starts afresh.
    pub fn flush(&mut self) -> String {
        let out = text(&self.buf[self.held..]);
        self.reset();
        out
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.held = 0;
        if let Some(stops) = &self.stops {
            if let Ok(start) = stops.nfa.start_state(Anchored::No) {
                self.state = start;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The semantics of the module doc, written the obvious (slow) way.
    struct Naive {
        stops: Vec<String>,
        held: String,
    }

    impl Naive {
        fn push(&mut self, piece: &str) -> (String, bool) {
            let text = std::mem::take(&mut self.held) + piece;
            if let Some(cut) = self.stops.iter().filter_map(|s| text.find(s.as_str())).min() {
                return (text[..cut].to_owned(), true);
            }
            let keep = self
                .stops
                .iter()
                .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n) && text.ends_with(&s[..n])))
                .max()
                .unwrap_or(0);
            self.held = text[text.len() - keep..].to_owned();
            (text[..text.len() - keep].to_owned(), false)
        }
    }

    fn check(stops: &[&str], pieces: &[&str]) {
        let mut fast = StopMatcher::new(stops).unwrap();
        let mut slow = Naive { stops: stops.iter().filter(|s| !s.is_empty()).map(|s| s.to_string()).collect(), held: String::new() };
        for piece in pieces {
            assert_eq!(fast.push(piece), slow.push(piece), "stops {stops:?} pieces {pieces:?} at {piece:?}");
        }
        assert_eq!(fast.flush(), std::mem::take(&mut slow.held));
    }

    #[test]
    fn withholds_what_may_start_a_stop_and_cuts_at_the_earliest() {
        let mut m = StopMatcher::new(&["abcd", "bc"]).unwrap();
        assert_eq!(m.matched(), None);
        assert_eq!(m.push("xa"), ("x".into(), false));
        assert_eq!(m.push("b"), ("".into(), false));
        // "abc" holds "bc": the stop that starts first wins among those found.
        assert_eq!(m.push("cd"), ("".into(), true));
        assert_eq!(m.matched(), Some("abcd"));
        let mut m = StopMatcher::new(&["", "bc", "abcd"]).unwrap();
        assert_eq!(m.push("xbcd"), ("x".into(), true));
        assert_eq!(m.matched(), Some("bc"));
        check(&["abcd", "bc"], &["xab", "cd"]);
        check(&["abcd", "bc"], &["xabcd"]);
        check(&["abcd", "bc"], &["xa", "b", "c", "d"]);
        check(&["\n\n", "User:"], &["Hi", "\n", "Us", "er", ":", "x"]);
        check(&["é", "日本"], &["caf", "é!", "日", "本語"]);
        check(&[], &["a", "b"]);
        check(&["", "x"], &["ax", "b"]);
    }

    #[test]
    fn a_push_after_a_stop_starts_afresh_and_flush_empties() {
        check(&["ab"], &["a", "b", "a", "xa", "b", "a"]);
        let mut m = StopMatcher::new(&["ab"]).unwrap();
        assert_eq!(m.push("xa"), ("x".into(), false));
        assert_eq!(m.flush(), "a");
        assert_eq!(m.flush(), "");
        assert_eq!(m.push("b"), ("b".into(), false));
    }

    #[test]
    fn bounds_are_enforced_without_quoting_the_stop() {
        let many: Vec<&str> = vec!["x"; MAX_STOPS + 1];
        assert_eq!(StopMatcher::new(&many).err(), Some(StopError::TooMany { count: 17 }));
        let long = "秘".repeat(MAX_STOP_CHARS + 1);
        let err = StopMatcher::new(&["ok", &long]).err().unwrap();
        assert_eq!(err, StopError::TooLong { index: 1, chars: 257 });
        assert!(!err.to_string().contains('秘'));
        let longest = "秘".repeat(MAX_STOP_CHARS);
        assert!(StopMatcher::new(&vec![longest.as_str(); MAX_STOPS]).is_ok());
    }

    /// Exhaustive over a small alphabet: every stop set of up to three stops
    /// of length 1..=3 over {a, b}, against every split of short texts.
    #[test]
    fn equals_the_naive_definition_on_small_cases() {
        let words: Vec<String> = (1..=3)
            .flat_map(|n| (0..1u32 << n).map(move |bits| (0..n).map(|i| if bits >> i & 1 == 1 { 'b' } else { 'a' }).collect()))
            .collect();
        let texts = ["abab", "aabba", "bbbab", "aaab", "babba"];
        for (i, s1) in words.iter().enumerate() {
            for s2 in &words[i..] {
                for text in texts {
                    for cuts in 0..1u32 << (text.len() - 1) {
                        let mut pieces = Vec::new();
                        let mut start = 0;
                        for at in 1..text.len() {
                            if cuts >> (at - 1) & 1 == 1 {
                                pieces.push(&text[start..at]);
                                start = at;
                            }
                        }
                        pieces.push(&text[start..]);
                        check(&[s1, s2], &pieces);
                        check(&[s1, s2, "bab"], &pieces);
                    }
                }
            }
        }
    }

    #[test]
    fn a_long_withheld_suffix_costs_nothing_per_push() {
        // The crafted case: every push keeps 255 bytes withheld.
        let a = "a".repeat(255);
        let stops = [a.clone() + "z", "b".to_owned() + &a, "c".to_owned() + &a];
        let stops: Vec<&str> = stops.iter().map(|s| s.as_str()).collect();
        let mut m = StopMatcher::new(&stops).unwrap();
        let mut out = String::new();
        for _ in 0..100_000 {
            let (text, stopped) = m.push("a");
            assert!(!stopped);
            out += &text;
            assert!(m.buf.len() <= 2 * 255 + 1);
        }
        assert_eq!(out.len() + m.flush().len(), 100_000);
    }
}
