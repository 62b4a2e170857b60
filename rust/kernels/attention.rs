//! Causal self-attention of one query against a row of a KV cache, and the rotary embedding that precedes it:
//! the arithmetic of ONNX Runtime's GroupQueryAttention (CPU, fp32), done directly per query instead of as
//! small GEMMs per head (rust/ortops/attention.rs has the operator and its cache handling).
//!
//! For a query q (already rotated) and the keys / values K[j], V[j] of its kv head, j in `keys`:
//!
//! ```text
//!   s_j = scale * (q . K[j]),   p_j = exp(s_j - max s) / sum exp(s - max s),   out = sum_j p_j V[j]
//! ```
//!
//! in fp32: dot products in eight lanes (AVX2 + FMA) or one (portable), the exponentials by Cephes' polynomial
//! (kernels::cpu::exp256, within 2 ulp) or `f32::exp`, and `out` as `sum_j e_j V[j]` scaled once by
//! `1 / sum e`. Results agree with ONNX Runtime's to fp32 rounding, not to the bit (its GEMMs sum in another
//! order); tests/convert check the greedy tokens of whole models against transformers.

use core::ops::Range;

/// Rotary embedding with the halves not interleaved (`rotate_half`): for i < half,
/// `out[i] = x[i] cos[i] - x[i + half] sin[i]`, `out[i + half] = x[i + half] cos[i] + x[i] sin[i]`; elements
/// past `2 * half` (a partial rotary dimension) are copied. `cos` and `sin` hold the `half` values of one
/// position.
pub fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = cos.len();
    assert!(sin.len() == half && 2 * half <= x.len() && out.len() == x.len());
    for i in 0..half {
        let (re, im) = (x[i], x[i + half]);
        out[i] = re * cos[i] - im * sin[i];
        out[i + half] = im * cos[i] + re * sin[i];
    }
    out[2 * half..].copy_from_slice(&x[2 * half..]);
}

/// For each of the `heads` queries in `q` (rows of d values, d = q.len() / heads): `out = softmax(scale * q .
/// K[j]) V[j]` over the key rows `keys` of `k` and `v` (rows of d values, consecutive); the queries are the
/// heads that share one kv head, so each block of keys is read from memory once for all of them. `scores` is
/// scratch, grown as needed. `keys` must not be empty.
#[allow(clippy::too_many_arguments)]
pub fn attend(q: &[f32], heads: usize, k: &[f32], v: &[f32], keys: Range<usize>, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    assert!(heads > 0 && q.len() % heads == 0 && out.len() == q.len());
    let d = q.len() / heads;
    assert!(!keys.is_empty() && keys.end * d <= k.len() && keys.end * d <= v.len());
    // Room for whole vectors of eight per head: the exponentials are taken eight at a time, the tail included.
    let stride = keys.len().next_multiple_of(8);
    scores.clear();
    scores.resize(heads * stride, 0.0);
    #[cfg(target_arch = "x86_64")]
    if d % 8 == 0 && heads <= x86::MAX_HEADS && super::cpu::has_avx2() {
        // SAFETY: the features were just detected; rows and scratch sizes checked above.
        unsafe { x86::attend(q, heads, k, v, keys, scale, scores, out, std::arch::is_x86_feature_detected!("avx512f")) };
        return;
    }
    for ((qh, oh), sh) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).zip(scores.chunks_exact_mut(stride)) {
        portable(qh, k, v, keys.clone(), scale, sh, oh);
    }
}

fn portable(q: &[f32], k: &[f32], v: &[f32], keys: Range<usize>, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let d = q.len();
    let n = keys.len();
    for (s, j) in scores.iter_mut().zip(keys.clone()) {
        *s = scale * q.iter().zip(&k[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum::<f32>();
    }
    let max = scores[..n].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0.0;
    for s in &mut scores[..n] {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (e, j) in scores.iter().zip(keys) {
        for (o, x) in out.iter_mut().zip(&v[j * d..(j + 1) * d]) {
            *o += e * x;
        }
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;
    use core::ops::Range;

    use super::super::cpu::exp256;

    /// Values of `out` accumulated at once in the weighted sum of V (eight registers of eight).
    const CHUNK: usize = 64;
    /// Keys whose value rows (up to 32 KiB of Gemma 3's 256-value rows) every chunk of a wide row passes over in turn.
    const KEY_BLOCK: usize = 32;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// [sum of a[0], ..., sum of a[7]]: the lanes of eight vectors summed, in one vector.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sums8(a: [__m256; 8]) -> __m256 {
        let u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
    }

    /// Query heads one call takes at once (their running maxima stay in registers).
    pub(super) const MAX_HEADS: usize = 8;

    /// Eight keys' scores: eight running sums, one per key, then summed across lanes together.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn eight_scores(q: *const f32, rows: *const f32, d: usize) -> __m256 {
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut c = 0;
        while c < d {
            let qc = _mm256_loadu_ps(q.add(c));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qc, _mm256_loadu_ps(rows.add(r * d + c)), *a);
            }
            c += 8;
        }
        sums8(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend(q: &[f32], heads: usize, k: &[f32], v: &[f32], keys: Range<usize>, scale: f32, scores: &mut [f32], out: &mut [f32], wide: bool) {
        let d = q.len() / heads;
        let n = keys.len();
        let stride = n.next_multiple_of(8);
        let (qp, kp, vp, sp) = (q.as_ptr(), k.as_ptr(), v.as_ptr(), scores.as_mut_ptr());
        let vscale = _mm256_set1_ps(scale);
        let mut vmax = [_mm256_set1_ps(f32::NEG_INFINITY); MAX_HEADS];
        let mut inv = [0f32; MAX_HEADS];
        // The first keys' and values' lines, which the loop's own prefetches (16 rows ahead) never ask for.
        let mut off = 0;
        while off < 16.min(n) * d {
            _mm_prefetch::<_MM_HINT_T0>(kp.add(keys.start * d + off).cast());
            _mm_prefetch::<_MM_HINT_T1>(vp.add(keys.start * d + off).cast());
            off += 16;
        }
        // Blocks of eight keys, each read once and scored against every head while in L1.
        let mut i = 0;
        while i + 8 <= n {
            let rows = kp.add((keys.start + i) * d);
            // The block after next, asked for now: the hardware prefetcher alone left the first loads waiting.
            let ahead = rows.wrapping_add(16 * d);
            // The same keys' value rows, for the weighted sum after the scores: both streams in flight at once.
            let values = vp.add((keys.start + i) * d).wrapping_add(16 * d);
            let mut off = 0;
            while off < 8 * d {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off).cast());
                _mm_prefetch::<_MM_HINT_T1>(values.wrapping_add(off).cast());
                off += 16;
            }
            for (h, m) in vmax.iter_mut().enumerate().take(heads) {
                let s = _mm256_mul_ps(vscale, eight_scores(qp.add(h * d), rows, d));
                _mm256_storeu_ps(sp.add(h * stride + i), s);
                *m = _mm256_max_ps(*m, s);
            }
            i += 8;
        }
        let tail = i;
        for h in 0..heads {
            let mut max = hmax(vmax[h]);
            for i in tail..n {
                let row = kp.add((keys.start + i) * d);
                let mut a = _mm256_setzero_ps();
                let mut c = 0;
                while c < d {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(h * d + c)), _mm256_loadu_ps(row.add(c)), a);
                    c += 8;
                }
                let s = scale * hsum(a);
                *sp.add(h * stride + i) = s;
                max = max.max(s);
            }
            // exp(s - max) eight at a time; lanes past n are computed and never read.
            let e = sp.add(h * stride);
            let m = _mm256_set1_ps(max);
            let mut i = 0;
            while i < n {
                _mm256_storeu_ps(e.add(i), exp256(_mm256_sub_ps(_mm256_loadu_ps(e.add(i)), m)));
                i += 8;
            }
            let sum: f32 = scores[h * stride..h * stride + n].iter().sum();
            inv[h] = 1.0 / sum;
        }
        // Rows wider than one chunk of sums: the keys in blocks that stay in L1 while every chunk of the rows
        // passes over them, the sums kept in `out` between blocks (the same additions in the same order).
        let block = if d > CHUNK { KEY_BLOCK } else { n };
        if wide && d % CHUNK == 0 && heads <= WIDE_HEADS {
            // Every head at once: each value row read once for all of them (the same additions per element).
            let mut b0 = 0;
            while b0 < n {
                let part = keys.start + b0..keys.start + (b0 + block).min(n);
                let last = b0 + block >= n;
                let mut c0 = 0;
                while c0 < d {
                    let (e, v, o) = (sp.add(b0).cast_const(), vp.add(c0), out.as_mut_ptr().add(c0));
                    let args = (e, stride, v, d, part.clone(), b0 == 0, last, &inv, o);
                    match heads {
                        1 => weighted_rows512::<1>(args),
                        2 => weighted_rows512::<2>(args),
                        3 => weighted_rows512::<3>(args),
                        4 => weighted_rows512::<4>(args),
                        5 => weighted_rows512::<5>(args),
                        _ => weighted_rows512::<6>(args),
                    }
                    c0 += CHUNK;
                }
                b0 += block;
            }
            return;
        }
        for h in 0..heads {
            let e = sp.add(h * stride);
            let inv = _mm256_set1_ps(inv[h]);
            let op = out.as_mut_ptr().add(h * d);
            let mut b0 = 0;
            while b0 < n {
                let part = keys.start + b0..keys.start + (b0 + block).min(n);
                let (first, scale) = (b0 == 0, if b0 + block >= n { inv } else { _mm256_set1_ps(1.0) });
                let mut c0 = 0;
                while c0 + CHUNK <= d {
                    weighted_rows::<{ CHUNK / 8 }>(e.add(b0), vp.add(c0), d, part.clone(), first, scale, op.add(c0));
                    c0 += CHUNK;
                }
                while c0 < d {
                    weighted_rows::<1>(e.add(b0), vp.add(c0), d, part.clone(), first, scale, op.add(c0));
                    c0 += 8;
                }
                b0 += block;
            }
        }
    }

    /// Query heads the AVX-512 weighted sum takes at once: four registers of sums each, 24 in all.
    pub(super) const WIDE_HEADS: usize = 6;

    /// Arguments of `weighted_rows512`: exponentials (head h's at h * stride), value rows from chunk start, row
    /// length, keys, first block, last block, 1 / sum per head, out from chunk start (head h's at h * d).
    type WideArgs<'a> = (*const f32, usize, *const f32, usize, Range<usize>, bool, bool, &'a [f32; MAX_HEADS], *mut f32);

    /// For H heads, out[h][0..64] = (out[h] or 0 when first) + sum_i e[h][i] V[keys.start + i][0..64], scaled by
    /// 1 / sum on the last block: one load of each value row for every head. Per element the additions are those
    /// of `weighted_rows` (in key order, one fused multiply-add each), so the bits are the same.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn weighted_rows512<const H: usize>((e, stride, v, d, keys, first, last, inv, out): WideArgs) {
        let mut acc: [[__m512; 4]; H] = core::array::from_fn(|h| {
            core::array::from_fn(|r| if first { _mm512_setzero_ps() } else { _mm512_loadu_ps(out.add(h * d + 16 * r)) })
        });
        for (i, j) in keys.enumerate() {
            let row = v.add(j * d);
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(8 * d + 16 * l).cast());
            }
            let vr: [__m512; 4] = core::array::from_fn(|r| _mm512_loadu_ps(row.add(16 * r)));
            for (h, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*e.add(h * stride + i));
                for (x, y) in a.iter_mut().zip(vr) {
                    *x = _mm512_fmadd_ps(w, y, *x);
                }
            }
        }
        for (h, a) in acc.iter().enumerate() {
            let scale = _mm512_set1_ps(if last { inv[h] } else { 1.0 });
            for (r, x) in a.iter().enumerate() {
                _mm512_storeu_ps(out.add(h * d + 16 * r), _mm512_mul_ps(*x, scale));
            }
        }
    }

    /// out[0..8 W] = scale * (out or 0 when `first`) + sum_i e[i] V[keys.start + i][0..8 W]), the W vectors of sums
    /// in registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn weighted_rows<const W: usize>(e: *const f32, v: *const f32, d: usize, keys: Range<usize>, first: bool, scale: __m256, out: *mut f32) {
        let mut acc: [__m256; W] = core::array::from_fn(|r| if first { _mm256_setzero_ps() } else { _mm256_loadu_ps(out.add(8 * r)) });
        for (i, j) in keys.enumerate() {
            let w = _mm256_broadcast_ss(&*e.add(i));
            let row = v.add(j * d);
            let ahead = row.wrapping_add(8 * d);
            for l in 0..W.div_ceil(2) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * l).cast());
            }
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * r)), *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(8 * r), _mm256_mul_ps(*a, scale));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::Lcg;

    fn reference(q: &[f32], k: &[f32], v: &[f32], keys: Range<usize>, scale: f32) -> Vec<f64> {
        let d = q.len();
        let s: Vec<f64> = keys.clone().map(|j| f64::from(scale) * (0..d).map(|c| f64::from(q[c]) * f64::from(k[j * d + c])).sum::<f64>()).collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..d).map(|c| keys.clone().zip(&e).map(|(j, e)| e * f64::from(v[j * d + c])).sum::<f64>() / sum).collect()
    }

    #[test]
    fn attend_matches_the_definition_in_f64() {
        let mut rng = Lcg(7);
        // Head sizes with and without a partial chunk of 16 and of 64; key ranges of 1, a few, and not a
        // multiple of 8, starting past 0 (a sliding window).
        for (d, rows, keys) in [(64, 40, 0..37), (8, 5, 0..1), (24, 20, 3..20), (256, 30, 10..30), (72, 9, 0..9), (64, 300, 5..300), (32, 16, 0..16), (256, 100, 3..100), (136, 70, 0..65)] {
            let q: Vec<f32> = (0..d).map(|_| rng.float()).collect();
            let k: Vec<f32> = (0..rows * d).map(|_| rng.float() * 3.0).collect();
            let v: Vec<f32> = (0..rows * d).map(|_| rng.float()).collect();
            let want = reference(&q, &k, &v, keys.clone(), 0.125);
            let mut scores = Vec::new();
            let mut got = vec![f32::NAN; d];
            attend(&q, 1, &k, &v, keys.clone(), 0.125, &mut scores, &mut got);
            let mut port = vec![f32::NAN; d];
            portable(&q, &k, &v, keys.clone(), 0.125, &mut vec![0.0; keys.len().next_multiple_of(8)], &mut port);
            for c in 0..d {
                assert!((f64::from(got[c]) - want[c]).abs() < 1e-5, "d={d} c={c}: {} vs {}", got[c], want[c]);
                assert!((f64::from(port[c]) - want[c]).abs() < 1e-5, "portable d={d} c={c}: {} vs {}", port[c], want[c]);
            }
        }
    }

    #[test]
    fn heads_sharing_keys_match_one_at_a_time() {
        let mut rng = Lcg(11);
        for (heads, d, rows, keys) in [(3, 64, 50, 0..45), (4, 256, 20, 2..19), (2, 16, 9, 0..9)] {
            let q: Vec<f32> = (0..heads * d).map(|_| rng.float()).collect();
            let k: Vec<f32> = (0..rows * d).map(|_| rng.float() * 2.0).collect();
            let v: Vec<f32> = (0..rows * d).map(|_| rng.float()).collect();
            let mut scores = Vec::new();
            let mut together = vec![f32::NAN; heads * d];
            attend(&q, heads, &k, &v, keys.clone(), 0.1, &mut scores, &mut together);
            for h in 0..heads {
                let mut alone = vec![f32::NAN; d];
                attend(&q[h * d..(h + 1) * d], 1, &k, &v, keys.clone(), 0.1, &mut scores, &mut alone);
                assert_eq!(alone, together[h * d..(h + 1) * d], "heads={heads} h={h}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_weighted_sum_gives_the_avx2_bits() {
        if !(std::arch::is_x86_feature_detected!("avx512f") && crate::kernels::cpu::has_avx2()) {
            return;
        }
        let mut rng = Lcg(13);
        for (heads, d, rows, keys) in [(3, 64, 70, 0..70), (4, 256, 90, 5..90), (6, 128, 20, 0..13), (1, 64, 9, 2..9)] {
            let q: Vec<f32> = (0..heads * d).map(|_| rng.float()).collect();
            let k: Vec<f32> = (0..rows * d).map(|_| rng.float() * 2.0).collect();
            let v: Vec<f32> = (0..rows * d).map(|_| rng.float()).collect();
            let run = |wide: bool| {
                let mut scores = vec![0.0; heads * keys.len().next_multiple_of(8)];
                let mut out = vec![f32::NAN; heads * d];
                // SAFETY: the features were just detected; sizes as `attend` sets them.
                unsafe { x86::attend(&q, heads, &k, &v, keys.clone(), 0.1, &mut scores, &mut out, wide) };
                out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(run(true), run(false), "heads={heads} d={d}");
        }
    }

    #[test]
    fn rotate_turns_each_pair_by_its_angle_and_copies_the_rest() {
        let x: Vec<f32> = (0..10).map(|i| i as f32 + 1.0).collect();
        let angles = [0.0f32, 0.5, -1.0, 2.0];
        let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
        let mut out = vec![0.0; 10];
        rotate(&x, &cos, &sin, &mut out);
        for i in 0..4 {
            let (re, im) = (x[i], x[i + 4]);
            assert!((out[i] - (re * angles[i].cos() - im * angles[i].sin())).abs() < 1e-6);
            assert!((out[i + 4] - (im * angles[i].cos() + re * angles[i].sin())).abs() < 1e-6);
            assert!((out[i].hypot(out[i + 4]) - re.hypot(im)).abs() < 1e-5, "a rotation keeps the length");
        }
        assert_eq!(&out[8..], &x[8..]);
    }
}
