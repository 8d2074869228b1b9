//! Log segments: stored whole, read whole or by range, idempotent on retry, damage detected.

mod common;

use bytes::Bytes;
use common::*;
use tidemark_repo::log::{
    list_segments, read_segment, read_segment_range, segment_info, write_segment, Written,
};
use tidemark_repo::Error;
use tidemark_storage::PutMode;

fn wal_like(len: usize, seed: u64) -> Bytes {
    let mut d = dump_like(len / 20 + 1, seed);
    assert!(d.len() >= len);
    d.truncate(len);
    Bytes::from(d)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_segment_is_read_back_whole_and_by_any_range() {
    let (_, repo) = memory_repo().await;
    let data = wal_like(16 << 20, 1);
    let meta = serde_json::json!({"start_lsn": "0/1000000", "end_lsn": "0/2000000"});
    let w = write_segment(
        &repo,
        "pg/7000/wal",
        "000000010000000000000001",
        data.clone(),
        meta.clone(),
    )
    .await
    .unwrap();
    assert_eq!(w, Written::Stored);
    assert_eq!(
        read_segment(&repo, "pg/7000/wal", "000000010000000000000001")
            .await
            .unwrap(),
        data
    );
    for r in [
        0..1,
        5..(3 << 20),
        (1 << 20) - 1..(1 << 20) + 1,
        (16 << 20) - 7..16 << 20,
    ] {
        let got = read_segment_range(&repo, "pg/7000/wal", "000000010000000000000001", r.clone())
            .await
            .unwrap();
        assert_eq!(
            got,
            data.slice(r.start as usize..r.end as usize),
            "range {r:?}"
        );
    }
    let info = segment_info(&repo, "pg/7000/wal", "000000010000000000000001")
        .await
        .unwrap();
    assert_eq!(info.meta, meta);
    assert_eq!(info.frames.len(), 16);
}

#[tokio::test(flavor = "multi_thread")]
async fn archiving_the_same_segment_twice_succeeds_but_different_content_is_refused() {
    let (_, repo) = memory_repo().await;
    let data = wal_like(100_000, 2);
    write_segment(
        &repo,
        "binlog",
        "mysql-bin.000001",
        data.clone(),
        serde_json::Value::Null,
    )
    .await
    .unwrap();
    let again = write_segment(
        &repo,
        "binlog",
        "mysql-bin.000001",
        data.clone(),
        serde_json::Value::Null,
    )
    .await
    .unwrap();
    assert_eq!(again, Written::AlreadyPresent);
    let e = write_segment(
        &repo,
        "binlog",
        "mysql-bin.000001",
        wal_like(100_000, 3),
        serde_json::Value::Null,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn segments_are_listed_in_position_order() {
    let (_, repo) = memory_repo().await;
    for n in ["0000000000000003", "0000000000000001", "0000000000000002"] {
        write_segment(&repo, "oplog", n, wal_like(10, 4), serde_json::Value::Null)
            .await
            .unwrap();
    }
    assert_eq!(
        list_segments(&repo, "oplog").await.unwrap(),
        vec!["0000000000000001", "0000000000000002", "0000000000000003"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_byte_in_a_segment_is_detected() {
    let (storage, repo) = memory_repo().await;
    let data = wal_like(3 << 20, 5);
    write_segment(&repo, "wal", "seg1", data, serde_json::Value::Null)
        .await
        .unwrap();
    let mut bytes = storage.get("logs/wal/seg1").await.unwrap().to_vec();
    bytes[100] ^= 1;
    storage
        .put("logs/wal/seg1", Bytes::from(bytes), PutMode::Overwrite)
        .await
        .unwrap();
    let e = read_segment(&repo, "wal", "seg1").await.unwrap_err();
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains("logs/wal/seg1"),
        "{e}"
    );
}

#[tokio::test]
async fn unsafe_names_are_refused() {
    let (_, repo) = memory_repo().await;
    for (s, n) in [
        ("../x", "a"),
        ("wal", "../a"),
        ("wal", ""),
        ("w al", "a"),
        ("wal//x", "a"),
    ] {
        assert!(
            write_segment(
                &repo,
                s,
                n,
                Bytes::from_static(b"x"),
                serde_json::Value::Null
            )
            .await
            .is_err(),
            "{s}/{n}"
        );
    }
}
