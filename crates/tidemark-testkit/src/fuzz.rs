//! A short, deterministic smoke run of fuzz targets for CI: each target over its seed corpus
//! (`fuzz/corpus/<target>/`, committed) and a fixed number of mutations of every seed (bit
//! flips, interesting bytes, cuts, repeats, insertions, splices with another seed). The
//! coverage-guided runs are `fuzz/` under cargo-fuzz (docs/testing.md); this only keeps what
//! they found from coming back and catches shallow regressions.

use std::path::{Path, PathBuf};

/// The workspace's `fuzz/corpus/<target>` directory.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

/// Run `f` over every seed of `target` and `mutations` mutants of each. Panics (failing the
/// test) with the target and the input's origin when `f` panics, or when there are no seeds.
pub fn smoke(target: &str, f: fn(&[u8]), mutations: usize) {
    let dir = corpus_dir(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("no seed corpus for {target} at {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).expect("seed")))
        .collect();
    seeds.sort();
    assert!(
        !seeds.is_empty(),
        "no seeds for {target} in {}",
        dir.display()
    );
    let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ target.len() as u64;
    let started = std::time::Instant::now();
    let mut runs = 0;
    for (i, (name, seed)) in seeds.iter().enumerate() {
        run(target, f, seed, name);
        for m in 0..mutations {
            let other = &seeds[(i + m) % seeds.len()].1;
            let input = mutate(seed, other, &mut rng);
            run(target, f, &input, &format!("mutant {m} of {name}"));
            runs += 1;
        }
    }
    eprintln!(
        "fuzz smoke {target}: {} seeds, {runs} mutants in {:.2}s",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}

fn run(target: &str, f: fn(&[u8]), input: &[u8], origin: &str) {
    if std::panic::catch_unwind(|| f(input)).is_err() {
        let keep = std::env::temp_dir().join(format!("tidemark-fuzz-{target}-crash"));
        let _ = std::fs::write(&keep, input);
        panic!(
            "fuzz target {target} panicked on {origin} ({} bytes, saved to {})",
            input.len(),
            keep.display()
        );
    }
}

fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

/// One to four mutations of `seed`.
pub fn mutate(seed: &[u8], other: &[u8], rng: &mut u64) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + next(rng) % 4 {
        let at = |rng: &mut u64, len: usize| (next(rng) % (len as u64 + 1)) as usize;
        match next(rng) % 7 {
            0 if !v.is_empty() => {
                let i = at(rng, v.len() - 1);
                v[i] ^= 1 << (next(rng) % 8);
            }
            1 if !v.is_empty() => {
                const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'9'];
                let i = at(rng, v.len() - 1);
                v[i] = INTERESTING[(next(rng) % 8) as usize];
            }
            2 => {
                let cut = at(rng, v.len());
                v.truncate(cut);
            }
            3 if !v.is_empty() => {
                let a = at(rng, v.len() - 1);
                let b = (a + 1 + at(rng, 64)).min(v.len());
                let piece = v[a..b].to_vec();
                let i = at(rng, v.len());
                v.splice(i..i, piece);
            }
            4 => {
                let i = at(rng, v.len());
                let n = 1 + at(rng, 16);
                let bytes: Vec<u8> = (0..n).map(|_| next(rng) as u8).collect();
                v.splice(i..i, bytes);
            }
            5 if !other.is_empty() => {
                let i = at(rng, v.len());
                let j = at(rng, other.len());
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            _ if v.len() >= 4 => {
                // A length or offset field set to an extreme.
                let i = at(rng, v.len() - 4);
                let x = [0u32, u32::MAX, 0x7fff_ffff, 1 << 24][(next(rng) % 4) as usize];
                v[i..i + 4].copy_from_slice(&x.to_le_bytes());
            }
            _ => {}
        }
    }
    v
}
