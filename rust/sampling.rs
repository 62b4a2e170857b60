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
const WORDS_PER_BLOCK: usize = BLOCK / WORD;

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

/// A mask seen from word `.1` on (for one block of the logits).
#[derive(Clone, Copy)]
struct Offset<M>(M, usize);

impl<M: Mask> Mask for Offset<M> {
    #[inline(always)]
    fn word(self, w: usize) -> u32 {
        self.0.word(self.1 + w)
    }
}

/// Compiles `$f` twice, for the baseline and for AVX2, and runs the AVX2
/// build when the CPU has it. The same IEEE operations in the same order
/// on wider vectors: the results are identical, only faster.
macro_rules! with_avx2 {
    (fn $name:ident $(<$($g:ident: $b:path),*>)? ($($arg:ident: $ty:ty),*) -> $ret:ty = $f:ident) => {
        fn $name $(<$($g: $b),*>)? ($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2 $(<$($g: $b),*>)? ($($arg: $ty),*) -> $ret {
                    $f($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $f($($arg),*)
        }
    };
}

/// All ones when token `j` of a word with these bits is allowed, else 0:
/// an AND with a constant and a compare, which vectorizes everywhere.
#[inline(always)]
fn lane_mask(bits: u32, j: usize) -> u32 {
    if bits & (1u32 << j) != 0 {
        u32::MAX
    } else {
        0
    }
}

/// Every word with an allowed token: its index, its 32 logits, its allowed
/// bits. The last, partial word is copied into `tail`, padded with -inf,
/// and its padding is not allowed. Words are arrays, so the loops over them
/// have a known trip count and vectorize. (An iterator rather than a
/// callback: accumulators captured by a closure live in memory, and its
/// loops stay scalar.)
#[inline(always)]
fn words<'a, M: Mask + 'a>(
    logits: &'a [f32],
    mask: M,
    tail: &'a mut [f32; WORD],
) -> impl Iterator<Item = (usize, &'a [f32; WORD], u32)> + 'a {
    let (full, rest) = logits.as_chunks::<WORD>();
    tail[..rest.len()].copy_from_slice(rest);
    let tail: &'a [f32; WORD] = tail;
    let last = (!rest.is_empty()).then(|| (full.len(), tail, mask.word(full.len()) & (u32::MAX >> (WORD - rest.len()))));
    full.iter().enumerate().map(move |(w, xs)| (w, xs, mask.word(w))).chain(last).filter(|&(_, _, bits)| bits != 0)
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
    let scale = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
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

/// Sum of 32 values in a fixed order (eight lanes, then a fixed tree).
#[inline(always)]
fn word_sum(v: &[f32; WORD]) -> f32 {
    let mut lanes = [0f32; 8];
    for c in 0..WORD / 8 {
        for l in 0..8 {
            lanes[l] += v[c * 8 + l];
        }
    }
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// The weights of one word (0 where not allowed), into `out`; their sum.
#[inline(always)]
fn word_weights(xs: &[f32; WORD], bits: u32, max: f32, inv_t: f32, out: &mut [f32; WORD]) -> f32 {
    for j in 0..WORD {
        out[j] = f32::from_bits(weight(xs[j], max, inv_t).to_bits() & lane_mask(bits, j));
    }
    word_sum(out)
}

/// What one pass over the allowed logits found.
struct Extent {
    max: f32,
    nan: bool,
    candidates: usize,
}

/// Per-lane maxima, NaN flags and candidate counts of allowed logits.
struct Lanes {
    max: [f32; 8],
    nan: [u32; 8],
    count: [u32; 8],
}

impl Lanes {
    const EMPTY: Lanes = Lanes { max: [f32::NEG_INFINITY; 8], nan: [0; 8], count: [0; 8] };

    /// Folds in one word, a not-allowed logit counting as -inf.
    #[inline(always)]
    fn fold(&mut self, xs: &[f32; WORD], bits: u32) {
        for c in 0..WORD / 8 {
            for l in 0..8 {
                let j = c * 8 + l;
                let m = lane_mask(bits, j);
                let v = f32::from_bits((xs[j].to_bits() & m) | (f32::NEG_INFINITY.to_bits() & !m));
                self.nan[l] |= u32::from(v.is_nan());
                self.count[l] += u32::from(v > f32::NEG_INFINITY);
                self.max[l] = if v > self.max[l] { v } else { self.max[l] };
            }
        }
    }

    fn max(&self) -> f32 {
        self.max.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
    }
}

#[inline(always)]
fn extent_body<M: Mask>(logits: &[f32], mask: M) -> Extent {
    let mut lanes = Lanes::EMPTY;
    let mut tail = [0f32; WORD];
    for (_, xs, bits) in words(logits, mask, &mut tail) {
        lanes.fold(xs, bits);
    }
    Extent {
        max: lanes.max(),
        nan: lanes.nan.iter().any(|&n| n != 0),
        candidates: lanes.count.iter().map(|&c| c as usize).sum(),
    }
}

with_avx2!(fn extent<M: Mask>(logits: &[f32], mask: M) -> Extent = extent_body);

/// Greedy decoding in one pass: the first allowed token with the largest
/// logit (`None` if none is above -inf), or `Err` on a NaN. The maximum is
/// kept per lane over each block of 256 tokens and reduced once per block;
/// only the first block holding the overall maximum is searched for it.
#[inline(always)]
fn argmax_body<M: Mask>(logits: &[f32], mask: M) -> Result<Option<u32>, SampleError> {
    let mut best = f32::NEG_INFINITY;
    let mut best_block = None;
    let mut lanes = Lanes::EMPTY;
    let mut nan = false;
    let mut block = 0;
    let mut tail = [0f32; WORD];
    let mut close = |block: usize, lanes: &mut Lanes| {
        let top = lanes.max();
        // Strictly greater: the first block that holds the maximum wins.
        if top > best {
            best = top;
            best_block = Some(block);
        }
        nan |= lanes.nan.iter().any(|&n| n != 0);
        *lanes = Lanes::EMPTY;
    };
    for (w, xs, bits) in words(logits, mask, &mut tail) {
        if w / WORDS_PER_BLOCK != block {
            close(block, &mut lanes);
            block = w / WORDS_PER_BLOCK;
        }
        lanes.fold(xs, bits);
    }
    close(block, &mut lanes);
    if nan {
        return Err(SampleError::NaN);
    }
    let Some(b) = best_block else { return Ok(None) };
    let start = b * BLOCK;
    let end = (start + BLOCK).min(logits.len());
    Ok((start..end)
        .find(|&i| lane_mask(mask.word(i / WORD), i % WORD) != 0 && logits[i] == best)
        .map(|i| i as u32))
}

with_avx2!(fn argmax<M: Mask>(logits: &[f32], mask: M) -> Result<Option<u32>, SampleError> = argmax_body);

/// The sum of the weights of each block of `BLOCK` tokens, into `sums`.
#[inline(always)]
fn block_sums_body<M: Mask>(logits: &[f32], mask: M, max: f32, inv_t: f32, sums: &mut Vec<f64>) {
    sums.clear();
    sums.resize(logits.len().div_ceil(BLOCK), 0.0);
    let mut out = [0f32; WORD];
    let mut tail = [0f32; WORD];
    for (w, xs, bits) in words(logits, mask, &mut tail) {
        sums[w / WORDS_PER_BLOCK] += f64::from(word_weights(xs, bits, max, inv_t, &mut out));
    }
}

with_avx2!(fn block_sums<M: Mask>(logits: &[f32], mask: M, max: f32, inv_t: f32, sums: &mut Vec<f64>) -> () = block_sums_body);

/// Every weight (0 where not allowed), into `w` (padded to whole words);
/// their sum.
#[inline(always)]
fn all_weights_body<M: Mask>(logits: &[f32], mask: M, max: f32, inv_t: f32, w: &mut Vec<f32>) -> f64 {
    w.clear();
    w.resize(logits.len().next_multiple_of(WORD), 0.0);
    let (out, _) = w.as_chunks_mut::<WORD>();
    let mut tail = [0f32; WORD];
    let mut total = 0f64;
    for (k, xs, bits) in words(logits, mask, &mut tail) {
        if let Some(o) = out.get_mut(k) {
            total += f64::from(word_weights(xs, bits, max, inv_t, o));
        }
    }
    total
}

with_avx2!(fn all_weights<M: Mask>(logits: &[f32], mask: M, max: f32, inv_t: f32, w: &mut Vec<f32>) -> f64 = all_weights_body);

/// Calls `f(index, weight)` for every weight of `w` (whole words) whose
/// bits are in `lo..hi` (positive floats order like their bits). A word
/// without one costs one vectorized compare.
#[inline(always)]
fn each_in_range_body<F: FnMut(usize, f32)>(w: &[f32], lo: u32, hi: u32, mut f: F) {
    let (chunks, _) = w.as_chunks::<WORD>();
    for (k, xs) in chunks.iter().enumerate() {
        let mut hit = 0u32;
        for (j, &x) in xs.iter().enumerate() {
            let b = x.to_bits();
            hit |= u32::from(b >= lo && b < hi) << j;
        }
        while hit != 0 {
            let j = hit.trailing_zeros() as usize;
            hit &= hit - 1;
            f(k * WORD + j, xs[j]);
        }
    }
}

with_avx2!(fn each_in_range<F: FnMut(usize, f32)>(w: &[f32], lo: u32, hi: u32, f: F) -> () = each_in_range_body);

/// The sum of each block of the weights whose bits are at least `floor`.
#[inline(always)]
fn kept_block_sums_body(w: &[f32], floor: u32, sums: &mut Vec<f64>) {
    sums.clear();
    for block in w.chunks(BLOCK) {
        let mut sum = 0f64;
        for chunk in block.chunks_exact(WORD) {
            if let Ok(xs) = <&[f32; WORD]>::try_from(chunk) {
                let mut kept = [0f32; WORD];
                for j in 0..WORD {
                    kept[j] = if xs[j].to_bits() >= floor { xs[j] } else { 0.0 };
                }
                sum += f64::from(word_sum(&kept));
            }
        }
        sums.push(sum);
    }
}

with_avx2!(fn kept_block_sums(w: &[f32], floor: u32, sums: &mut Vec<f64>) -> () = kept_block_sums_body);

/// The block where the running sum of `sums` first exceeds `goal`, and
/// what is left of `goal` there. Rounding can leave `goal` past the last
/// sum: then the last block that weighs anything, and an infinite rest.
fn pick_block(sums: &[f64], goal: f64) -> Option<(usize, f64)> {
    let mut before = 0f64;
    for (b, &s) in sums.iter().enumerate() {
        if before + s > goal {
            return Some((b, goal - before));
        }
        before += s;
    }
    Some((sums.iter().rposition(|&s| s > 0.0)?, f64::INFINITY))
}

/// The index where the running sum of `weights` first exceeds `rest` (the
/// last positive one if rounding runs past the end).
fn pick_in(weights: &[f32], rest: f64) -> Option<usize> {
    let mut acc = 0f64;
    for (j, &wv) in weights.iter().enumerate() {
        acc += f64::from(wv);
        if acc > rest {
            return Some(j);
        }
    }
    weights.iter().rposition(|&wv| wv > 0.0)
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
        // Numeric order (-0.0 == 0.0, as the logits compare); NaN never gets here.
        self.0.partial_cmp(&other.0).unwrap_or(Ordering::Equal).then(other.1.cmp(&self.1))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The `k` best allowed tokens by logit (NaN-free input), best first.
#[inline(always)]
fn top_k_body<M: Mask>(logits: &[f32], mask: M, k: usize) -> Vec<Ranked> {
    // A min-heap of the best k so far; ids come in increasing order, so a
    // newcomer beats the worst kept one only with a strictly larger logit.
    // A word is looked at token by token only if one of its logits does.
    let mut heap: BinaryHeap<std::cmp::Reverse<Ranked>> = BinaryHeap::with_capacity(k + 1);
    let mut floor = f32::NEG_INFINITY;
    let mut tail = [0f32; WORD];
    for (w, xs, bits) in words(logits, mask, &mut tail) {
        let mut above = 0u32;
        for (j, &x) in xs.iter().enumerate() {
            above |= u32::from(x > floor) << j;
        }
        above &= bits;
        while above != 0 {
            let j = above.trailing_zeros() as usize;
            above &= above - 1;
            if xs[j] > floor {
                heap.push(std::cmp::Reverse(Ranked(xs[j], (w * WORD + j) as u32)));
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

with_avx2!(fn top_k<M: Mask>(logits: &[f32], mask: M, k: usize) -> Vec<Ranked> = top_k_body);

/// The smallest prefix of `ranked` (best first) whose weight, added to
/// `before`, reaches `target`; all of it if none does. With its weight.
fn nucleus(ranked: &[Ranked], before: f64, target: f64) -> (&[Ranked], f64) {
    let mut cumulative = 0f64;
    for (i, r) in ranked.iter().enumerate() {
        cumulative += f64::from(r.0);
        if before + cumulative >= target {
            return (&ranked[..i + 1], cumulative);
        }
    }
    (ranked, cumulative)
}

/// The token of `kept` where the running sum of weights first exceeds `goal`.
fn pick_ranked(kept: &[Ranked], goal: f64) -> Option<u32> {
    let mut acc = 0f64;
    for r in kept {
        acc += f64::from(r.0);
        if acc > goal {
            return Some(r.1);
        }
    }
    kept.iter().rev().find(|r| r.0 > 0.0).map(|r| r.1)
}

/// Buffers reused from one step to the next (one set per thread).
struct Scratch {
    /// Block sums.
    sums: Vec<f64>,
    /// Top-p: every weight, and the mass per bucket.
    weights: Vec<f32>,
    mass: Vec<f64>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> =
        const { RefCell::new(Scratch { sums: Vec::new(), weights: Vec::new(), mass: Vec::new() }) };
}

/// Bucket of a positive weight for top-p: its float bits without the low 18
/// mantissa bits (32 buckets per octave; bits order like positive floats).
const BUCKET_SHIFT: u32 = 18;

/// The number of buckets weights in (0, 1] fall into.
const BUCKETS: usize = (0x3F80_0000 >> BUCKET_SHIFT) + 1;

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
        if self.greedy() {
            return argmax(logits, mask)?.ok_or(SampleError::NoCandidate);
        }
        let ext = extent(logits, mask);
        if ext.nan {
            return Err(SampleError::NaN);
        }
        if ext.candidates == 0 {
            return Err(SampleError::NoCandidate);
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
            let (kept, sum) = nucleus(&kept, 0.0, self.top_p * total);
            pick_ranked(kept, u * sum)
        } else if self.top_p < 1.0 {
            SCRATCH.with(|s| self.draw_top_p(logits, mask, ext.max, inv_t, u, &mut s.borrow_mut()))
        } else {
            SCRATCH.with(|s| draw_all(logits, mask, ext.max, inv_t, u, &mut s.borrow_mut().sums))
        };
        chosen.ok_or(SampleError::NoCandidate)
    }

    /// Top-p over the whole vocabulary without sorting it: the weights'
    /// mass per bucket of float bits finds the bucket where the nucleus
    /// ends; everything above it is in, and only that bucket is sorted.
    #[allow(clippy::too_many_arguments)]
    fn draw_top_p<M: Mask>(
        &self,
        logits: &[f32],
        mask: M,
        max: f32,
        inv_t: f32,
        u: f64,
        Scratch { sums, weights: w, mass }: &mut Scratch,
    ) -> Option<u32> {
        let total = all_weights(logits, mask, max, inv_t, w);
        let target = self.top_p * total;
        // Weights below (1 - top_p) * total / n weigh at most (1 - top_p) *
        // total together, so the heaviest weights reach the target before
        // any of them: only the others are bucketed (a little margin for
        // rounding).
        let floor = ((1.0 - self.top_p) * total / logits.len() as f64 * 0.999) as f32;
        let everything = f32::INFINITY.to_bits();
        mass.clear();
        mass.resize(BUCKETS, 0.0);
        each_in_range(w, floor.to_bits().max(1), everything, |_, wv| {
            mass[((wv.to_bits() >> BUCKET_SHIFT) as usize).min(BUCKETS - 1)] += f64::from(wv);
        });
        let mut above = 0f64; // the mass of the buckets above `edge`
        let (mut edge, mut lowest) = (None, 0);
        for (k, &m) in mass.iter().enumerate().rev().filter(|&(_, &m)| m > 0.0) {
            if above + m >= target {
                edge = Some(k);
                break;
            }
            above += m;
            lowest = k;
        }
        // Rounding can keep the target out of reach: then every bucket is in.
        let edge = edge.unwrap_or_else(|| {
            above -= mass[lowest];
            lowest
        });
        let edge_bits = (edge as u32) << BUCKET_SHIFT;
        let next_bits = ((edge + 1) as u32) << BUCKET_SHIFT;
        let mut edge_ranked = Vec::new();
        each_in_range(w, edge_bits.max(1), next_bits, |i, wv| edge_ranked.push(Ranked(wv, i as u32)));
        edge_ranked.sort_unstable_by(|a, b| b.cmp(a));
        let (edge_kept, edge_sum) = nucleus(&edge_ranked, above, target);
        let goal = u * (above + edge_sum);
        if goal >= above {
            return pick_ranked(edge_kept, goal - above);
        }
        // In the buckets above the edge, in token order: block sums, then one block.
        kept_block_sums(w, next_bits, sums);
        let (b, rest) = pick_block(sums, goal)?;
        let block = &w[b * BLOCK..(b * BLOCK + BLOCK).min(w.len())];
        let kept: Vec<f32> = block.iter().map(|&wv| if wv.to_bits() >= next_bits { wv } else { 0.0 }).collect();
        pick_in(&kept, rest).map(|j| (b * BLOCK + j) as u32)
    }
}

/// A draw over every candidate: block sums first, then one block's weights.
fn draw_all<M: Mask>(logits: &[f32], mask: M, max: f32, inv_t: f32, u: f64, sums: &mut Vec<f64>) -> Option<u32> {
    block_sums(logits, mask, max, inv_t, sums);
    let total: f64 = sums.iter().sum();
    let (b, rest) = pick_block(sums, u * total)?;
    let start = b * BLOCK;
    let xs = &logits[start..(start + BLOCK).min(logits.len())];
    let mut weights = [[0f32; WORD]; WORDS_PER_BLOCK];
    let mut tail = [0f32; WORD];
    for (k, word, bits) in words(xs, Offset(mask, b * WORDS_PER_BLOCK), &mut tail) {
        word_weights(word, bits, max, inv_t, &mut weights[k]);
    }
    pick_in(&weights.as_flattened()[..xs.len()], rest).map(|j| (start + j) as u32)
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
        // -0.0 and 0.0 are the same logit: the lower id wins.
        assert_eq!(top_k(&[-0.0, 0.0, -0.0], AllowAll, 1), vec![Ranked(-0.0, 0)]);
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

    fn pseudo_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 16.0
            })
            .collect()
    }

    /// The AVX2 build and the baseline build give bit-identical results
    /// (what makes a seed reproducible across machines).
    #[test]
    fn the_avx2_and_baseline_passes_agree_bit_for_bit() {
        for n in [1, 31, 32, 33, 255, 256, 257, 5000] {
            let logits = pseudo_logits(n, n as u64);
            let mask: Vec<u32> = (0..n.div_ceil(32)).map(|i| 0x9E37_79B9u32.rotate_left(i as u32) | 1).collect();
            let max = extent(&logits, AllowAll).max;
            assert_eq!(extent_body(&logits, AllowAll).max, max);
            assert_eq!(extent_body(&logits, Bits(&mask)).candidates, extent(&logits, Bits(&mask)).candidates);
            assert_eq!(argmax_body(&logits, Bits(&mask)), argmax(&logits, Bits(&mask)));
            assert_eq!(argmax_body(&logits, AllowAll).unwrap().map(|i| logits[i as usize]), Some(max));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            block_sums_body(&logits, Bits(&mask), max, 1.3, &mut a);
            block_sums(&logits, Bits(&mask), max, 1.3, &mut b);
            assert_eq!(a, b);
            let (mut wa, mut wb) = (Vec::new(), Vec::new());
            assert_eq!(all_weights_body(&logits, AllowAll, max, 0.7, &mut wa), all_weights(&logits, AllowAll, max, 0.7, &mut wb));
            assert_eq!(wa, wb);
            assert_eq!(top_k_body(&logits, Bits(&mask), 7), top_k(&logits, Bits(&mask), 7));
        }
    }

    /// Top-p over a vocabulary large enough for the bucketed path: every
    /// draw is in the nucleus computed by sorting, and each of its tokens
    /// that weighs over 1% of it shows up.
    #[test]
    fn top_p_over_a_large_vocabulary_keeps_the_sorted_nucleus() {
        let logits = pseudo_logits(8192, 99);
        for (temperature, top_p) in [(1.0, 0.5), (0.3, 0.9), (2.0, 0.2)] {
            let inv_t = (1.0 / temperature) as f32;
            let max = extent(&logits, AllowAll).max;
            let mut ranked: Vec<Ranked> =
                logits.iter().enumerate().map(|(i, &x)| Ranked(weight(x, max, inv_t), i as u32)).collect();
            ranked.sort_unstable_by(|a, b| b.cmp(a));
            let total: f64 = ranked.iter().map(|r| f64::from(r.0)).sum();
            let (kept, sum) = nucleus(&ranked, 0.0, top_p * total);
            let inside: std::collections::HashSet<u32> = kept.iter().map(|r| r.1).collect();
            let mut s = Sampler::new(temperature, top_p, 0, Some(5)).unwrap();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..4000 {
                let t = s.sample(&logits, None).unwrap();
                assert!(inside.contains(&t), "token {t} outside the nucleus of {} at top_p {top_p}", kept.len());
                seen.insert(t);
            }
            for r in kept.iter().filter(|r| f64::from(r.0) > 0.01 * sum) {
                assert!(seen.contains(&r.1), "token {} never drawn", r.1);
            }
        }
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
