//! Damage that loses nothing is repairable, and no advice or prune loses data (issue #15 points
//! 1–3): a lost or damaged index object, and a pack whose header is damaged or cut off.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{backup_bytes, dump_like, memory_repo, restore_bytes};
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::check::{check, CheckOptions, CheckReport};
use tidemark_repo::ops::prune::{prune, PruneOptions};
use tidemark_repo::ops::repair::{repair_index, RepairOptions, RepairReport};
use tidemark_repo::Repository;
use tidemark_storage::{PutMode, Storage};

async fn exclusive(repo: &Repository) -> LockGuard {
    LockGuard::acquire(repo, LockKind::Exclusive, "test", &LockOptions::default())
        .await
        .unwrap()
}

async fn run_check(repo: &Repository, read_data: bool) -> CheckReport {
    check(repo, &CheckOptions { read_data }).await.unwrap()
}

async fn run_repair(repo: &Repository, read_headers: bool) -> RepairReport {
    let lock = exclusive(repo).await;
    let r = repair_index(
        repo,
        &lock,
        &RepairOptions {
            read_headers,
            dry_run: false,
        },
    )
    .await
    .unwrap();
    lock.release().await.unwrap();
    r
}

/// Prune with no grace period: whatever it may delete, it deletes now.
async fn prune_now(repo: &Repository) {
    let lock = exclusive(repo).await;
    prune(
        repo,
        &lock,
        &PruneOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    lock.release().await.unwrap();
}

async fn objects(storage: &Arc<dyn Storage>, dir: &str) -> Vec<String> {
    let mut v: Vec<String> = storage
        .list(dir)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.path)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_index_blocks_no_restore_misleads_no_prune_and_is_rebuilt() {
    let (storage, repo) = memory_repo().await;
    let data = dump_like(120_000, 3);
    let (_, snap) = backup_bytes(&repo, "dump.sql", data.clone()).await;
    let packs = objects(&storage, "data/").await;
    for i in objects(&storage, "index/").await {
        storage.delete(&i).await.unwrap();
    }

    // The restore reads the packs' headers instead of failing.
    assert_eq!(restore_bytes(&repo, &snap).await.unwrap(), data);

    // Check calls it repairable, and does not call the packs prune's to remove.
    let r = run_check(&repo, false).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.damaged_snapshots.is_empty());
    assert_eq!(r.unindexed_needed_packs, packs.len());
    assert_eq!(r.unindexed_packs, 0);
    assert!(
        r.repairable.iter().all(|l| l.contains("repair index")),
        "{:?}",
        r.repairable
    );

    // Prune with no grace period keeps every pack a snapshot needs (it indexes them again).
    prune_now(&repo).await;
    assert_eq!(objects(&storage, "data/").await, packs);
    assert_eq!(restore_bytes(&repo, &snap).await.unwrap(), data);

    // Once more from nothing: repair rebuilds the index; a second repair does nothing.
    for i in objects(&storage, "index/").await {
        storage.delete(&i).await.unwrap();
    }
    let first = run_repair(&repo, false).await;
    assert_eq!(first.packs_indexed, packs.len());
    assert!(first.unrepairable.is_empty());
    let again = run_repair(&repo, false).await;
    assert_eq!(again.packs_indexed, 0);
    assert!(again.indexes_removed.is_empty() && again.packs_rewritten.is_empty());
    let r = run_check(&repo, true).await;
    assert!(r.is_ok(), "{:?} {:?}", r.errors, r.repairable);
    assert_eq!(restore_bytes(&repo, &snap).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_index_object_is_left_out_and_repair_replaces_it() {
    let (storage, repo) = memory_repo().await;
    let data = dump_like(80_000, 4);
    let (_, snap) = backup_bytes(&repo, "dump.sql", data.clone()).await;
    let index = objects(&storage, "index/").await.remove(0);
    let mut bytes = storage.get(&index).await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    storage
        .put(&index, Bytes::from(bytes), PutMode::Overwrite)
        .await
        .unwrap();

    assert_eq!(restore_bytes(&repo, &snap).await.unwrap(), data);
    let r = run_check(&repo, false).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(
        r.repairable.iter().any(|l| l.contains(&index[6..])),
        "{:?}",
        r.repairable
    );

    // Prune refuses to work from an index it cannot read whole, and deletes nothing.
    let packs = objects(&storage, "data/").await;
    let lock = exclusive(&repo).await;
    let refused = prune(&repo, &lock, &PruneOptions::default())
        .await
        .unwrap_err();
    lock.release().await.unwrap();
    assert!(refused.to_string().contains("repair index"), "{refused}");
    assert_eq!(objects(&storage, "data/").await, packs);

    let fixed = run_repair(&repo, false).await;
    assert_eq!(fixed.indexes_removed, vec![index.clone()]);
    assert!(!objects(&storage, "index/").await.contains(&index));
    let r = run_check(&repo, true).await;
    assert!(r.is_ok(), "{:?} {:?}", r.errors, r.repairable);
}

/// The pack header is the pack's tail: damage it (`cut` false) or cut it off (`cut` true).
async fn damage_header(storage: &Arc<dyn Storage>, pack: &str, cut: bool) {
    let mut bytes = storage.get(pack).await.unwrap().to_vec();
    if cut {
        bytes.truncate(bytes.len() - 30);
    } else {
        let at = bytes.len() - 20;
        bytes[at] ^= 0x01;
    }
    storage
        .put(pack, Bytes::from(bytes), PutMode::Overwrite)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_or_cut_off_pack_header_is_repairable_not_lost_data() {
    for cut in [false, true] {
        let (storage, repo) = memory_repo().await;
        let data = dump_like(60_000, 5);
        let (id, snap) = backup_bytes(&repo, "dump.sql", data.clone()).await;
        let pack = objects(&storage, "data/").await.remove(0);
        damage_header(&storage, &pack, cut).await;

        let r = run_check(&repo, true).await;
        assert!(
            r.damaged_snapshots.is_empty(),
            "cut = {cut}: {id} restores whole, yet: {:?}",
            r.errors
        );
        assert!(r.errors.is_empty(), "cut = {cut}: {:?}", r.errors);
        assert_eq!(r.repairable.len(), 1, "cut = {cut}: {:?}", r.repairable);
        assert_eq!(restore_bytes(&repo, &snap).await.unwrap(), data);

        // Rewritten: the new pack has a header, and once prune has removed the old one after
        // its grace period, the index alone is no longer the only record of these blobs.
        let fixed = run_repair(&repo, true).await;
        assert_eq!(fixed.packs_rewritten.len(), 1, "cut = {cut}");
        assert!(fixed.unrepairable.is_empty(), "{:?}", fixed.unrepairable);
        prune_now(&repo).await;
        prune_now(&repo).await;
        assert!(!objects(&storage, "data/").await.contains(&pack));
        let r = run_check(&repo, true).await;
        assert!(r.is_ok(), "cut = {cut}: {:?} {:?}", r.errors, r.repairable);
        for i in objects(&storage, "index/").await {
            storage.delete(&i).await.unwrap();
        }
        assert_eq!(
            restore_bytes(&repo, &snap).await.unwrap(),
            data,
            "cut = {cut}"
        );
    }
}
