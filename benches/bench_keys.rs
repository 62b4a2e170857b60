//! check + hash of one key without Python; pairs with bench/bench_keys.py.
use _cheapest_core::keys::{self, KeyKind};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use hmac::{Hmac, Mac};
use sha2::Sha256;

fn bench(c: &mut Criterion) {
    let key = keys::generate(KeyKind::Secret).unwrap();
    let pepper = [b'p'; 32];
    let mut g = c.benchmark_group("keys: check_key + hash_key");
    g.bench_function("rust", |b| {
        b.iter(|| keys::check(black_box(&key), None).then(|| keys::hash(&key, &pepper).unwrap()))
    });
    // The peer: the same, keying HMAC with the pepper on every call (what
    // `keys::hash` avoids by keeping the keyed state per thread).
    g.bench_function("rust, HMAC keyed per call", |b| {
        b.iter(|| {
            keys::check(black_box(&key), None).then(|| {
                let mut m = Hmac::<Sha256>::new_from_slice(&pepper).unwrap();
                m.update(key.as_bytes());
                m.finalize().into_bytes()
            })
        })
    });
    g.finish();
    c.bench_function("keys: check_key alone/rust", |b| b.iter(|| keys::check(black_box(&key), None)));
}

criterion_group!(benches, bench);
criterion_main!(benches);
