//! OpenAI streaming events as bytes: `data: {json}\n\n`.
//!
//! The part of every chunk that never changes (`id`, `object`, `created`,
//! `model`) is rendered once per stream; a chunk is that prefix, the escaped
//! text and a constant tail, appended into one buffer. Field order is the
//! one OpenAI sends, so clients that compare bytes see what they expect.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    ChatCompletionChunk,
    TextCompletion,
}

impl ObjectKind {
    pub fn parse(s: &str) -> Option<ObjectKind> {
        match s {
            "chat.completion.chunk" => Some(ObjectKind::ChatCompletionChunk),
            "text_completion" => Some(ObjectKind::TextCompletion),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::ChatCompletionChunk => "chat.completion.chunk",
            ObjectKind::TextCompletion => "text_completion",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseError {
    UnknownObject,
    UnknownFinishReason,
    RoleInTextCompletion,
}

impl std::fmt::Display for SseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SseError::UnknownObject => write!(f, "object must be \"chat.completion.chunk\" or \"text_completion\""),
            SseError::UnknownFinishReason => {
                write!(f, "finish reason must be one of \"stop\", \"length\", \"content_filter\", \"tool_calls\"")
            }
            SseError::RoleInTextCompletion => write!(f, "a text_completion stream has no role chunk"),
        }
    }
}

impl std::error::Error for SseError {}

pub const DONE: &[u8] = b"data: [DONE]\n\n";
pub const FINISH_REASONS: [&str; 4] = ["stop", "length", "content_filter", "tool_calls"];

/// How each byte is written inside a JSON string: 0 as is, b'u' as `\u00XX`,
/// b'E' maybe the start of U+2028/U+2029, any other byte `\` + that byte.
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = b'u';
        c += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0A] = b'n';
    t[0x0C] = b'f';
    t[0x0D] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t[0xE2] = b'E';
    t
};

const HEX: &[u8; 16] = b"0123456789abcdef";

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any byte of `v` is below `n` (exact for n <= 128).
const fn has_less(v: u64, n: u8) -> bool {
    v.wrapping_sub(ONES * n as u64) & !v & HIGHS != 0
}

const fn has_byte(v: u64, b: u8) -> bool {
    has_less(v ^ (ONES * b as u64), 1)
}

/// Whether eight bytes hold anything `escape_into` must look at: a control
/// character, `"`, `\`, or 0xE2 (the lead byte of U+2028/U+2029).
const fn needs_escape_check(v: u64) -> bool {
    has_less(v, 0x20) || has_byte(v, b'"') || has_byte(v, b'\\') || has_byte(v, 0xE2)
}

/// Appends `text` as a JSON string literal, quotes included. Escapes `"`,
/// `\`, every control character below U+0020, and U+2028/U+2029 (legal JSON,
/// but line terminators to JavaScript); everything else, astral characters
/// included, stays raw UTF-8.
pub fn escape_into(out: &mut Vec<u8>, text: &str) {
    let b = text.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        // Most text needs no escaping: skip it eight bytes at a time.
        if let Some(word) = b.get(i..i + 8) {
            if !needs_escape_check(u64::from_le_bytes(word.try_into().unwrap())) {
                i += 8;
                continue;
            }
        }
        let kind = ESCAPE[b[i] as usize];
        if kind == 0 {
            i += 1;
            continue;
        }
        if kind == b'E' {
            // U+2028 is E2 80 A8, U+2029 is E2 80 A9; valid UTF-8 guarantees
            // the continuation bytes are there.
            if b[i + 1] == 0x80 && (b[i + 2] == 0xA8 || b[i + 2] == 0xA9) {
                out.extend_from_slice(&b[start..i]);
                out.extend_from_slice(if b[i + 2] == 0xA8 { b"\\u2028" } else { b"\\u2029" });
                i += 3;
                start = i;
            } else {
                i += 1;
            }
            continue;
        }
        out.extend_from_slice(&b[start..i]);
        if kind == b'u' {
            let c = b[i];
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(c >> 4) as usize], HEX[(c & 15) as usize]]);
        } else {
            out.extend_from_slice(&[b'\\', kind]);
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

pub fn escape(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len() + 2);
    escape_into(&mut out, text);
    String::from_utf8(out).expect("escaping keeps UTF-8 valid")
}

/// The events of one streamed response.
#[derive(Debug, Clone)]
pub struct Framer {
    kind: ObjectKind,
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[`
    prefix: Vec<u8>,
}

const CHAT_DELTA_HEAD: &[u8] = b"{\"index\":0,\"delta\":{\"content\":";
const CHAT_DELTA_TAIL: &[u8] = b"},\"logprobs\":null,\"finish_reason\":null}]}\n\n";
const CHAT_ROLE: &[u8] =
    b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n";
const TEXT_HEAD: &[u8] = b"{\"text\":";
const TEXT_TAIL: &[u8] = b",\"index\":0,\"logprobs\":null,\"finish_reason\":null}]}\n\n";

impl Framer {
    pub fn new(id: &str, model: &str, created: i64, kind: ObjectKind) -> Framer {
        let mut prefix = Vec::with_capacity(96 + id.len() + model.len());
        prefix.extend_from_slice(b"data: {\"id\":");
        escape_into(&mut prefix, id);
        prefix.extend_from_slice(b",\"object\":\"");
        prefix.extend_from_slice(kind.as_str().as_bytes());
        let mut created_s = String::new();
        write!(created_s, "\",\"created\":{created},\"model\":").unwrap();
        prefix.extend_from_slice(created_s.as_bytes());
        escape_into(&mut prefix, model);
        prefix.extend_from_slice(b",\"choices\":[");
        Framer { kind, prefix }
    }

    pub fn kind(&self) -> ObjectKind {
        self.kind
    }

    fn start(&self, out: &mut Vec<u8>, extra: usize) {
        out.clear();
        out.reserve(self.prefix.len() + extra + 96);
        out.extend_from_slice(&self.prefix);
    }

    /// First chat chunk: `delta: {"role": "assistant", "content": ""}`.
    pub fn role(&self, out: &mut Vec<u8>) -> Result<(), SseError> {
        if self.kind != ObjectKind::ChatCompletionChunk {
            return Err(SseError::RoleInTextCompletion);
        }
        self.start(out, 0);
        out.extend_from_slice(CHAT_ROLE);
        Ok(())
    }

    /// A piece of generated text.
    pub fn delta(&self, out: &mut Vec<u8>, text: &str) {
        self.start(out, text.len());
        match self.kind {
            ObjectKind::ChatCompletionChunk => {
                out.extend_from_slice(CHAT_DELTA_HEAD);
                escape_into(out, text);
                out.extend_from_slice(CHAT_DELTA_TAIL);
            }
            ObjectKind::TextCompletion => {
                out.extend_from_slice(TEXT_HEAD);
                escape_into(out, text);
                out.extend_from_slice(TEXT_TAIL);
            }
        }
    }

    /// The chunk that carries the finish reason and no text.
    pub fn finish(&self, out: &mut Vec<u8>, reason: &str) -> Result<(), SseError> {
        if !FINISH_REASONS.contains(&reason) {
            return Err(SseError::UnknownFinishReason);
        }
        self.start(out, 0);
        match self.kind {
            ObjectKind::ChatCompletionChunk => out.extend_from_slice(b"{\"index\":0,\"delta\":{},"),
            ObjectKind::TextCompletion => out.extend_from_slice(b"{\"text\":\"\",\"index\":0,"),
        }
        out.extend_from_slice(b"\"logprobs\":null,\"finish_reason\":\"");
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\"}]}\n\n");
        Ok(())
    }

    /// The final usage chunk: `choices: []` and the token counts.
    pub fn usage(&self, out: &mut Vec<u8>, prompt_tokens: u64, completion_tokens: u64) {
        self.start(out, 0);
        let mut s = String::with_capacity(96);
        write!(
            s,
            "],\"usage\":{{\"prompt_tokens\":{prompt_tokens},\"completion_tokens\":{completion_tokens},\"total_tokens\":{}}}}}\n\n",
            // u128: two u64 counts from the caller cannot overflow it.
            u128::from(prompt_tokens) + u128::from(completion_tokens)
        )
        .unwrap();
        out.extend_from_slice(s.as_bytes());
    }
}

/// An error in OpenAI's shape, as an event: the stream's last word when the
/// generation fails after the headers went out.
pub fn error_event(out: &mut Vec<u8>, message: &str, kind: &str, code: Option<&str>) {
    out.clear();
    out.extend_from_slice(b"data: {\"error\":{\"message\":");
    escape_into(out, message);
    out.extend_from_slice(b",\"type\":");
    escape_into(out, kind);
    out.extend_from_slice(b",\"param\":null,\"code\":");
    match code {
        Some(c) => escape_into(out, c),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b"}}\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: Vec<u8>) -> String {
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn escapes_what_json_and_javascript_need() {
        assert_eq!(escape(""), "\"\"");
        assert_eq!(escape("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(escape("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
        assert_eq!(escape("\u{0}\u{1f}\u{7f}"), "\"\\u0000\\u001f\u{7f}\"");
        assert_eq!(escape("x\u{2028}y\u{2029}z"), r#""x\u2028y\u2029z""#);
        // Other E2-led characters (…, €) and astral ones stay raw.
        assert_eq!(escape("…€\u{2027}\u{202a}😀"), "\"…€\u{2027}\u{202a}😀\"");
        assert_eq!(escape("ends with \u{2028}"), "\"ends with \\u2028\"");
    }

    #[test]
    fn word_check_agrees_with_the_byte_table() {
        for b in 0..=255u8 {
            for pos in 0..8 {
                let mut w = *b"abcdefgh";
                w[pos] = b;
                let flagged = needs_escape_check(u64::from_le_bytes(w));
                assert_eq!(flagged, ESCAPE[b as usize] != 0, "byte {b:#x} at {pos}");
            }
        }
        let long = "x".repeat(17) + "\u{2028}" + &"y".repeat(9) + "\"" + "\u{1}";
        assert_eq!(escape(&long), format!("\"{}\\u2028{}\\\"\\u0001\"", "x".repeat(17), "y".repeat(9)));
    }

    #[test]
    fn chat_events_have_openai_field_order() {
        let f = Framer::new("chatcmpl-1", "smol\"lm", 1700000000, ObjectKind::ChatCompletionChunk);
        let mut out = Vec::new();
        f.role(&mut out).unwrap();
        assert_eq!(
            s(out.clone()),
            "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\
             \"model\":\"smol\\\"lm\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\
             \"logprobs\":null,\"finish_reason\":null}]}\n\n"
        );
        f.delta(&mut out, "hi\n");
        assert!(s(out.clone()).ends_with(
            "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\\n\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n"
        ));
        f.finish(&mut out, "length").unwrap();
        assert!(s(out.clone())
            .ends_with("[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"length\"}]}\n\n"));
        f.usage(&mut out, 3, 4);
        assert!(s(out.clone()).ends_with(
            "\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n"
        ));
        assert_eq!(f.finish(&mut out, "eos"), Err(SseError::UnknownFinishReason));
        // The largest counts the binding accepts add up without wrapping.
        f.usage(&mut out, u64::MAX, u64::MAX);
        assert!(s(out.clone()).contains("\"total_tokens\":36893488147419103230}"));
    }

    #[test]
    fn text_completion_events() {
        let f = Framer::new("cmpl-1", "m", 5, ObjectKind::TextCompletion);
        let mut out = Vec::new();
        assert_eq!(f.role(&mut out), Err(SseError::RoleInTextCompletion));
        f.delta(&mut out, "x");
        assert_eq!(
            s(out.clone()),
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":5,\"model\":\"m\",\
             \"choices\":[{\"text\":\"x\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}]}\n\n"
        );
        f.finish(&mut out, "stop").unwrap();
        assert!(s(out).ends_with("[{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n"));
    }

    #[test]
    fn error_event_shape() {
        let mut out = Vec::new();
        error_event(&mut out, "boom \"x\"", "server_error", None);
        assert_eq!(
            s(out.clone()),
            "data: {\"error\":{\"message\":\"boom \\\"x\\\"\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n"
        );
        error_event(&mut out, "m", "t", Some("c"));
        assert!(s(out).contains("\"code\":\"c\"}}"));
    }
}
