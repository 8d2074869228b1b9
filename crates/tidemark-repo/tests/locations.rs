//! One repository at several locations (format §9a): one read writes every location; a failing
//! location is dropped and misses the snapshot while the others get it; `copy` fills the gap;
//! objects are verified before they are copied.

mod common;

use std::sync::Arc;

use common::*;
use tidemark_repo::key::Secret;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::backup::{Backup, BackupOptions, Finished};
use tidemark_repo::ops::check::{check, CheckOptions};
use tidemark_repo::ops::copy::{copy_segments, copy_snapshots};
use tidemark_repo::snapshot::EntryType;
use tidemark_repo::{Error, Repository};
use tidemark_storage::layer::{FaultLayer, FaultPlan};
use tidemark_storage::{LocalStorage, Storage};

fn dir(root: &std::path::Path, name: &str) -> Arc<dyn Storage> {
    Arc::new(LocalStorage::new(root.join(name), name).unwrap())
}

async fn lock(repo: &Repository) -> LockGuard {
    LockGuard::acquire(repo, LockKind::Shared, "backup", &LockOptions::default())
        .await
        .unwrap()
}

/// One backup of `data` to every repository in `repos`.
async fn backup_to(repos: &[Repository], data: Vec<u8>) -> tidemark_repo::Result<Finished> {
    let mut locks = Vec::new();
    for r in repos {
        locks.push(lock(r).await);
    }
    let targets = repos.iter().cloned().zip(locks.iter()).collect();
    let result = async {
        let mut b = Backup::start_at(targets, BackupOptions::default(), Default::default()).await?;
        b.add_stream(
            "dump",
            EntryType::Stream,
            std::io::Cursor::new(data),
            None,
            None,
        )
        .await?;
        b.finish_report(Default::default()).await
    }
    .await;
    for l in locks {
        l.release().await.unwrap();
    }
    result
}

async fn clean(repo: &Repository) {
    let r = check(repo, &CheckOptions { read_data: true })
        .await
        .unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_read_writes_two_locations_a_failing_one_misses_the_snapshot_and_copy_fills_it() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Repository::init(dir(tmp.path(), "a"), &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    let faulty = Arc::new(FaultLayer::new(dir(tmp.path(), "b"), FaultPlan::default()));
    let b = a.add_location(faulty.clone()).await.unwrap();
    // The second location opens with the same password and is the same repository.
    let b_opened = Repository::open(dir(tmp.path(), "b"), &Secret::password("pw"))
        .await
        .unwrap();
    assert!(a.same_repository(&b_opened));
    let e = a.add_location(dir(tmp.path(), "b")).await.unwrap_err();
    assert!(matches!(e, Error::AlreadyInitialized { .. }), "{e}");

    // 1. Both locations take the backup; the snapshot has one id everywhere.
    let first = dump_like(200_000, 1);
    let f = backup_to(&[a.clone(), b.clone()], first.clone())
        .await
        .unwrap();
    assert_eq!(f.missing().count(), 0);
    assert!(
        f.locations.iter().all(|l| l.new_chunks > 0),
        "{:?}",
        f.locations
    );
    for repo in [&a, &b_opened] {
        let snap = repo.load_snapshot(f.id).await.unwrap();
        assert_eq!(restore_bytes(repo, &snap).await.unwrap(), first);
        clean(repo).await;
    }

    // 2. Location b fails while packs are uploaded: a has the snapshot, b none.
    faulty.set_plan(FaultPlan::permanent_under("data/"));
    let mut second = dump_like(200_000, 1);
    second.extend(dump_like(50_000, 2));
    let f2 = backup_to(&[a.clone(), b.clone()], second.clone())
        .await
        .unwrap();
    let missing: Vec<_> = f2.missing().collect();
    assert_eq!(missing.len(), 1, "{:?}", f2.locations);
    assert_eq!(missing[0].location, "b");
    assert!(
        missing[0].error.as_deref().unwrap().contains("data/"),
        "the error names the object: {:?}",
        missing[0].error
    );
    // Deduplication is per location: a stored only what was new to it.
    assert!(f2.locations[0].new_chunks < f2.snapshot.summary.chunks / 2);
    assert!(a.load_snapshot(f2.id).await.is_ok());
    assert!(b_opened.load_snapshot(f2.id).await.is_err());
    clean(&b_opened).await;

    // 4. Copy fills b: the snapshot restores there, with only the missing packs copied.
    faulty.set_plan(FaultPlan::default());
    let l = lock(&b).await;
    let report = copy_snapshots(&a, &b, &l, &[f2.id]).await.unwrap();
    l.release().await.unwrap();
    assert_eq!(report.snapshots, vec![f2.id.to_string()]);
    assert!(report.packs > 0);
    let snap = b_opened.load_snapshot(f2.id).await.unwrap();
    assert_eq!(restore_bytes(&b_opened, &snap).await.unwrap(), second);
    clean(&b_opened).await;
    // Again: nothing to do.
    let l = lock(&b).await;
    let again = copy_snapshots(&a, &b, &l, &[f2.id]).await.unwrap();
    l.release().await.unwrap();
    assert_eq!(again.already_present, vec![f2.id.to_string()]);
    assert_eq!(again.packs, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_fails_only_when_every_location_fails_and_names_each() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Arc::new(FaultLayer::new(dir(tmp.path(), "c"), FaultPlan::default()));
    let d = Arc::new(FaultLayer::new(dir(tmp.path(), "d"), FaultPlan::default()));
    let rc = Repository::init(c.clone(), &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    let rd = rc.add_location(d.clone()).await.unwrap();
    c.set_plan(FaultPlan::permanent_under("data/"));
    d.set_plan(FaultPlan::permanent_under("index/"));
    let e = backup_to(&[rc.clone(), rd.clone()], dump_like(100_000, 4))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::EveryLocationFailed(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("c: ") && msg.contains("d: "), "{msg}");
    c.set_plan(FaultPlan::default());
    d.set_plan(FaultPlan::default());
    assert!(rc.snapshots().await.unwrap().is_empty());
    assert!(rd.snapshots().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn different_repositories_are_refused_as_locations_of_one_backup_or_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let x = Repository::init(dir(tmp.path(), "x"), &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    let y = Repository::init(dir(tmp.path(), "y"), &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    assert!(!x.same_repository(&y));
    let e = backup_to(&[x.clone(), y.clone()], dump_like(10, 5))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("\"x\"") && msg.contains("\"y\"") && msg.contains("different repositories"),
        "{msg}"
    );
    // attach: the same repository is reached without a password; another is refused, named;
    // an empty location is added.
    let e = x.attach(dir(tmp.path(), "y")).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("\"y\" holds a different repository than \"x\""),
        "{e}"
    );
    let z = x.attach(dir(tmp.path(), "z")).await.unwrap();
    assert!(x.same_repository(&z));
    assert!(x
        .attach(dir(tmp.path(), "z"))
        .await
        .unwrap()
        .same_repository(&x));
    let l = lock(&y).await;
    let e = copy_snapshots(&x, &y, &l, &[]).await.unwrap_err();
    l.release().await.unwrap();
    assert!(e.to_string().contains("different repositories"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_refuses_a_damaged_pack_and_leaves_no_snapshot_at_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Repository::init(dir(tmp.path(), "a"), &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    let (id, _) = backup_bytes(&a, "dump", dump_like(100_000, 6)).await;
    let b = a.add_location(dir(tmp.path(), "b")).await.unwrap();
    // Flip a byte in one pack at a.
    let pack = walk_files(&tmp.path().join("a/data"))
        .into_iter()
        .next()
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();
    let l = lock(&b).await;
    let e = copy_snapshots(&a, &b, &l, &[id]).await.unwrap_err();
    l.release().await.unwrap();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    let name = pack.file_name().unwrap().to_str().unwrap();
    assert!(
        e.to_string().contains(name) && e.to_string().contains("not copied"),
        "{e}"
    );
    assert!(b.snapshots().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn log_segments_are_copied_verified_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Repository::init(dir(tmp.path(), "a"), &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    let b = a.add_location(dir(tmp.path(), "b")).await.unwrap();
    let seg = |n: u64| bytes::Bytes::from(dump_like(20_000, n));
    for n in 1..=3u64 {
        let name = format!("{n:024}");
        tidemark_repo::log::write_segment(&a, "pg/42", &name, seg(n), serde_json::json!({"n": n}))
            .await
            .unwrap();
    }
    // b already has the first one.
    tidemark_repo::log::write_segment(
        &b,
        "pg/42",
        &format!("{:024}", 1),
        seg(1),
        serde_json::json!({"n": 1}),
    )
    .await
    .unwrap();
    let r = copy_segments(&a, &b, |_, _| true).await.unwrap();
    assert_eq!(r.segments, 2);
    for n in 1..=3u64 {
        let name = format!("{n:024}");
        assert_eq!(
            tidemark_repo::log::read_segment(&b, "pg/42", &name)
                .await
                .unwrap(),
            seg(n)
        );
        let info = tidemark_repo::log::segment_info(&b, "pg/42", &name)
            .await
            .unwrap();
        assert_eq!(info.meta, serde_json::json!({"n": n}));
    }
    assert_eq!(
        copy_segments(&a, &b, |_, _| true).await.unwrap().segments,
        0
    );
    // A damaged segment at the source is named and not copied.
    let name = format!("{:024}", 4);
    tidemark_repo::log::write_segment(&a, "pg/42", &name, seg(4), serde_json::Value::Null)
        .await
        .unwrap();
    let path = tmp.path().join("a/logs/pg/42").join(&name);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let e = copy_segments(&a, &b, |_, _| true).await.unwrap_err();
    assert!(e.to_string().contains(&name), "{e}");
    assert!(tidemark_repo::log::segment_info(&b, "pg/42", &name)
        .await
        .is_err());
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_reads_chunks_of_a_damaged_or_lost_pack_from_another_location() {
    let tmp = tempfile::tempdir().unwrap();
    // Small packs, so that the stream lies in several.
    let init = tidemark_repo::config::InitOptions {
        pack_size: tidemark_repo::config::PackSize {
            min: 64 << 10,
            max: 128 << 10,
        },
        ..small_init()
    };
    let a = Repository::init(dir(tmp.path(), "a"), &Secret::password("pw"), &init)
        .await
        .unwrap();
    let b = a.add_location(dir(tmp.path(), "b")).await.unwrap();
    let data = dump_like(200_000, 7);
    let f = backup_to(&[a.clone(), b.clone()], data.clone())
        .await
        .unwrap();
    let snap = a.load_snapshot(f.id).await.unwrap();
    // At a: one pack with a flipped byte, another gone.
    let packs = walk_files(&tmp.path().join("a/data"));
    assert!(packs.len() >= 2, "{packs:?}");
    let mut bytes = std::fs::read(&packs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&packs[0], bytes).unwrap();
    std::fs::remove_file(&packs[1]).unwrap();

    // Alone, a fails the restore, naming the damage.
    let e = restore_bytes(&a, &snap).await.unwrap_err();
    assert!(
        matches!(e, Error::Corrupt { .. } | Error::Storage(_)),
        "{e}"
    );
    // With b to fall back on, every byte comes back, verified, and the count says so.
    let with_b = a.clone().with_fallbacks(vec![b.clone()]).unwrap();
    assert_eq!(restore_bytes(&with_b, &snap).await.unwrap(), data);
    assert!(with_b.chunks_read_elsewhere() > 0);
    let whole = a.clone().with_fallbacks(vec![b.clone()]).unwrap();
    // Damage at b too, in every pack: the restore fails again instead of writing bad bytes.
    for p in walk_files(&tmp.path().join("b/data")) {
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        for i in (64..n).step_by(4096) {
            bytes[i] ^= 0xff;
        }
        std::fs::write(&p, bytes).unwrap();
    }
    let e = restore_bytes(&whole, &snap).await.unwrap_err();
    assert!(
        matches!(e, Error::Corrupt { .. } | Error::Storage(_)),
        "{e}"
    );
    assert_eq!(whole.chunks_read_elsewhere(), 0);

    // Another repository is refused as a fallback.
    let other = Repository::init(dir(tmp.path(), "c"), &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    let e = a.clone().with_fallbacks(vec![other]).unwrap_err();
    assert!(e.to_string().contains("different repository"), "{e}");
}
