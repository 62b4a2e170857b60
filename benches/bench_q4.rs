//! The two 4-bit kernels on SmolLM2-135M's projection shapes, one thread: `q4` (fp32 weights, fp32 multiply-adds)
//! against `q4x` (x as block integers, integer dot products; its per-call split of x included), at one row of x
//! (batch-1 decode) and eight (a batch of eight), with the best instruction set and with AVX2. Weights are
//! ~0.3-1.1 MB, so this is the kernels' arithmetic from cache; bench/bench_inference.py measures whole decode
//! steps, where the weights stream from memory.
use _cheapest_core::kernels::q4::{self, Isa, Q4Format, Q4Weights};
use _cheapest_core::kernels::q4x::{self, Q4Grouped, Terms};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use half::f16;

fn bench(c: &mut Criterion) {
    let isa = Isa::detect();
    for (name, n, k) in [("gate_up 3072x576", 3072usize, 576usize), ("down 576x1536", 576, 1536), ("qkv 960x576", 960, 576)] {
        let blocks = n * k / 32;
        let codes: Vec<u8> = (0..blocks * 16).map(|i| (i * 7 + 3) as u8).collect();
        let scales: Vec<f16> = (0..blocks).map(|i| f16::from_f32(0.01 + (i % 5) as f32 * 0.001)).collect();
        let offsets: Vec<f16> = (0..blocks).map(|i| f16::from_f32(-0.08 + (i % 7) as f32 * 0.001)).collect();
        let rows = Q4Weights::new(n, k, &codes, &scales, Q4Format { offsets: Some(&offsets), zero_point: 0, group: 8 }).unwrap();
        let grouped = Q4Grouped::new(n, k, &codes, &scales, Some(&offsets), 0).unwrap();
        let mut g = c.benchmark_group(format!("q4 linear {name}"));
        for m in [1usize, 8] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 13) % 17) as f32 * 0.1 - 0.8).collect();
            let mut y = vec![0f32; m * n];
            g.bench_function(format!("fp32[m={m}]"), |b| b.iter(|| q4::matmul(&rows, black_box(&x), m, &mut y, isa)));
            g.bench_function(format!("int[m={m}]"), |b| b.iter(|| q4x::matmul(&grouped, &Terms::new(black_box(&x), k, 0), &mut y, isa)));
            if isa != Isa::Avx2 && Isa::available().contains(&Isa::Avx2) {
                // What a host without AVX-512 runs (its x split is the portable loop there; here it is not).
                g.bench_function(format!("fp32-avx2[m={m}]"), |b| b.iter(|| q4::matmul(&rows, black_box(&x), m, &mut y, Isa::Avx2)));
                g.bench_function(format!("int-avx2[m={m}]"), |b| b.iter(|| q4x::matmul(&grouped, &Terms::new(black_box(&x), k, 0), &mut y, Isa::Avx2)));
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
