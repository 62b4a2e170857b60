//! Framing one chat chunk without Python; pairs with bench/bench_sse.py.
use _cheapest_core::sse::{Framer, ObjectKind};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let framer = Framer::new("chatcmpl-8f2c1e0b9a7d4c3e", "SmolLM2-135M-Instruct", 1_700_000_000, ObjectKind::ChatCompletionChunk);
    let piece: String = "He said \"bonjour\" \u{e0} Paris,\nthen left. ".repeat(5).chars().take(200).collect();
    let mut out = Vec::new();
    let mut g = c.benchmark_group("sse: one chat chunk");
    for (name, text) in [("token", " the"), ("piece", piece.as_str())] {
        g.bench_function(format!("rust[{name}]"), |b| {
            b.iter(|| {
                framer.delta(&mut out, black_box(text));
                out.len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
