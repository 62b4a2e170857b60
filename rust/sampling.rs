//! Next-token choice from one row of logits, and the log-probabilities
//! OpenAI reports.
//!
//! # The distribution
//!
//! The candidates are the tokens the mask allows (all without a mask) whose
//! logit is not -inf. Greedy decoding (temperature 0, or top_k 1) takes the
//! candidate with the largest logit, the lowest id on ties. Otherwise each
//! candidate weighs `w = exp((x - max) / temperature)`; top_k keeps the k
//! largest logits, then top_p keeps the smallest set of the heaviest weights
//! whose sum reaches `top_p` of what top_k kept (ties in either order go to
//! the lower id, so the kept set is exactly defined), and one token is drawn
//! with probability `w / sum` of the kept set. A NaN logit among the
//! candidates is an error, not a silent choice. `logprobs` reports the raw
//! distribution, `log_softmax(logits)` before temperature, top_k, top_p and
//! the mask, as OpenAI does.
//!
//! # Why these passes
//!
//! A 262,144-token vocabulary is 1 MiB of logits per step, so a step is a
//! few linear passes and never a sort of the vocabulary. One pass finds the
//! maximum (and any NaN); one computes the weights and sums them per block
//! of 256 tokens. A plain draw then walks the block sums and recomputes the
//! weights of one block. top_k keeps a k-element heap over one pass. top_p
//! buckets the weights by their float bits (for positive floats the bits
//! order like the values), finds the bucket where the nucleus ends, and
//! sorts only the weights from that bucket up. Every sum is taken in an
//! order the code fixes (explicit lanes; the compiler may not reassociate
//! float additions), and `exp` is a polynomial of plain IEEE operations, so
//! a seed picks the same token on every machine whatever SIMD width the
//! compiler chose, and the loops vectorize.
//!
//! # Randomness
//!
//! ChaCha8 (`rand_chacha`), seeded from the request's seed by `rand_core`'s
//! `seed_from_u64` (a documented, stable expansion), or from the OS's
//! CSPRNG without a seed. Each non-greedy draw takes one 64-bit word (53
//! bits make the uniform number in [0, 1)); greedy takes none. A sampler
//! belongs to one sequence, so a seed reproduces a completion whatever else
//! runs beside it.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const WORD: usize = 32;
const BLOCK: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub enum SampleError {
    Temperature,
    TopP,
    Random(String),
    EmptyLogits,
    TooLarge,
    NaN,
    NoCandidate,
    TokenOutOfRange { token: u64, vocab: usize },
}

impl std::fmt::Display for SampleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SampleError::Temperature => write!(f, "temperature must be a finite number >= 0"),
            SampleError::TopP => write!(f, "top_p must be in (0, 1]"),
            SampleError::Random(e) => write!(f, "the OS random number generator failed: {e}"),
            SampleError::EmptyLogits => write!(f, "logits are empty"),
            SampleError::TooLarge => write!(f, "more than 2**32 logits"),
            SampleError::NaN => write!(f, "logits contain NaN"),
            SampleError::NoCandidate => write!(f, "no token is allowed (masked out, or a logit of -inf)"),
            SampleError::TokenOutOfRange { token, vocab } => {
                write!(f, "token {token} is outside the vocabulary of {vocab} logits")
            }
        }
    }
}

impl std::error::Error for SampleError {}

/// Which tokens may be chosen, 32 per word (bit `i % 32` of word `i / 32`).
trait Mask: Copy {
    fn word(self, w: usize) -> u32;
}

#[derive(Clone, Copy)]
struct AllowAll;

impl Mask for AllowAll {
    #[inline(always)]
    fn word(self, _: usize) -> u32 {
        u32::MAX
    }
}

/// Tokens past the end of the mask are not allowed.
#[derive(Clone, Copy)]
struct Bits<'a>(&'a [u32]);

impl Mask for Bits<'_> {
    #[inline(always)]
    fn word(self, w: usize) -> u32 {
        self.0.get(w).copied().unwrap_or(0)
    }
}

/// `exp(x)` for `x <= 0` (Cephes' single-precision polynomial, relative
/// error about 1e-7); 0 below -87, where `exp` leaves the normal floats,
/// and for -inf. Branch-free, so loops over it vectorize.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer, which lands in the low bits.
    const SHIFTER: f32 = 12_582_912.0;
    let xc = if x < -87.0 { -87.0 } else { x };
    let t = xc * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let n_bits = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    let scale = f32::from_bits(((n_bits + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// The weight of logit `x` given the largest `max` and `1 / temperature`.
#[inline(always)]
fn weight(x: f32, max: f32, inv_t: f32) -> f32 {
    // `x == max` first: with `max` = +inf, `x - max` is NaN.
    exp_nonpositive(if x == max { 0.0 } else { (x - max) * inv_t })
}

/// Calls `f(word index, its 32 logits, its allowed bits)` for every word
/// with an allowed token; the last, partial word is padded with -inf and
/// its padding is not allowed. Full words are arrays, so the loops inside
/// `f` have a known trip count and vectorize.
#[inline(always)]
fn for_each_word<M: Mask>(logits: &[f32], mask: M, mut f: impl FnMut(usize, &[f32; WORD], u32)) {
    let chunks = logits.chunks_exact(WORD);
    let tail = chunks.remainder();
    let full = logits.len() / WORD;
    for (w, chunk) in chunks.enumerate() {
        let bits = mask.word(w);
        if let (true, Ok(xs)) = (bits != 0, <&[f32; WORD]>::try_from(chunk)) {
            f(w, xs, bits);
        }
    }
    if !tail.is_empty() {
        let bits = mask.word(full) & (u32::MAX >> (WORD - tail.len()));
        let mut xs = [f32::NEG_INFINITY; WORD];
        xs[..tail.len()].copy_from_slice(tail);
        if bits != 0 {
            f(full, &xs, bits);
        }
    }
}

/// What one pass over the allowed logits found.
struct Extent {
    max: f32,
    /// The first allowed token whose logit is `max`.
    argmax: u32,
    nan: bool,
    candidates: usize,
}

fn extent<M: Mask>(logits: &[f32], mask: M) -> Extent {
    let mut lane_max = [f32::NEG_INFINITY; WORD];
    let mut lane_arg = [u32::MAX; WORD];
    let mut nan = false;
    let mut candidates = 0usize;
    for_each_word(logits, mask, |w, xs, bits| {
        let base = (w * WORD) as u32;
        let mut n = 0u32;
        let mut bad = false;
        for j in 0..WORD {
            let v = if bits >> j & 1 == 1 { xs[j] } else { f32::NEG_INFINITY };
            bad |= v.is_nan();
            n += u32::from(v > f32::NEG_INFINITY);
            // Strictly greater: each lane keeps its first maximum.
            if v > lane_max[j] {
                lane_max[j] = v;
                lane_arg[j] = base + j as u32;
            }
        }
        nan |= bad;
        candidates += n as usize;
    });
    let max = lane_max.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let argmax = (0..WORD).filter(|&j| lane_max[j] == max).map(|j| lane_arg[j]).min().unwrap_or(u32::MAX);
    Extent { max, argmax, nan, candidates }
}

/// The weights of one word; their sum, in a fixed order.
#[inline(always)]
fn word_weights(xs: &[f32; WORD], bits: u32, max: f32, inv_t: f32, out: &mut [f32; WORD]) -> f32 {
    let mut lanes = [0f32; 8];
    for j in 0..WORD {
        let wv = if bits >> j & 1 == 1 { weight(xs[j], max, inv_t) } else { 0.0 };
        out[j] = wv;
        lanes[j % 8] += wv;
    }
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// The sum of the weights of every block of `BLOCK` tokens, into `sums`.
fn block_sums<M: Mask>(logits: &[f32], mask: M, max: f32, inv_t: f32, sums: &mut Vec<f64>) {
    sums.clear();
    sums.resize(logits.len().div_ceil(BLOCK), 0.0);
    let mut out = [0f32; WORD];
    for_each_word(logits, mask, |w, xs, bits| {
        sums[w / (BLOCK / WORD)] += f64::from(word_weights(xs, bits, max, inv_t, &mut out));
    });
}

/// A uniform number in [0, 1) from 53 random bits.
fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `(value, id)` ordered so that the greatest is the best: larger value,
/// then lower id.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ranked(f32, u32);

impl Eq for Ranked {}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The `k` best allowed tokens by logit (NaN-free input), best first.
fn top_k<M: Mask>(logits: &[f32], mask: M, k: usize) -> Vec<Ranked> {
    // A min-heap of the best k so far; ids come in increasing order, so a
    // newcomer beats the worst kept one only with a strictly larger logit.
    let mut heap: BinaryHeap<std::cmp::Reverse<Ranked>> = BinaryHeap::with_capacity(k + 1);
    let mut floor = f32::NEG_INFINITY;
    for (w, chunk) in logits.chunks(WORD).enumerate() {
        let bits = mask.word(w);
        if bits == 0 {
            continue;
        }
        for (j, &x) in chunk.iter().enumerate() {
            if x > floor && bits >> j & 1 == 1 {
                heap.push(std::cmp::Reverse(Ranked(x, (w * WORD + j) as u32)));
                if heap.len() > k {
                    heap.pop();
                }
                if heap.len() == k {
                    floor = heap.peek().map_or(floor, |r| r.0 .0);
                }
            }
        }
    }
    let mut best: Vec<Ranked> = heap.into_iter().map(|r| r.0).collect();
    best.sort_unstable_by(|a, b| b.cmp(a));
    best
}

/// Draws from `kept` (weights, best first) after keeping its smallest
/// prefix whose weight reaches `top_p * total`.
fn draw_nucleus(kept: &[Ranked], total: f64, top_p: f64, u: f64) -> Option<u32> {
    let target = top_p * total;
    let mut cumulative = 0f64;
    let mut end = kept.len();
    for (i, r) in kept.iter().enumerate() {
        cumulative += f64::from(r.0);
        if cumulative >= target {
            end = i + 1;
            break;
        }
    }
    let kept = &kept[..end];
    let sum: f64 = kept.iter().map(|r| f64::from(r.0)).sum();
    let goal = u * sum;
    let mut acc = 0f64;
    for r in kept {
        acc += f64::from(r.0);
        if acc > goal {
            return Some(r.1);
        }
    }
    kept.iter().rev().find(|r| r.0 > 0.0).map(|r| r.1)
}

thread_local! {
    /// Per-thread scratch: block sums, and the weights for top-p.
    static SCRATCH: RefCell<(Vec<f64>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Bucket of a positive weight for top-p: its float bits without the low 16
/// mantissa bits (128 buckets per octave).
fn bucket(w: f32) -> usize {
    (w.to_bits() >> 16) as usize
}

/// The number of buckets weights in (0, 1] can fall into.
const BUCKETS: usize = (0x3F80_0000 >> 16) + 1;

pub struct Sampler {
    temperature: f64,
    top_p: f64,
    top_k: usize,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// `top_k` 0 means no top-k; `seed` `None` draws from the OS.
    pub fn new(temperature: f64, top_p: f64, top_k: u64, seed: Option<u64>) -> Result<Sampler, SampleError> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(SampleError::Temperature);
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(SampleError::TopP);
        }
        let rng = match seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes).map_err(|e| SampleError::Random(e.to_string()))?;
                ChaCha8Rng::from_seed(bytes)
            }
        };
        let top_k = usize::try_from(top_k).unwrap_or(usize::MAX);
        Ok(Sampler { temperature, top_p, top_k, rng })
    }

    pub fn greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// The next token; `allowed`: a bitmask (bit `i % 32` of word `i / 32`
    /// allows token `i`; tokens past the mask are not allowed).
    pub fn sample(&mut self, logits: &[f32], allowed: Option<&[u32]>) -> Result<u32, SampleError> {
        match allowed {
            None => self.sample_with(logits, AllowAll),
            Some(bits) => self.sample_with(logits, Bits(bits)),
        }
    }

    fn sample_with<M: Mask>(&mut self, logits: &[f32], mask: M) -> Result<u32, SampleError> {
        if logits.is_empty() {
            return Err(SampleError::EmptyLogits);
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(SampleError::TooLarge);
        }
        let ext = extent(logits, mask);
        if ext.nan {
            return Err(SampleError::NaN);
        }
        if ext.candidates == 0 {
            return Err(SampleError::NoCandidate);
        }
        if self.greedy() {
            return Ok(ext.argmax);
        }
        // 1 / temperature, kept finite so that `0 * inv_t` stays 0.
        let inv_t = (1.0 / self.temperature).min(f64::from(f32::MAX)) as f32;
        let u = uniform(&mut self.rng);
        let chosen = if self.top_k > 0 && self.top_k < ext.candidates {
            let mut kept = top_k(logits, mask, self.top_k);
            for r in kept.iter_mut() {
                r.0 = weight(r.0, ext.max, inv_t);
            }
            let total: f64 = kept.iter().map(|r| f64::from(r.0)).sum();
            draw_nucleus(&kept, total, self.top_p, u)
        } else if self.top_p < 1.0 {
            SCRATCH.with(|s| self.draw_top_p(logits, mask, ext.max, inv_t, u, &mut s.borrow_mut().1))
        } else {
            SCRATCH.with(|s| draw_all(logits, mask, ext.max, inv_t, u, &mut s.borrow_mut().0))
        };
        chosen.ok_or(SampleError::NoCandidate)
    }

    fn draw_top_p<M: Mask>(&self, logits: &[f32], mask: M, max: f32, inv_t: f32, u: f64, w: &mut Vec<f32>) -> Option<u32> {
        w.clear();
        w.resize(logits.len().next_multiple_of(WORD), 0.0);
        let mut mass = vec![0f64; BUCKETS];
        let mut out = [0f32; WORD];
        for_each_word(logits, mask, |k, xs, bits| {
            word_weights(xs, bits, max, inv_t, &mut out);
            w[k * WORD..(k + 1) * WORD].copy_from_slice(&out);
        });
        for &wv in w.iter() {
            if wv > 0.0 {
                mass[bucket(wv).min(BUCKETS - 1)] += f64::from(wv);
            }
        }
        let total: f64 = mass.iter().sum();
        let target = self.top_p * total;
        // The bucket where the heaviest weights first reach the target.
        let mut cumulative = 0f64;
        let mut floor = 0;
        for (k, &m) in mass.iter().enumerate().rev() {
            cumulative += m;
            if m > 0.0 {
                floor = k;
            }
            if cumulative >= target {
                break;
            }
        }
        let mut kept: Vec<Ranked> = w
            .iter()
            .enumerate()
            .filter(|&(_, &wv)| wv > 0.0 && bucket(wv) >= floor)
            .map(|(i, &wv)| Ranked(wv, i as u32))
            .collect();
        kept.sort_unstable_by(|a, b| b.cmp(a));
        draw_nucleus(&kept, total, self.top_p, u)
    }
}

/// A draw over every candidate: block sums first, then one block's weights.
fn draw_all<M: Mask>(logits: &[f32], mask: M, max: f32, inv_t: f32, u: f64, sums: &mut Vec<f64>) -> Option<u32> {
    block_sums(logits, mask, max, inv_t, sums);
    let total: f64 = sums.iter().sum();
    let goal = u * total;
    let mut before = 0f64;
    let mut chosen = None;
    for (b, &s) in sums.iter().enumerate() {
        if before + s > goal {
            chosen = Some((b, goal - before));
            break;
        }
        before += s;
    }
    // Rounding can leave `goal` past the last sum: then the last block that weighs anything.
    let (b, rest) = match chosen {
        Some(found) => found,
        None => (sums.iter().rposition(|&s| s > 0.0)?, f64::INFINITY),
    };
    let start = b * BLOCK;
    let xs = &logits[start..(start + BLOCK).min(logits.len())];
    let mut weights = [0f32; BLOCK];
    let mut out = [0f32; WORD];
    for_each_word(xs, Offset(mask, b * (BLOCK / WORD)), |k, word, bits| {
        word_weights(word, bits, max, inv_t, &mut out);
        weights[k * WORD..(k + 1) * WORD].copy_from_slice(&out);
    });
    let weights = &weights[..xs.len()];
    let mut acc = 0f64;
    for (j, &wv) in weights.iter().enumerate() {
        acc += f64::from(wv);
        if acc > rest {
            return Some((start + j) as u32);
        }
    }
    weights.iter().rposition(|&wv| wv > 0.0).map(|j| (start + j) as u32)
}

/// A mask seen from word `.1` on (for one block of the logits).
#[derive(Clone, Copy)]
struct Offset<M>(M, usize);

impl<M: Mask> Mask for Offset<M> {
    #[inline(always)]
    fn word(self, w: usize) -> u32 {
        self.0.word(self.1 + w)
    }
}

/// `log_softmax(logits)[token]` and the `top_n` most likely tokens (best
/// first, lower id on ties), of the raw distribution.
pub fn logprobs(logits: &[f32], token: u64, top_n: usize) -> Result<(f64, Vec<(u32, f64)>), SampleError> {
    if logits.is_empty() {
        return Err(SampleError::EmptyLogits);
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(SampleError::TooLarge);
    }
    let index = usize::try_from(token)
        .ok()
        .filter(|&t| t < logits.len())
        .ok_or(SampleError::TokenOutOfRange { token, vocab: logits.len() })?;
    let ext = extent(logits, AllowAll);
    if ext.nan {
        return Err(SampleError::NaN);
    }
    if ext.candidates == 0 {
        return Err(SampleError::NoCandidate);
    }
    let max = ext.max;
    // With +inf logits, the limit of softmax: they share all the mass.
    let infinite = logits.iter().filter(|&&x| x == f32::INFINITY).count() as f64;
    let lse = if max == f32::INFINITY {
        0.0
    } else {
        let mut sums = Vec::new();
        block_sums(logits, AllowAll, max, 1.0, &mut sums);
        f64::from(max) + sums.iter().sum::<f64>().ln()
    };
    let logprob = |x: f32| match (max == f32::INFINITY, x == f32::INFINITY) {
        (true, true) => -infinite.ln(),
        (true, false) => f64::NEG_INFINITY,
        (false, _) => f64::from(x) - lse,
    };
    let top = if top_n == 0 { Vec::new() } else { top_k(logits, AllowAll, top_n.min(logits.len())) };
    Ok((logprob(logits[index]), top.into_iter().map(|r| (r.1, logprob(r.0))).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f64, top_p: f64, top_k: u64) -> Sampler {
        Sampler::new(temperature, top_p, top_k, Some(7)).unwrap()
    }

    #[test]
    fn exp_is_close_to_std_and_exact_at_the_ends() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (f64::from(exp_nonpositive(x)), f64::from(x).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn greedy_is_the_first_argmax_among_the_allowed() {
        let logits = [1.0, 3.0, 2.0, 3.0, f32::NEG_INFINITY];
        assert_eq!(sampler(0.0, 1.0, 0).sample(&logits, None), Ok(1));
        assert_eq!(sampler(0.7, 1.0, 1).sample(&logits, None), Ok(1));
        assert_eq!(sampler(0.0, 1.0, 0).sample(&logits, Some(&[0b1101])), Ok(3));
        assert_eq!(sampler(0.0, 1.0, 0).sample(&logits, Some(&[0b0101])), Ok(2));
        assert_eq!(sampler(0.0, 1.0, 0).sample(&logits, Some(&[0b10000])), Err(SampleError::NoCandidate));
        assert_eq!(sampler(0.0, 1.0, 0).sample(&[f32::NAN, 1.0], None), Err(SampleError::NaN));
        // A NaN the mask rules out does not matter.
        assert_eq!(sampler(0.0, 1.0, 0).sample(&[f32::NAN, 1.0], Some(&[0b10])), Ok(1));
        assert_eq!(sampler(1.0, 1.0, 0).sample(&[], None), Err(SampleError::EmptyLogits));
    }

    #[test]
    fn masked_and_minus_infinity_tokens_are_never_drawn() {
        let mut logits = vec![0f32; 1000];
        logits[999] = f32::NEG_INFINITY;
        let mut mask = vec![0u32; 32];
        for i in (0..1000).step_by(7) {
            mask[i / 32] |= 1 << (i % 32);
        }
        for (top_p, top_k) in [(1.0, 0), (0.5, 0), (1.0, 20), (0.3, 50)] {
            let mut s = sampler(1.3, top_p, top_k);
            for _ in 0..2000 {
                let t = s.sample(&logits, Some(&mask)).unwrap() as usize;
                assert!(t % 7 == 0 && t != 999, "{t} with top_p {top_p} top_k {top_k}");
            }
        }
        // A mask shorter than the logits allows nothing past its end.
        let mut s = sampler(1.0, 1.0, 0);
        for _ in 0..500 {
            assert!(s.sample(&logits, Some(&[u32::MAX])).unwrap() < 32);
        }
    }

    #[test]
    fn top_k_and_top_p_keep_exactly_the_defined_set() {
        // Logits 0..10: top_k 3 keeps 9, 8, 7. Ties: 5 and 5 at ids 2 and 6, top_k 1 of them keeps id 2.
        let logits: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let mut s = sampler(1.0, 1.0, 3);
        let seen: std::collections::BTreeSet<u32> = (0..3000).map(|_| s.sample(&logits, None).unwrap()).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![7, 8, 9]);
        let tied = [0.0, 1.0, 5.0, 1.0, 0.0, 2.0, 5.0];
        let mut s = sampler(1.0, 1.0, 2);
        let seen: std::collections::BTreeSet<u32> = (0..1000).map(|_| s.sample(&tied, None).unwrap()).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![2, 6]);
        assert_eq!(top_k(&tied, AllowAll, 1), vec![Ranked(5.0, 2)]);
        // Probabilities 0.5, 0.25, 0.125, 0.125: top_p 0.74 keeps the first two
        // (their sum reaches it), 0.76 the first three.
        let ln = |p: f64| p.ln() as f32;
        let logits = [ln(0.125), ln(0.5), ln(0.125), ln(0.25)];
        for (top_p, want) in [(0.74, vec![1, 3]), (0.76, vec![0, 1, 3]), (0.49, vec![1]), (1.0, vec![0, 1, 2, 3])] {
            for top_k in [0, 4, 10] {
                let mut s = sampler(1.0, top_p, top_k);
                let seen: std::collections::BTreeSet<u32> =
                    (0..3000).map(|_| s.sample(&logits, None).unwrap()).collect();
                assert_eq!(seen.into_iter().collect::<Vec<_>>(), want, "top_p {top_p} top_k {top_k}");
            }
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
        for (top_p, top_k) in [(1.0, 0), (0.9, 0), (1.0, 40), (0.8, 40)] {
            let draw = |seed| {
                let mut s = Sampler::new(0.8, top_p, top_k, Some(seed)).unwrap();
                (0..50).map(|_| s.sample(&logits, None).unwrap()).collect::<Vec<_>>()
            };
            assert_eq!(draw(42), draw(42));
            assert_ne!(draw(42), draw(43));
        }
        let mut a = Sampler::new(1.0, 1.0, 0, None).unwrap();
        let mut b = Sampler::new(1.0, 1.0, 0, None).unwrap();
        let flat = vec![0f32; 1 << 16];
        let (xa, xb): (Vec<u32>, Vec<u32>) = (0..8).map(|_| (a.sample(&flat, None).unwrap(), b.sample(&flat, None).unwrap())).unzip();
        assert_ne!(xa, xb, "unseeded samplers draw from the OS");
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(Sampler::new(-0.1, 1.0, 0, None).err(), Some(SampleError::Temperature));
        assert_eq!(Sampler::new(f64::NAN, 1.0, 0, None).err(), Some(SampleError::Temperature));
        assert_eq!(Sampler::new(1.0, 0.0, 0, None).err(), Some(SampleError::TopP));
        assert_eq!(Sampler::new(1.0, 1.5, 0, None).err(), Some(SampleError::TopP));
        assert_eq!(Sampler::new(1.0, f64::NAN, 0, None).err(), Some(SampleError::TopP));
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0, 3.0];
        let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        let (lp, top) = logprobs(&logits, 0, 3).unwrap();
        assert!((lp - (1.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 3, 1]);
        assert!((top[0].1 - (3.0 - z.ln())).abs() < 1e-6);
        assert_eq!(logprobs(&logits, 4, 1).err(), Some(SampleError::TokenOutOfRange { token: 4, vocab: 4 }));
        assert_eq!(logprobs(&logits, 1, 100).unwrap().1.len(), 4);
        assert_eq!(logprobs(&[f32::NAN], 0, 0).err(), Some(SampleError::NaN));
        let (lp, top) = logprobs(&[f32::INFINITY, 0.0, f32::INFINITY], 1, 2).unwrap();
        assert_eq!(lp, f64::NEG_INFINITY);
        assert_eq!(top, vec![(0, -(2f64.ln())), (2, -(2f64.ln()))]);
        assert_eq!(logprobs(&[f32::NEG_INFINITY, 0.0], 0, 0).unwrap().0, f64::NEG_INFINITY);
    }

    /// Chi-square over 10 outcomes with a fixed seed: a sampler that drew
    /// from the wrong distribution (even 10% off on one token) fails it.
    #[test]
    fn draws_follow_the_distribution() {
        let logits: Vec<f32> = (0..10).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
        for (temperature, top_p) in [(1.0, 1.0), (0.5, 1.0), (1.7, 0.999_999)] {
            let w: Vec<f64> = logits.iter().map(|&x| (f64::from(x) / temperature).exp()).collect();
            let total: f64 = w.iter().sum();
            let n = 200_000;
            let mut counts = [0u32; 10];
            let mut s = Sampler::new(temperature, top_p, 0, Some(1234)).unwrap();
            for _ in 0..n {
                counts[s.sample(&logits, None).unwrap() as usize] += 1;
            }
            let chi2: f64 = counts
                .iter()
                .zip(&w)
                .map(|(&c, &wi)| {
                    let e = n as f64 * wi / total;
                    (f64::from(c) - e).powi(2) / e
                })
                .sum();
            // 9 degrees of freedom: P(chi2 > 27.9) = 0.001.
            assert!(chi2 < 27.9, "chi2 {chi2} at temperature {temperature}: {counts:?}");
        }
    }
}
