//! API keys in GitHub's token format: `sk_` / `mk_`, 30 base62 characters of
//! OS randomness (178 bits), then a 6-character base62 CRC32 of everything
//! before it. The checksum lets typos and scanner false positives fail
//! without a store lookup; the store keeps only `HMAC-SHA256(pepper, key)`.
//!
//! Error messages never contain the key: it is a secret.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Digits, then upper case, then lower case: sorting keys sorts their values.
pub const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Length of the `sk_` / `mk_` prefix, underscore included.
pub const PREFIX_LEN: usize = 3;
/// Random base62 characters: 30 * log2(62) = 178.6 bits (>= 160).
pub const RANDOM_LEN: usize = 30;
/// 62^6 > 2^32, so six characters hold any CRC32.
pub const CHECKSUM_LEN: usize = 6;
pub const KEY_LEN: usize = PREFIX_LEN + RANDOM_LEN + CHECKSUM_LEN;
/// A pepper shorter than this is a configuration mistake, not a secret.
pub const MIN_PEPPER_LEN: usize = 16;
pub const HASH_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Inference keys: the `/v1` API.
    Secret,
    /// Management keys: accounts and keys of an account.
    Management,
}

impl KeyKind {
    pub fn parse(kind: &str) -> Option<KeyKind> {
        match kind {
            "sk" => Some(KeyKind::Secret),
            "mk" => Some(KeyKind::Management),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Secret => "sk",
            KeyKind::Management => "mk",
        }
    }

    fn prefix(self) -> &'static [u8; PREFIX_LEN] {
        match self {
            KeyKind::Secret => b"sk_",
            KeyKind::Management => b"mk_",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    UnknownKind,
    Malformed,
    ShortPepper,
    Random(String),
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::UnknownKind => write!(f, "key kind must be \"sk\" or \"mk\""),
            KeyError::Malformed => write!(f, "not a well-formed API key (prefix, length, alphabet or checksum)"),
            KeyError::ShortPepper => write!(f, "pepper must be at least {MIN_PEPPER_LEN} bytes"),
            KeyError::Random(e) => write!(f, "the OS random number generator failed: {e}"),
        }
    }
}

impl std::error::Error for KeyError {}

/// Reverse of `ALPHABET`; 0xFF marks bytes outside it.
const DIGIT: [u8; 256] = {
    let mut t = [0xFFu8; 256];
    let mut i = 0;
    while i < 62 {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

fn checksum_chars(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut v = crc32fast::hash(body) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(v % 62) as usize];
        v /= 62;
    }
    out
}

/// A fresh key of `kind`. Each random character is drawn by rejection
/// sampling (bytes >= 248 are redrawn) so all 62 values are equally likely.
pub fn generate(kind: KeyKind) -> Result<String, KeyError> {
    let mut key = [0u8; KEY_LEN];
    key[..PREFIX_LEN].copy_from_slice(kind.prefix());
    let mut filled = PREFIX_LEN;
    let mut pool = [0u8; 64];
    while filled < PREFIX_LEN + RANDOM_LEN {
        getrandom::fill(&mut pool).map_err(|e| KeyError::Random(e.to_string()))?;
        for &b in pool.iter() {
            if b < 248 && filled < PREFIX_LEN + RANDOM_LEN {
                key[filled] = ALPHABET[(b % 62) as usize];
                filled += 1;
            }
        }
    }
    let sum = checksum_chars(&key[..PREFIX_LEN + RANDOM_LEN]);
    key[PREFIX_LEN + RANDOM_LEN..].copy_from_slice(&sum);
    Ok(String::from_utf8(key.to_vec()).expect("ASCII"))
}

/// The kind of a well-formed key (prefix, length, alphabet, checksum), or
/// `None`. No lookup: this is what rejects typos before the store is asked.
pub fn kind_of(key: &str) -> Option<KeyKind> {
    let b = key.as_bytes();
    if b.len() != KEY_LEN {
        return None;
    }
    let kind = match &b[..PREFIX_LEN] {
        b"sk_" => KeyKind::Secret,
        b"mk_" => KeyKind::Management,
        _ => return None,
    };
    let mut stated: u64 = 0;
    for (i, &c) in b[PREFIX_LEN..].iter().enumerate() {
        let d = DIGIT[c as usize];
        if d == 0xFF {
            return None;
        }
        if i >= RANDOM_LEN {
            stated = stated * 62 + d as u64;
        }
    }
    (stated == crc32fast::hash(&b[..PREFIX_LEN + RANDOM_LEN]) as u64).then_some(kind)
}

pub fn check(key: &str, kind: Option<KeyKind>) -> bool {
    match (kind_of(key), kind) {
        (Some(found), Some(wanted)) => found == wanted,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

thread_local! {
    /// The HMAC state keyed with the last pepper seen on this thread. A server
    /// has one pepper, so keying (two of HMAC's four SHA-256 blocks for a
    /// key) is done once per thread, not once per request.
    static KEYED: std::cell::RefCell<Option<(Vec<u8>, Hmac<Sha256>)>> = const { std::cell::RefCell::new(None) };
}

fn mac(key: &str, pepper: &[u8]) -> Result<Hmac<Sha256>, KeyError> {
    if pepper.len() < MIN_PEPPER_LEN {
        return Err(KeyError::ShortPepper);
    }
    let mut m = KEYED.with(|cell| {
        let mut cached = cell.borrow_mut();
        match &*cached {
            Some((p, m)) if bool::from(p[..].ct_eq(pepper)) => m.clone(),
            _ => {
                let m = Hmac::<Sha256>::new_from_slice(pepper).expect("HMAC takes any key length");
                *cached = Some((pepper.to_vec(), m.clone()));
                m
            }
        }
    });
    m.update(key.as_bytes());
    Ok(m)
}

/// `HMAC-SHA256(pepper, key)`: what the store keeps instead of the key.
pub fn hash(key: &str, pepper: &[u8]) -> Result<[u8; HASH_LEN], KeyError> {
    Ok(mac(key, pepper)?.finalize().into_bytes().into())
}

/// Whether `key` hashes to `expected`, compared in constant time.
pub fn verify(key: &str, pepper: &[u8], expected: &[u8]) -> Result<bool, KeyError> {
    let got = hash(key, pepper)?;
    // `ct_eq` on slices of different lengths is false without looking at bytes.
    Ok(bool::from(got[..].ct_eq(expected)))
}

/// Display form, `sk_…a1B2`: enough to tell keys apart, useless to an attacker.
pub fn hint(key: &str) -> Result<String, KeyError> {
    if kind_of(key).is_none() {
        return Err(KeyError::Malformed);
    }
    Ok(format!("{}\u{2026}{}", &key[..PREFIX_LEN], &key[KEY_LEN - 4..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_check_and_have_the_right_shape() {
        for kind in [KeyKind::Secret, KeyKind::Management] {
            let k = generate(kind).unwrap();
            assert_eq!(k.len(), KEY_LEN);
            assert!(k.starts_with(kind.prefix().iter().map(|&b| b as char).collect::<String>().as_str()));
            assert!(k.bytes().skip(PREFIX_LEN).all(|b| ALPHABET.contains(&b)));
            assert_eq!(kind_of(&k), Some(kind));
            assert!(check(&k, Some(kind)));
            assert!(check(&k, None));
        }
        let k = generate(KeyKind::Secret).unwrap();
        assert!(!check(&k, Some(KeyKind::Management)));
    }

    #[test]
    fn every_single_substitution_fails() {
        let k = generate(KeyKind::Secret).unwrap().into_bytes();
        let mut alphabet: Vec<u8> = ALPHABET.to_vec();
        alphabet.extend_from_slice(b"_-. ");
        for pos in 0..KEY_LEN {
            for &c in &alphabet {
                if c == k[pos] {
                    continue;
                }
                let mut bad = k.clone();
                bad[pos] = c;
                assert!(kind_of(std::str::from_utf8(&bad).unwrap()).is_none(), "pos {pos} char {c}");
            }
        }
    }

    #[test]
    fn wrong_lengths_and_non_ascii_fail() {
        let k = generate(KeyKind::Management).unwrap();
        assert!(!check(&k[..KEY_LEN - 1], None));
        assert!(!check(&format!("{k}0"), None));
        assert!(!check("", None));
        let mut u = k.clone();
        u.replace_range(10..12, "é");
        assert_eq!(u.len(), KEY_LEN);
        assert!(!check(&u, None));
    }

    #[test]
    fn keys_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(generate(KeyKind::Secret).unwrap()));
        }
    }

    #[test]
    fn checksum_is_zero_padded_base62() {
        assert_eq!(checksum_chars(b""), *b"000000"); // crc32("") == 0
        // crc32("sk_") in base62, checked against Python's zlib.crc32.
        let v = crc32fast::hash(b"sk_") as u64;
        let s = checksum_chars(b"sk_");
        let back = s.iter().fold(0u64, |a, &c| a * 62 + DIGIT[c as usize] as u64);
        assert_eq!(back, v);
    }

    #[test]
    fn hash_is_rfc4231_hmac_sha256() {
        // RFC 4231 test case 2 uses a 4-byte key, below our pepper minimum;
        // test case 1 uses 20 bytes of 0x0b and "Hi There".
        let got = hash("Hi There", &[0x0b; 20]).unwrap();
        let want = "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7";
        let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, want);
    }

    #[test]
    fn the_keyed_state_follows_the_pepper() {
        let a = hash("k", &[1u8; 16]).unwrap();
        let b = hash("k", &[2u8; 16]).unwrap();
        let a_long = hash("k", &[1u8; 17]).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, a_long);
        assert_eq!(hash("k", &[1u8; 16]).unwrap(), a);
        let direct = Hmac::<Sha256>::new_from_slice(&[2u8; 16]).unwrap().chain_update(b"k").finalize().into_bytes();
        assert_eq!(b[..], direct[..]);
    }

    #[test]
    fn short_pepper_is_refused_and_verify_compares() {
        let k = generate(KeyKind::Secret).unwrap();
        assert_eq!(hash(&k, b"short"), Err(KeyError::ShortPepper));
        let pepper = [7u8; 32];
        let h = hash(&k, &pepper).unwrap();
        assert!(verify(&k, &pepper, &h).unwrap());
        assert!(!verify(&k, &pepper, &h[..31]).unwrap());
        let mut other = h;
        other[31] ^= 1;
        assert!(!verify(&k, &pepper, &other).unwrap());
        assert!(!verify(&k, &[8u8; 32], &h).unwrap());
    }

    #[test]
    fn hint_shows_prefix_and_last_four_only() {
        let k = generate(KeyKind::Secret).unwrap();
        let h = hint(&k).unwrap();
        assert_eq!(h, format!("sk_\u{2026}{}", &k[KEY_LEN - 4..]));
        assert_eq!(hint("sk_nope"), Err(KeyError::Malformed));
        assert!(!KeyError::Malformed.to_string().contains("sk_"));
    }
}
