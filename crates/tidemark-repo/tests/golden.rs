//! A repository written by format version 1 stays readable: the golden repository under
//! tests/fixtures/golden-v1 was written once (by `write_the_golden_repository`, ignored) and is
//! committed; every later build must open it and restore its snapshot byte for byte.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use tidemark_repo::config::InitOptions;
use tidemark_repo::key::{KdfParams, Secret};
use tidemark_repo::ops::check::{check, CheckOptions};
use tidemark_repo::Repository;
use tidemark_storage::{LocalStorage, Storage};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden-v1")
}

fn content() -> Vec<u8> {
    dump_like(20_000, 77)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_golden_v1_repository_is_readable_and_restores_exactly() {
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(fixture(), "golden-v1").unwrap());
    let repo = Repository::open(storage, &Secret::password("golden"))
        .await
        .unwrap();
    assert_eq!(repo.config().version, 1);
    let snaps = repo.snapshots().await.unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].1.tags, vec!["golden".to_owned()]);
    assert_eq!(restore_bytes(&repo, &snaps[0].1).await.unwrap(), content());
    let report = check(&repo, &CheckOptions { read_data: true })
        .await
        .unwrap();
    assert!(report.is_ok(), "{:?}", report.errors);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "writes the committed fixture; run once per format version"]
async fn write_the_golden_repository() {
    let _ = std::fs::remove_dir_all(fixture());
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(fixture(), "golden-v1").unwrap());
    let opts = InitOptions {
        kdf: KdfParams::insecure_for_tests(),
        ..Default::default()
    };
    let repo = Repository::init(storage, &Secret::password("golden"), &opts)
        .await
        .unwrap();
    let lock = tidemark_repo::lock::LockGuard::acquire(
        &repo,
        tidemark_repo::lock::LockKind::Shared,
        "backup",
        &Default::default(),
    )
    .await
    .unwrap();
    let o = tidemark_repo::ops::backup::BackupOptions {
        tags: vec!["golden".into()],
        ..Default::default()
    };
    let mut b = tidemark_repo::ops::backup::Backup::start(&repo, &lock, o, Default::default())
        .await
        .unwrap();
    b.add_stream(
        "golden.tsv",
        tidemark_repo::snapshot::EntryType::Stream,
        std::io::Cursor::new(content()),
        None,
        None,
    )
    .await
    .unwrap();
    b.finish(Default::default()).await.unwrap();
    lock.release().await.unwrap();
}
