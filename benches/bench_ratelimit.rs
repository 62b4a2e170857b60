//! One admitted decision without Python; pairs with bench/bench_ratelimit.py
//! (same pattern: 1000 keys in turn, 1000 per minute, the real clock).
use _cheapest_core::ratelimit::{now_ns, Limit, RateLimiter};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("cheapest-bench-rl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rl = RateLimiter::open(&dir.join("rl"), 4096).unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    let limit = Limit::new(1000, 60.0).unwrap();
    let mut i = 0;
    c.benchmark_group("ratelimit: one decision").bench_function("rust", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            rl.acquire(black_box(&keys[i]), &limit, 1, now_ns()).unwrap().allowed
        })
    });
    drop(rl);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
