//! A short run of every fuzz target of the repository's decoders over its seed corpus and
//! mutations of it (issue #15 point 14; the long coverage-guided runs are under `fuzz/`, see
//! docs/testing.md). `write_seed_corpus` (ignored) regenerates the seeds from real objects.

mod common;

use common::{backup_bytes, dump_like, memory_repo};
use tidemark_repo::crypto::aad;
use tidemark_repo::fuzzing::TARGETS;
use tidemark_testkit::fuzz::{corpus_dir, smoke};

#[test]
fn every_decoder_survives_its_corpus_and_mutations_of_it() {
    for (name, f) in TARGETS {
        smoke(name, *f, 300);
    }
}

fn seed(target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// The seeds: the opened contents of the objects of a real repository (two backups and a log
/// segment), as the decoders meet them.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "writes fuzz/corpus; run by hand when the format changes"]
async fn write_seed_corpus() {
    let (storage, repo) = memory_repo().await;
    backup_bytes(&repo, "dump.sql", dump_like(30_000, 1)).await;
    backup_bytes(&repo, "other.sql", dump_like(5_000, 2)).await;
    let meta = serde_json::json!({"start": "0/1000000", "end": "0/2000000", "time": "2026-12-05T00:00:00Z"});
    tidemark_repo::log::write_segment(
        &repo,
        "pg-7000000000000000001",
        "000000010000000000000001",
        bytes::Bytes::from(vec![9u8; 300_000]),
        meta,
    )
    .await
    .unwrap();
    let keys = repo.keys();
    let all = storage.list("").await.unwrap();
    for (i, m) in all.iter().enumerate() {
        let bytes = storage.get(&m.path).await.unwrap();
        let tail = |b: &[u8]| {
            let n = u32::from_le_bytes(b[b.len() - 4..].try_into().unwrap()) as usize;
            (b.len() - 4 - n, b[b.len() - 4 - n..b.len() - 4].to_vec())
        };
        let dir = m.path.split('/').next().unwrap();
        match dir {
            "data" => {
                let (start, sealed) = tail(&bytes);
                let plain = keys.open(aad::PACK_HEADER, &sealed).unwrap();
                let mut input = (start as u32).to_le_bytes().to_vec();
                input.extend_from_slice(&plain);
                seed("pack_header", &format!("pack-{i}"), &input);
            }
            "index" | "snapshots" => {
                let (target, a) = if dir == "index" {
                    ("index", aad::INDEX)
                } else {
                    ("snapshot", aad::SNAPSHOT)
                };
                let compressed = keys.open(a, &bytes).unwrap();
                seed(target, &format!("{target}-{i}"), &compressed);
                let json = zstd::decode_all(&compressed[..]).unwrap();
                seed(&format!("{target}_json"), &format!("{target}-{i}"), &json);
            }
            "keys" => seed("key_object", &format!("key-{i}"), &bytes),
            "config" => seed(
                "config_object",
                "config",
                &keys.open(aad::CONFIG, &bytes).unwrap(),
            ),
            "logs" => {
                let (end, sealed) = tail(&bytes);
                let parts: Vec<&str> = m.path.split('/').collect();
                let footer_aad = format!("tidemark/log-footer/v1/{}/{}", parts[1], parts[2]);
                let plain = keys.open(footer_aad.as_bytes(), &sealed).unwrap();
                let mut input = (end as u32).to_le_bytes().to_vec();
                input.extend_from_slice(&plain);
                seed("segment_footer", &format!("footer-{i}"), &input);
            }
            _ => {}
        }
    }
}
