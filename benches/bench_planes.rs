//! The two-plane 8-bit LM head (kernels::q8planes) on Gemma 3 270M's shape (262,144 x 640: 84 MB of high plane,
//! from memory), one thread: the coarse pass alone and the whole head (coarse pass, then the exact pass per row),
//! at one row of x (batch-1 decode) and eight (a batch of eight), with the best instruction set and with AVX2.
use _cheapest_core::kernels::q4::Isa;
use _cheapest_core::kernels::q8planes::{coarse_cols, logits, CoarseRow, Planes};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use half::f16;

fn bench(c: &mut Criterion) {
    let (n, k) = (262_144usize, 640usize);
    let hi: Vec<u8> = (0..n * k / 2).map(|i| (i * 7 + 3) as u8).collect();
    let lo: Vec<u8> = (0..n * k / 2).map(|i| (i * 13 + 5) as u8).collect();
    let scales: Vec<f16> = (0..n * k / 32).map(|i| f16::from_f32(0.01 + (i % 5) as f32 * 0.001)).collect();
    let w = Planes::new(n, k, &hi, &lo, &scales).unwrap();
    let mut isas = vec![Isa::detect()];
    if isas[0] != Isa::Avx2 && Isa::available().contains(&Isa::Avx2) {
        isas.push(Isa::Avx2);
    }
    let mut g = c.benchmark_group("two-plane head 262144x640");
    g.sample_size(10);
    for m in [1usize, 8] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 13) % 17) as f32 * 0.1 - 0.8).collect();
        let rows: Vec<CoarseRow> = x.chunks_exact(k).map(CoarseRow::new).collect();
        let (mut y, mut upper) = (vec![0f32; m * n], vec![0f32; m * n]);
        for &isa in &isas {
            let name = if isa == Isa::Avx2 { "-avx2" } else { "" };
            // SAFETY: y and upper are [M, N], all columns in range, rows made from K values each.
            g.bench_function(format!("coarse{name}[m={m}]"), |b| {
                b.iter(|| unsafe { coarse_cols(&w, black_box(&rows), y.as_mut_ptr(), upper.as_mut_ptr(), 0..n, isa) })
            });
            g.bench_function(format!("logits{name}[m={m}]"), |b| b.iter(|| logits(&w, black_box(&x), m, &mut y, isa)));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
