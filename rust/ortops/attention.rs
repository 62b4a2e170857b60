//! `cheapest.GroupAttention`: ONNX Runtime's GroupQueryAttention (com.microsoft, CPU, fp32) for a packed QKV
//! with rotary embeddings, computed per query (kernels::attention) where ONNX Runtime transposes the QKV,
//! rotates it into a temporary, and runs two small GEMMs and a softmax per batch row and head, each head a task
//! of its pool. A decode step of SmolLM2-135M has 30 of them.
//!
//! The semantics are GroupQueryAttention's, for the inputs the fused graph gives it:
//!   * the cache rows are right-padded: row b holds `seqlens_k[b] + 1` positions after this call;
//!   * a first prompt (S == total_sequence_length) starts at position 0 in every row (a right-padded batch of
//!     prompts); otherwise row b's S new tokens follow its `seqlens_k[b] + 1 - S` cached ones (several new
//!     tokens only for a batch of one, as ONNX Runtime requires);
//!   * the new keys (rotated) and values are written at those positions of present_key / present_value; when
//!     present and past are the same memory (the runner binds them so) nothing else moves, otherwise the past
//!     positions are copied first and the rest of present is zeroed;
//!   * query s of row b (at position t) attends keys 0..=t, or with `local_window_size` w only the last w of
//!     them (t - j < w: the sliding window of Mistral and Gemma 3 as transformers defines it and the converter
//!     sets w; tests/convert/test_group_attention.py checks it against ONNX Runtime 1.31's operator).
//!
//! Inputs:  qkv float [B, S, (H + 2 G) D], past_key and past_value float [B, G, C, D], seqlens_k int32 [B],
//!          total_sequence_length int32 (one value), cos_cache and sin_cache float [P, R / 2] (R <= D).
//! Attributes: num_heads (H), kv_num_heads (G), scale (float, 0 or absent: 1 / sqrt(D)), local_window_size
//!          (int, -1 or absent: none).
//! Outputs: float [B, S, H D], present_key and present_value float [B, G, max(C, total), D].

use core::ffi::CStr;
use core::ptr;

use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use super::{attribute, input, op, output, parallel, Api, Kernel, SharedIn, SharedOut, FLOAT, INT32};
use crate::kernels::attention::{attend, rotate};

pub(super) static OP: OrtCustomOp = op::<GroupAttention>();

const NAME: &str = "GroupAttention";

/// Queries per parallel task in a prompt (a decode step has one per row).
const QUERIES_PER_TASK: usize = 16;
/// Parallel tasks wanted at least (two threads, uneven work).
const MIN_TASKS: usize = 3;

struct GroupAttention {
    api: Api,
    heads: usize,
    kv_heads: usize,
    scale: f32,
    window: Option<usize>,
}

impl Kernel for GroupAttention {
    const NAME: &'static CStr = c"GroupAttention";
    const INPUTS: &'static [T] = &[FLOAT, FLOAT, FLOAT, INT32, INT32, FLOAT, FLOAT];
    const REQUIRED_INPUTS: usize = 7;
    const OUTPUTS: usize = 3;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let count = |name: &CStr| usize::try_from(attribute(api, info, name, None)?).map_err(|_| api.error("GroupAttention: head counts must be positive"));
        let (heads, kv_heads) = (count(c"num_heads")?, count(c"kv_num_heads")?);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(api.error("GroupAttention: num_heads must be a positive multiple of kv_num_heads"));
        }
        let mut scale = 0f32;
        let status = (api.get().KernelInfoGetAttribute_float)(info, c"scale".as_ptr(), &mut scale);
        if !status.0.is_null() {
            (api.get().ReleaseStatus)(status.0);
            scale = 0.0;
        }
        let window = usize::try_from(attribute(api, info, c"local_window_size", Some(-1))?).ok().filter(|&w| w > 0);
        Ok(GroupAttention { api, heads, kv_heads, scale, window })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let api = self.api;
        let err = |what: &str| api.error(&format!("{NAME}: {what}"));
        let (qkv, qd) = input(api, context, 0, NAME)?;
        let (past_k, kd) = input(api, context, 1, NAME)?;
        let (past_v, vd) = input(api, context, 2, NAME)?;
        let (seqlens, sd) = input(api, context, 3, NAME)?;
        let (total, td) = input(api, context, 4, NAME)?;
        let (cos, cd) = input(api, context, 5, NAME)?;
        let (sin, nd) = input(api, context, 6, NAME)?;
        let (h, g) = (self.heads, self.kv_heads);
        let [b, s, width] = dims::<3>(&qd).ok_or_else(|| err("qkv must be [batch, sequence, (num_heads + 2 kv_num_heads) head_size]"))?;
        if width % (h + 2 * g) != 0 {
            return Err(err("qkv's last dimension must be (num_heads + 2 kv_num_heads) * head_size"));
        }
        let d = width / (h + 2 * g);
        let [_, _, cap, _] = dims::<4>(&kd).filter(|k| k[0] == b && k[1] == g && k[3] == d && kd == vd).ok_or_else(|| err("past_key and past_value must be [batch, kv_num_heads, capacity, head_size]"))?;
        if dims::<1>(&sd) != Some([b]) || td.iter().product::<i64>() != 1 {
            return Err(err("seqlens_k must hold one value per row and total_sequence_length one value"));
        }
        let [positions, half] = dims::<2>(&cd).filter(|_| cd == nd).ok_or_else(|| err("cos_cache and sin_cache must be [positions, rotary_dim / 2]"))?;
        if half == 0 || 2 * half > d {
            return Err(err("the rotary dimension must be positive and at most head_size"));
        }
        let total = *total.cast::<i32>();
        let first = usize::try_from(total).ok() == Some(s);
        if s > 1 && !first && b != 1 {
            return Err(err("several new tokens after a cached past need a batch of one"));
        }
        let present = cap.max(usize::try_from(total).map_err(|_| err("total_sequence_length must not be negative"))?);
        // Row b's cached positions before this call.
        let seqlens = core::slice::from_raw_parts(seqlens.cast::<i32>(), b);
        let mut past = Vec::with_capacity(b);
        for &len in seqlens {
            let len = usize::try_from(i64::from(len) + 1).ok().filter(|&l| l >= 1).ok_or_else(|| err("seqlens_k must not be negative"))?;
            let p = if first { 0 } else { len.checked_sub(s).ok_or_else(|| err("seqlens_k + 1 must count the new tokens"))? };
            if p + s > present || p + s > positions {
                return Err(err("the new positions exceed the cache or the rotary tables"));
            }
            past.push(p);
        }
        let out = output(api, context, 0, &[b, s, h * d])?;
        let present_k = output(api, context, 1, &[b, g, present, d])?;
        let present_v = output(api, context, 2, &[b, g, present, d])?;
        if b * s == 0 {
            return Ok(());
        }
        let row = present * d; // one kv head's rows in present
        let (qkv, cos, sin) = (qkv.cast::<f32>().cast_const(), cos.cast::<f32>().cast_const(), sin.cast::<f32>().cast_const());
        let (pk, pv) = (present_k.cast::<f32>(), present_v.cast::<f32>());
        if pk != past_k.cast::<f32>() || pv != past_v.cast::<f32>() {
            if pk == past_k.cast::<f32>() || pv == past_v.cast::<f32>() {
                return Err(err("present must share both past buffers or neither"));
            }
            for bg in 0..b * g {
                let keep = past[bg / g] * d;
                for (dst, src) in [(pk, past_k.cast::<f32>().cast_const()), (pv, past_v.cast::<f32>().cast_const())] {
                    ptr::copy_nonoverlapping(src.add(bg * cap * d), dst.add(bg * row), keep);
                    ptr::write_bytes(dst.add(bg * row + keep), 0, row - keep);
                }
            }
        } else if cap != present {
            return Err(err("a shared past buffer must have room for total_sequence_length"));
        }
        // The new keys, rotated, and values into the cache before any query reads them.
        for (bi, &p) in past.iter().enumerate() {
            for si in 0..s {
                let t = p + si;
                let token = qkv.add((bi * s + si) * width);
                let (c, sn) = (core::slice::from_raw_parts(cos.add(t * half), half), core::slice::from_raw_parts(sin.add(t * half), half));
                for gi in 0..g {
                    let at = (bi * g + gi) * row + t * d;
                    let key = core::slice::from_raw_parts(token.add((h + gi) * d), d);
                    rotate(key, c, sn, core::slice::from_raw_parts_mut(pk.add(at), d));
                    ptr::copy_nonoverlapping(token.add((h + g + gi) * d), pv.add(at), d);
                }
            }
        }
        let blocks = s.div_ceil(QUERIES_PER_TASK);
        let scale = if self.scale == 0.0 { 1.0 / (d as f32).sqrt() } else { self.scale };
        let (window, per_kv) = (self.window, h / g);
        // A task takes every query head of one kv head, whose keys it then reads once for all of them, unless that
        // leaves fewer than MIN_TASKS tasks (Gemma 3's single kv head at batch 1): then the heads are split.
        let units = b * g * blocks;
        let split = (1..=per_kv).filter(|p| per_kv % p == 0).find(|&p| units * p >= MIN_TASKS).unwrap_or(per_kv);
        let hn = per_kv / split;
        let (qkv, cos, sin, pk, pv, out) = (SharedIn(qkv), SharedIn(cos), SharedIn(sin), SharedIn(pk.cast_const()), SharedIn(pv.cast_const()), SharedOut(out.cast::<f32>()));
        let past = &past;
        parallel(api, context, units * split, move |task| {
            let (bi, gi, part, block) = (task / (g * split * blocks), task / (split * blocks) % g, task / blocks % split, task % blocks);
            let h0 = gi * per_kv + part * hn;
            let kv = (bi * g + gi) * row;
            // SAFETY: the cache rows of (bi, gi) hold `present` positions; every task writes its own query heads
            // of out; the keys and values it reads were all written above.
            unsafe {
                let (keys, values) = (core::slice::from_raw_parts(pk.ptr().add(kv), row), core::slice::from_raw_parts(pv.ptr().add(kv), row));
                let mut q = vec![0f32; hn * d];
                let mut scores = Vec::new();
                for si in block * QUERIES_PER_TASK..((block + 1) * QUERIES_PER_TASK).min(s) {
                    let t = past[bi] + si;
                    let token = (bi * s + si) * width;
                    let (c, sn) = (core::slice::from_raw_parts(cos.ptr().add(t * half), half), core::slice::from_raw_parts(sin.ptr().add(t * half), half));
                    for (i, qi) in q.chunks_exact_mut(d).enumerate() {
                        rotate(core::slice::from_raw_parts(qkv.ptr().add(token + (h0 + i) * d), d), c, sn, qi);
                    }
                    // The sliding window: the last `w` positions, this one included (t - j < w).
                    let first = window.filter(|&w| t >= w).map_or(0, |w| t + 1 - w);
                    let o = core::slice::from_raw_parts_mut(out.ptr().add((bi * s + si) * h * d + h0 * d), hn * d);
                    attend(&q, hn, keys, values, first..t + 1, scale, &mut scores, o);
                }
            }
        })
    }
}

/// Dimensions of rank N, none negative.
fn dims<const N: usize>(d: &[i64]) -> Option<[usize; N]> {
    let d: Vec<usize> = d.iter().map(|&v| usize::try_from(v).ok()).collect::<Option<_>>()?;
    d.try_into().ok()
}
