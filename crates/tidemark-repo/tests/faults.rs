//! Storage faults: transient failures are retried to success; permanent ones are reported with
//! the object and the location, and leave no snapshot.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemark_repo::key::Secret;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::backup::{Backup, BackupOptions};
use tidemark_repo::snapshot::EntryType;
use tidemark_repo::Repository;
use tidemark_storage::layer::{FaultLayer, FaultPlan, RetryLayer, RetryPolicy};
use tidemark_storage::{ObjectStorage, Storage};

fn retrying(inner: Arc<dyn Storage>) -> Arc<dyn Storage> {
    Arc::new(RetryLayer::new(
        inner,
        RetryPolicy {
            attempts: 5,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
        },
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_storage_failing_every_third_call_is_retried_and_the_data_comes_back() {
    // The fault layer stands in for a flaky network: real servers cannot fail on cue.
    let memory: Arc<dyn Storage> = Arc::new(ObjectStorage::memory());
    let faulty = Arc::new(FaultLayer::new(memory, FaultPlan::transient_every(3)));
    let storage = retrying(faulty.clone());
    let repo = Repository::init(storage.clone(), &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    let data = dump_like(300_000, 60);
    let (_, snap) = backup_bytes(&repo, "s", data.clone()).await;
    let repo = Repository::open(storage, &Secret::password("pw"))
        .await
        .unwrap();
    assert_eq!(restore_bytes(&repo, &snap).await.unwrap(), data);
    assert!(
        faulty.injected() > 5,
        "faults were injected: {}",
        faulty.injected()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_failure_names_the_object_and_location_and_leaves_no_snapshot() {
    let memory: Arc<dyn Storage> = Arc::new(ObjectStorage::memory());
    let repo = Repository::init(memory.clone(), &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    let broken = retrying(Arc::new(FaultLayer::new(
        memory.clone(),
        FaultPlan::permanent_under("data/"),
    )));
    let repo2 = Repository::open(broken, &Secret::password("pw"))
        .await
        .unwrap();
    let lock = LockGuard::acquire(&repo2, LockKind::Shared, "backup", &LockOptions::default())
        .await
        .unwrap();
    let mut b = Backup::start(&repo2, &lock, BackupOptions::default(), Default::default())
        .await
        .unwrap();
    let data = dump_like(300_000, 61);
    let added = b
        .add_stream(
            "s",
            EntryType::Stream,
            std::io::Cursor::new(data),
            None,
            None,
        )
        .await;
    let e = match added {
        Err(e) => e,
        Ok(_) => b.finish(Default::default()).await.unwrap_err(),
    };
    let msg = e.to_string();
    assert!(
        msg.contains("data/") && msg.contains("memory"),
        "names the pack and the location: {msg}"
    );
    assert!(repo.snapshots().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_whose_lock_cannot_be_refreshed_stops_without_a_snapshot() {
    let memory: Arc<dyn Storage> = Arc::new(ObjectStorage::memory());
    let faulty = Arc::new(FaultLayer::new(memory, FaultPlan::default()));
    let storage: Arc<dyn Storage> = faulty.clone();
    let repo = Repository::init(storage, &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    let opts = LockOptions {
        lease: Duration::from_millis(600),
        refresh: Duration::from_millis(200),
        ..Default::default()
    };
    let lock = LockGuard::acquire(&repo, LockKind::Shared, "backup", &opts)
        .await
        .unwrap();
    let mut b = Backup::start(&repo, &lock, BackupOptions::default(), Default::default())
        .await
        .unwrap();
    b.add_stream(
        "s",
        EntryType::Stream,
        std::io::Cursor::new(dump_like(50_000, 62)),
        None,
        None,
    )
    .await
    .unwrap();

    // The location stops accepting lock objects: the lease cannot be renewed.
    faulty.set_plan(FaultPlan::permanent_under("locks/"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let e = lock.check().unwrap_err();
    assert!(matches!(e, tidemark_repo::Error::LockLost(_)), "{e}");
    let e = b.finish(Default::default()).await.unwrap_err();
    assert!(matches!(e, tidemark_repo::Error::LockLost(_)), "{e}");
    faulty.set_plan(FaultPlan::default());
    assert!(
        repo.snapshots().await.unwrap().is_empty(),
        "no snapshot without a valid lock"
    );
}
