//! Locks, concurrent backups, and prune beside a running backup.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemark_repo::lock::{live_locks, LockGuard, LockKind, LockOptions, LockRecord};
use tidemark_repo::ops::backup::{Backup, BackupOptions};
use tidemark_repo::ops::check::{check, CheckOptions};
use tidemark_repo::ops::forget::{forget, KeepPolicy};
use tidemark_repo::ops::prune::{prune, PruneOptions};
use tidemark_repo::progress::Progress;
use tidemark_repo::snapshot::EntryType;
use tidemark_repo::Error;

fn no_grace() -> PruneOptions {
    PruneOptions {
        grace: Duration::ZERO,
        skew: Duration::ZERO,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_concurrent_backups_both_produce_valid_snapshots() {
    let (_, repo) = memory_repo().await;
    let (a, b) = (dump_like(300_000, 10), dump_like(300_000, 11));
    let (r1, r2) = tokio::join!(
        backup_bytes(&repo, "a", a.clone()),
        backup_bytes(&repo, "b", b.clone())
    );
    assert_eq!(restore_bytes(&repo, &r1.1).await.unwrap(), a);
    assert_eq!(restore_bytes(&repo, &r2.1).await.unwrap(), b);
    let report = check(&repo, &CheckOptions { read_data: true })
        .await
        .unwrap();
    assert!(report.is_ok(), "{:?}", report.errors);
    assert_eq!(report.snapshots, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_removes_data_of_forgotten_snapshots_after_the_mark_phase() {
    let (storage, repo) = memory_repo().await;
    let (_, keep) = backup_bytes(&repo, "s", dump_like(200_000, 20)).await;
    let (old_id, _) = backup_bytes(&repo, "s", dump_like(200_000, 21)).await;
    storage
        .delete(&format!("snapshots/{old_id}"))
        .await
        .unwrap();
    let packs_before = storage.list("data/").await.unwrap().len();

    let lock = LockGuard::acquire(&repo, LockKind::Exclusive, "prune", &LockOptions::default())
        .await
        .unwrap();
    let first = prune(&repo, &lock, &no_grace()).await.unwrap();
    assert!(
        first.packs_marked > 0 && first.packs_deleted == 0,
        "marks first: {first:?}"
    );
    let second = prune(&repo, &lock, &no_grace()).await.unwrap();
    assert_eq!(second.packs_deleted, first.packs_marked, "{second:?}");
    lock.release().await.unwrap();
    assert!(storage.list("data/").await.unwrap().len() < packs_before);
    assert_eq!(
        storage.list("index/").await.unwrap().len(),
        1,
        "indexes merged"
    );
    assert_eq!(
        restore_bytes(&repo, &keep).await.unwrap(),
        dump_like(200_000, 20)
    );
    assert!(check(&repo, &CheckOptions { read_data: true })
        .await
        .unwrap()
        .is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_beside_a_running_backup_never_deletes_what_the_backup_needs() {
    let (_, repo) = memory_repo().await;
    let base = dump_like(200_000, 30);
    let (old_id, _) = backup_bytes(&repo, "s", base.clone()).await;

    // A backup starts and deduplicates against the old snapshot's packs...
    let lock = LockGuard::acquire(&repo, LockKind::Shared, "backup", &LockOptions::default())
        .await
        .unwrap();
    let mut b = Backup::start(
        &repo,
        &lock,
        BackupOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    b.add_stream(
        "s",
        EntryType::Stream,
        std::io::Cursor::new(base.clone()),
        None,
        None,
    )
    .await
    .unwrap();

    // ...while the old snapshot is forgotten and prune runs twice, with no grace period.
    repo.storage()
        .delete(&format!("snapshots/{old_id}"))
        .await
        .unwrap();
    let plock = LockGuard::acquire(&repo, LockKind::Exclusive, "prune", &LockOptions::default())
        .await
        .unwrap();
    prune(&repo, &plock, &no_grace()).await.unwrap();
    let second = prune(&repo, &plock, &no_grace()).await.unwrap();
    assert_eq!(
        second.packs_deleted, 0,
        "the running backup's lock blocks deletion: {second:?}"
    );
    plock.release().await.unwrap();

    let (_, snap) = b.finish(Default::default()).await.unwrap();
    lock.release().await.unwrap();
    assert_eq!(restore_bytes(&repo, &snap).await.unwrap(), base);

    // Once the backup is done, prune sees the packs are used again and unmarks them.
    let plock = LockGuard::acquire(&repo, LockKind::Exclusive, "prune", &LockOptions::default())
        .await
        .unwrap();
    let third = prune(&repo, &plock, &no_grace()).await.unwrap();
    assert!(
        third.packs_unmarked > 0 && third.packs_deleted == 0,
        "{third:?}"
    );
    plock.release().await.unwrap();
    assert_eq!(restore_bytes(&repo, &snap).await.unwrap(), base);
}

#[tokio::test(flavor = "multi_thread")]
async fn forget_then_prune_keeps_every_remaining_snapshot_restorable() {
    let (_, repo) = memory_repo().await;
    let mut kept = Vec::new();
    for i in 0..4 {
        kept.push(backup_bytes(&repo, "s", dump_like(100_000, 40 + i)).await);
    }
    let plan = forget(
        &repo,
        &KeepPolicy {
            last: 2,
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    assert_eq!(plan.iter().filter(|d| !d.keep).count(), 2);
    let lock = LockGuard::acquire(&repo, LockKind::Exclusive, "prune", &LockOptions::default())
        .await
        .unwrap();
    prune(&repo, &lock, &no_grace()).await.unwrap();
    prune(&repo, &lock, &no_grace()).await.unwrap();
    lock.release().await.unwrap();
    for (i, (_, s)) in kept.iter().enumerate().skip(2) {
        assert_eq!(
            restore_bytes(&repo, s).await.unwrap(),
            dump_like(100_000, 40 + i as u64)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_exclusive_lock_is_refused_naming_the_holder() {
    let (_, repo) = memory_repo().await;
    let first = LockGuard::acquire(&repo, LockKind::Exclusive, "prune", &LockOptions::default())
        .await
        .unwrap();
    let e = LockGuard::acquire(&repo, LockKind::Exclusive, "prune", &LockOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Locked { .. }) && e.to_string().contains("prune"),
        "{e}"
    );
    let shared =
        LockGuard::acquire(&repo, LockKind::Shared, "backup", &LockOptions::default()).await;
    assert!(
        shared.is_ok(),
        "backups run beside prune: {:?}",
        shared.err()
    );
    first.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_lock_is_ignored_and_removed() {
    let (_, repo) = memory_repo().await;
    // A lock whose lease expired long ago, from a holder that died without cleaning up.
    let dead = LockRecord {
        kind: tidemark_repo::lock::LockKind::Exclusive,
        operation: "prune".into(),
        hostname: "gone-host".into(),
        pid: 1,
        created: chrono::Utc::now() - chrono::Duration::hours(2),
        expires: chrono::Utc::now() - chrono::Duration::hours(1),
        nonce: "00".into(),
    };
    tidemark_repo::lock::write_record_for_tests(&repo, &dead)
        .await
        .unwrap();
    assert_eq!(repo.storage().list("locks/").await.unwrap().len(), 1);
    let lock = LockGuard::acquire(&repo, LockKind::Exclusive, "prune", &LockOptions::default())
        .await
        .unwrap();
    assert!(
        live_locks(&repo, Duration::from_secs(30), false)
            .await
            .unwrap()
            .len()
            == 1,
        "only ours is live"
    );
    lock.release().await.unwrap();
    assert!(
        repo.storage().list("locks/").await.unwrap().is_empty(),
        "the stale lock was removed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_is_refreshed_by_its_heartbeat() {
    let (_, repo) = memory_repo().await;
    let opts = LockOptions {
        lease: Duration::from_secs(2),
        refresh: Duration::from_millis(300),
        ..Default::default()
    };
    let lock = LockGuard::acquire(&repo, LockKind::Shared, "backup", &opts)
        .await
        .unwrap();
    let first = repo.storage().list("locks/").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let later = repo.storage().list("locks/").await.unwrap();
    assert_eq!(later.len(), 1, "one lock object at a time");
    assert_ne!(first[0].path, later[0].path, "the lock object was renewed");
    lock.check().unwrap();
    lock.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_repacks_partly_used_packs_and_keeps_every_snapshot_whole() {
    let (storage, repo) = memory_repo().await;
    // Two streams in one snapshot share packs; forgetting one of two snapshots that each hold
    // half of a pack leaves that pack partly used.
    let (a, b) = (dump_like(60_000, 70), dump_like(60_000, 71));
    let lock = LockGuard::acquire(&repo, LockKind::Shared, "backup", &LockOptions::default())
        .await
        .unwrap();
    let mut bk = Backup::start(
        &repo,
        &lock,
        BackupOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    bk.add_stream(
        "a",
        EntryType::Stream,
        std::io::Cursor::new(a.clone()),
        None,
        None,
    )
    .await
    .unwrap();
    bk.add_stream(
        "b",
        EntryType::Stream,
        std::io::Cursor::new(b.clone()),
        None,
        None,
    )
    .await
    .unwrap();
    let (both_id, _) = bk.finish(Default::default()).await.unwrap();
    lock.release().await.unwrap();
    let (_, only_a) = backup_bytes(&repo, "a", a.clone()).await;
    storage
        .delete(&format!("snapshots/{both_id}"))
        .await
        .unwrap();

    let plock = LockGuard::acquire(&repo, LockKind::Exclusive, "prune", &LockOptions::default())
        .await
        .unwrap();
    let first = prune(&repo, &plock, &no_grace()).await.unwrap();
    assert_eq!(first.packs_repacked, 1, "{first:?}");
    let second = prune(&repo, &plock, &no_grace()).await.unwrap();
    assert_eq!(
        second.packs_deleted, 1,
        "the old pack goes once its mark is old enough: {second:?}"
    );
    plock.release().await.unwrap();
    assert_eq!(restore_bytes(&repo, &only_a).await.unwrap(), a);
    let report = check(&repo, &CheckOptions { read_data: true })
        .await
        .unwrap();
    assert!(report.is_ok(), "{:?}", report.errors);
}
