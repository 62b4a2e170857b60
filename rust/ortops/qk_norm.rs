//! `cheapest.QkNorm`: a packed QKV tensor with every query and key head RMS-normalized (Gemma 3's q_norm and
//! k_norm), the values copied: one node where the fused graph has a Split, four Reshapes and two
//! SimplifiedLayerNormalization per layer, after which GroupQueryAttention reads the packed QKV.
//!
//! Each head of D values: `y = x * (1 / sqrt(sum(x * x) / D + epsilon)) * w` in fp32, the sum of squares taken
//! as ONNX Runtime 1.31's SimplifiedLayerNormalization takes it on x86 (eight lanes of fused multiply-adds, then
//! halves added: 8 -> 4 -> 2 -> 1), so the results are the same bits (tests/convert/test_architectures.py
//! compares the logits of both graphs; a head size that is not a multiple of 8 adds its tail last, which
//! may differ from ONNX Runtime in the last bit).
//!
//! Inputs:  QKV float [.., (num_heads + 2 * kv_num_heads) * head_dim], q_weight float [head_dim] and k_weight
//!          float [head_dim] (constant initializers).
//! Attributes: num_heads, kv_num_heads, head_dim (int), epsilon (float).
//! Output:  float, QKV's shape.

use core::ffi::CStr;

use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use super::{attribute, constant, op, parallel, row_io, Api, Kernel, SharedIn, SharedOut, FLOAT};

pub(super) static OP: OrtCustomOp = op::<QkNorm>();

/// Rows (tokens) per parallel task: a decode step's few rows stay on the calling thread.
const ROWS_PER_TASK: usize = 16;

struct QkNorm {
    api: Api,
    heads: usize,
    kv_heads: usize,
    dim: usize,
    epsilon: f32,
    q_weight: &'static [f32],
    k_weight: &'static [f32],
}

impl Kernel for QkNorm {
    const NAME: &'static CStr = c"QkNorm";
    const INPUTS: &'static [T] = &[FLOAT, FLOAT, FLOAT];
    const REQUIRED_INPUTS: usize = 3;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let count = |name: &CStr| usize::try_from(attribute(api, info, name, None)?).map_err(|_| api.error("QkNorm: head counts and head_dim must be non-negative"));
        let (heads, kv_heads, dim) = (count(c"num_heads")?, count(c"kv_num_heads")?, count(c"head_dim")?);
        let mut epsilon = 0f32;
        api.check((api.get().KernelInfoGetAttribute_float)(info, c"epsilon".as_ptr(), &mut epsilon))?;
        let missing = || api.error("QkNorm: the norm weights must be constant initializers");
        let q_weight = constant::<f32>(api, info, 1, "QkNorm")?.ok_or_else(missing)?;
        let k_weight = constant::<f32>(api, info, 2, "QkNorm")?.ok_or_else(missing)?;
        if dim == 0 || q_weight.len() != dim || k_weight.len() != dim {
            return Err(api.error(&format!("QkNorm: the norm weights must hold head_dim = {dim} > 0 values")));
        }
        Ok(QkNorm { api, heads, kv_heads, dim, epsilon, q_weight, k_weight })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let width = (self.heads + 2 * self.kv_heads) * self.dim;
        let (x, m, y) = row_io(self.api, context, width, width, "QkNorm")?;
        if m == 0 {
            return Ok(());
        }
        let (xp, yp) = (SharedIn(x), SharedOut(y));
        parallel(self.api, context, m.div_ceil(ROWS_PER_TASK), move |task| {
            for row in task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(m) {
                // SAFETY: x and y are [M, width]; each task reads and writes its own rows.
                let (x, y) = unsafe {
                    (core::slice::from_raw_parts(xp.ptr().add(row * width), width), core::slice::from_raw_parts_mut(yp.ptr().add(row * width), width))
                };
                self.row(x, y);
            }
        })
    }
}

impl QkNorm {
    fn row(&self, x: &[f32], y: &mut [f32]) {
        let d = self.dim;
        let normed = (self.heads + self.kv_heads) * d;
        for (h, (xh, yh)) in x[..normed].chunks_exact(d).zip(y[..normed].chunks_exact_mut(d)).enumerate() {
            let w = if h < self.heads { self.q_weight } else { self.k_weight };
            let inv = 1.0 / (sum_of_squares(xh) / d as f32 + self.epsilon).sqrt();
            for ((o, v), wv) in yh.iter_mut().zip(xh).zip(w) {
                *o = v * inv * wv;
            }
        }
        y[normed..].copy_from_slice(&x[normed..]);
    }
}

/// sum(x * x): eight running fused multiply-adds (lane l takes elements l, l + 8, ...), their halves added until
/// one is left, then any tail of fewer than eight.
fn sum_of_squares(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { sum_of_squares_avx2(x) };
    }
    let mut lanes = [0f32; 8];
    let whole = x.len() / 8 * 8;
    for chunk in x[..whole].chunks_exact(8) {
        for (acc, v) in lanes.iter_mut().zip(chunk) {
            *acc = v.mul_add(*v, *acc); // exactly rounded, with or without an FMA unit (then a libm call each)
        }
    }
    let mut width = 8;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    x[whole..].iter().fold(lanes[0], |acc, v| v.mul_add(*v, acc))
}

/// `sum_of_squares` with one vector of eight lanes: the same operations in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_of_squares_avx2(x: &[f32]) -> f32 {
    use core::arch::x86_64::*;
    let whole = x.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for i in (0..whole).step_by(8) {
        let v = _mm256_loadu_ps(x.as_ptr().add(i));
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    let four = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    let one = _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps::<1>(two, two)));
    x[whole..].iter().fold(one, |acc, v| v.mul_add(*v, acc))
}

#[cfg(test)]
mod tests {
    use super::sum_of_squares;

    #[test]
    fn sum_of_squares_takes_eight_lanes_then_halves() {
        let x: Vec<f32> = (0..19).map(|i| (i as f32 * 0.731).sin() * 3.0).collect();
        let lane = |l: usize| (l..16).step_by(8).fold(0f32, |acc, i| x[i].mul_add(x[i], acc));
        let l: Vec<f32> = (0..8).map(lane).collect();
        let four: Vec<f32> = (0..4).map(|i| l[i] + l[i + 4]).collect();
        let two = [four[0] + four[2], four[1] + four[3]];
        let want = (16..19).fold(two[0] + two[1], |acc, i| x[i].mul_add(x[i], acc));
        assert_eq!(sum_of_squares(&x).to_bits(), want.to_bits());
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            assert_eq!(unsafe { super::sum_of_squares_avx2(&x) }.to_bits(), want.to_bits());
        }
        assert_eq!(sum_of_squares(&[]), 0.0);
    }
}
