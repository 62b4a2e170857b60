//! The int8 LM-head scoring kernels on SmolLM2-135M's head (49,152 x 576 8-bit codes, 28 MB: from memory), one
//! thread: `q8` (row-major, MatMulNBits' layout) against `q8g` (rows in groups of 16, one lane each), at one row
//! of x (batch-1 decode) and eight (a batch of eight), with the best instruction set and with AVX2. And
//! `q8f` (8-bit codes, fp32 x: `cheapest.Q8Linear`) with Gemma 3 270M's K (65536 x 640, rows interleaved in groups of 8 as
//! the converter writes them, fp16 scales: 42 MB, more than this box's L3, so from memory as in a decode step).
use _cheapest_core::kernels::q4::Isa;
use _cheapest_core::kernels::q8::{self, Q8Weights};
use _cheapest_core::kernels::q8f::{self, Q8FWeights, Q8Format};
use _cheapest_core::kernels::q8g::{self, group_codes, Q8Grouped};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let isa = Isa::detect();
    let (n, k) = (49_152usize, 576usize);
    let codes: Vec<u8> = (0..n * k).map(|i| (i * 7 + 3) as u8).collect();
    let scales: Vec<f32> = (0..n * k / 32).map(|i| 0.01 + (i % 5) as f32 * 0.001).collect();
    let rows = Q8Weights::new(n, k, &codes, &scales).unwrap();
    let (gc, gs) = group_codes(n, k, &codes, &scales);
    let grouped = Q8Grouped::new(n, k, &gc, &gs).unwrap();
    let mut g = c.benchmark_group("int8 head 49152x576");
    g.sample_size(20);
    for m in [1usize, 8] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 13) % 17) as f32 * 0.1 - 0.8).collect();
        let mut y = vec![0f32; m * n];
        g.bench_function(format!("row-major[m={m}]"), |b| b.iter(|| q8::matmul(&rows, black_box(&x), m, &mut y, isa)));
        g.bench_function(format!("grouped[m={m}]"), |b| b.iter(|| q8g::matmul(&grouped, black_box(&x), m, &mut y, isa)));
        if isa != Isa::Avx2 && Isa::available().contains(&Isa::Avx2) {
            g.bench_function(format!("row-major-avx2[m={m}]"), |b| b.iter(|| q8::matmul(&rows, black_box(&x), m, &mut y, Isa::Avx2)));
            g.bench_function(format!("grouped-avx2[m={m}]"), |b| b.iter(|| q8g::matmul(&grouped, black_box(&x), m, &mut y, Isa::Avx2)));
        }
    }
    g.finish();

    let (n, k) = (65_536usize, 640usize);
    let codes: Vec<u8> = (0..n * k).map(|i| (i * 7 + 3) as u8).collect();
    let scales: Vec<half::f16> = (0..n * k / 32).map(|i| half::f16::from_f32(0.01 + (i % 5) as f32 * 0.001)).collect();
    let w = Q8FWeights::new(n, k, 32, &codes, &scales, Q8Format { offsets: None, group: 8 }).unwrap();
    let mut g = c.benchmark_group("8-bit codes, fp32 x 65536x640");
    for m in [1usize, 8] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 13) % 17) as f32 * 0.1 - 0.8).collect();
        let mut y = vec![0f32; m * n];
        g.bench_function(format!("q8f[m={m}]"), |b| b.iter(|| q8f::matmul(&w, black_box(&x), m, &mut y, isa)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
