//! Backups come back whole; unchanged data is not stored twice; damage and wrong keys are loud.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use tidemark_repo::key::Secret;
use tidemark_repo::{Error, Repository};
use tidemark_storage::PutMode;

#[tokio::test(flavor = "multi_thread")]
async fn a_backed_up_stream_is_restored_byte_for_byte() {
    let (_, repo) = memory_repo().await;
    let data = dump_like(400_000, 1);
    let (_, snap) = backup_bytes(&repo, "dump.sql", data.clone()).await;
    assert_eq!(snap.streams[0].size, data.len() as u64);
    assert!(
        snap.summary.new_stored_bytes < data.len() as u64 / 2,
        "compressed: {:?}",
        snap.summary
    );
    assert_eq!(restore_bytes(&repo, &snap).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_backup_of_slightly_changed_data_stores_little() {
    let (_, repo) = memory_repo().await;
    let data = dump_like(400_000, 2);
    let (_, first) = backup_bytes(&repo, "dump.sql", data.clone()).await;
    let mut changed = data.clone();
    for i in 0..5 {
        let at = i * changed.len() / 5 + 1000;
        changed[at..at + 200].copy_from_slice(&[b'x'; 200]);
    }
    let (_, second) = backup_bytes(&repo, "dump.sql", changed.clone()).await;
    assert!(
        second.summary.new_stored_bytes * 3 < first.summary.new_stored_bytes,
        "{:?} vs {:?}",
        second.summary,
        first.summary
    );
    let (_, third) = backup_bytes(&repo, "dump.sql", changed.clone()).await;
    assert_eq!(third.summary.new_chunks, 0);
    assert_eq!(restore_bytes(&repo, &second).await.unwrap(), changed);
    assert_eq!(restore_bytes(&repo, &first).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_and_tiny_streams_round_trip() {
    let (_, repo) = memory_repo().await;
    let (_, s) = backup_bytes(&repo, "empty", Vec::new()).await;
    assert_eq!(restore_bytes(&repo, &s).await.unwrap(), Vec::<u8>::new());
    let (_, s) = backup_bytes(&repo, "tiny", b"x".to_vec()).await;
    assert_eq!(restore_bytes(&repo, &s).await.unwrap(), b"x");
}

#[tokio::test]
async fn a_wrong_password_is_reported_as_such() {
    let (storage, _) = memory_repo().await;
    let e = Repository::open(storage, &Secret::password("nope"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::WrongPassword { .. }), "{e}");
}

#[tokio::test]
async fn a_missing_repository_is_reported_as_such() {
    let storage: Arc<dyn tidemark_storage::Storage> =
        Arc::new(tidemark_storage::ObjectStorage::memory());
    let e = Repository::open(storage, &Secret::password("pw"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotARepository { .. }), "{e}");
}

#[tokio::test]
async fn a_corrupt_config_is_reported_as_damage() {
    let (storage, _) = memory_repo().await;
    let mut config = storage.get("config").await.unwrap().to_vec();
    config[40] ^= 1;
    storage
        .put("config", Bytes::from(config), PutMode::Overwrite)
        .await
        .unwrap();
    let e = Repository::open(storage, &Secret::password("pw"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("config"), "{e}");
}

#[tokio::test]
async fn init_refuses_an_existing_repository() {
    let (storage, _) = memory_repo().await;
    let e = Repository::init(storage, &Secret::password("pw"), &small_init())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyInitialized { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_byte_in_a_pack_fails_the_restore_without_writing_wrong_bytes() {
    let (storage, repo) = memory_repo().await;
    let data = dump_like(200_000, 3);
    let (_, snap) = backup_bytes(&repo, "dump.sql", data.clone()).await;
    let pack = storage.list("data/").await.unwrap().remove(0);
    let mut bytes = storage.get(&pack.path).await.unwrap().to_vec();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    storage
        .put(&pack.path, Bytes::from(bytes), PutMode::Overwrite)
        .await
        .unwrap();

    let index = repo.load_index().await.unwrap();
    let out = SharedBuf::default();
    let e = tidemark_repo::ops::restore::restore_stream(
        &repo,
        &index,
        &snap.streams[0],
        out.clone(),
        &Default::default(),
        Default::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains(&pack.path), "names the pack: {e}");
    let written = out.0.lock().unwrap().clone();
    assert!(written.len() < data.len());
    assert_eq!(
        &written[..],
        &data[..written.len()],
        "every byte written is correct"
    );
}

#[tokio::test]
async fn keys_can_be_added_listed_and_removed_but_not_the_last_or_current() {
    let (storage, repo) = memory_repo().await;
    let k2 = repo
        .add_key(
            &Secret::password("second"),
            tidemark_repo::key::KdfParams::insecure_for_tests(),
        )
        .await
        .unwrap();
    assert_eq!(repo.keys_list().await.unwrap().len(), 2);
    let repo2 = Repository::open(storage.clone(), &Secret::password("second"))
        .await
        .unwrap();
    assert_eq!(repo2.key_id(), k2);
    assert!(
        repo.remove_key(repo.key_id()).await.is_err(),
        "the key in use stays"
    );
    repo2.remove_key(repo.key_id()).await.unwrap();
    assert!(matches!(
        Repository::open(storage.clone(), &Secret::password("pw"))
            .await
            .unwrap_err(),
        Error::WrongPassword { .. }
    ));
    assert!(repo2.remove_key(k2).await.is_err(), "the last key stays");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_pack_makes_check_name_the_snapshots_that_need_it() {
    use tidemark_repo::ops::check::{check, CheckOptions};
    let (storage, repo) = memory_repo().await;
    let (id, _) = backup_bytes(&repo, "dump.sql", dump_like(100_000, 9)).await;
    let pack = storage.list("data/").await.unwrap().remove(0);
    storage.delete(&pack.path).await.unwrap();
    for read_data in [false, true] {
        let report = check(&repo, &CheckOptions { read_data }).await.unwrap();
        assert!(!report.is_ok());
        assert_eq!(
            report.damaged_snapshots,
            vec![id],
            "read_data = {read_data}: {:?}",
            report.errors
        );
    }
}

/// Pages of a database file: one changed page costs one fixed block, where content-defined
/// cutting of page-structured data would re-store far more (pitr.md §9).
#[tokio::test(flavor = "multi_thread")]
async fn fixed_blocks_store_one_block_per_changed_page_streamed_or_in_memory() {
    use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
    use tidemark_repo::ops::backup::{Backup, BackupOptions, Cutting};
    use tidemark_repo::progress::Progress;
    use tidemark_repo::snapshot::EntryType;

    let (_, repo) = memory_repo().await;
    // 3 MiB of 8 KiB "pages", each mostly zeros with a distinct header, like heap pages.
    let mut file = vec![0u8; 3 << 20];
    for (i, page) in file.chunks_mut(8192).enumerate() {
        page[..16].copy_from_slice(&(i as u128 * 0x9E37_79B9_7F4A_7C15).to_le_bytes());
        page[8000..8016].copy_from_slice(&(i as u128 ^ 0xABCD).to_le_bytes());
    }
    let backup = |data: Vec<u8>, streamed: bool| {
        let repo = repo.clone();
        async move {
            backup_cut(
                &repo,
                "base/1/16384",
                data,
                Cutting::Fixed(64 << 10),
                streamed,
            )
            .await
            .1
        }
    };
    let first = backup(file.clone(), true).await;
    assert_eq!(first.summary.chunks, 48, "{:?}", first.summary);
    let mut changed = file.clone();
    changed[200 * 8192 + 100] ^= 0xFF; // one byte of page 200: block 25
    let second = backup(changed.clone(), false).await;
    assert_eq!(second.summary.new_chunks, 1, "{:?}", second.summary);
    assert_eq!(
        second.streams[0].chunks[..25],
        first.streams[0].chunks[..25]
    );
    assert_eq!(restore_bytes(&repo, &second).await.unwrap(), changed);
    assert_eq!(restore_bytes(&repo, &first).await.unwrap(), file);

    // Out-of-range block sizes are refused, not silently used.
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
    let err = b
        .add_bytes_cut(
            "x",
            EntryType::File,
            vec![1; 10],
            None,
            None,
            Cutting::Fixed(0),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fixed block"), "{err}");
    lock.release().await.unwrap();
}

/// The first backup of blocks trains a zstd dictionary from its own blocks (format §5.1); the
/// next one compresses its new blocks with it and stores less; a fresh reader finds it; and a
/// lost dictionary is named by restore and check, while blocks written without one still
/// restore.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_backup_of_blocks_trains_a_dictionary_that_later_ones_use() {
    use tidemark_repo::ops::backup::Cutting;
    use tidemark_repo::ops::check::{check, CheckOptions};
    let (storage, repo) = memory_repo().await;
    // 16 MiB of 8 KiB pages of records drawn from a vocabulary of 4,096 words: each 64 KiB
    // block holds most words once, so a block alone compresses little that a dictionary
    // trained on other blocks does not know (like a table's recurring values).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let vocab: Vec<Vec<u8>> = (0..4096)
        .map(|_| {
            (0..24)
                .map(|_| b"abcdefghijklmnopqrstuvwxyz0123456789"[(next() % 36) as usize])
                .collect()
        })
        .collect();
    let pages = |seed: u64| -> Vec<u8> {
        let mut y = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
        let mut out = Vec::with_capacity(16 << 20);
        for i in 0..2048u64 {
            let start = out.len();
            out.extend_from_slice(&i.to_le_bytes());
            while out.len() - start < 8192 - 25 {
                y ^= y << 13;
                y ^= y >> 7;
                y ^= y << 17;
                out.extend_from_slice(&vocab[(y % 4096) as usize]);
                out.push(b'|');
            }
            out.resize(start + 8192, 0);
        }
        out
    };
    let first_data = pages(1);
    let first = backup_cut(
        &repo,
        "base/1/16384",
        first_data.clone(),
        Cutting::Fixed(64 << 10),
        true,
    )
    .await
    .1;
    let dicts = storage.list("dicts/").await.unwrap();
    assert_eq!(dicts.len(), 1, "the first backup trains one dictionary");
    let second_data = pages(2);
    let second = backup_cut(
        &repo,
        "base/1/16384",
        second_data.clone(),
        Cutting::Fixed(64 << 10),
        true,
    )
    .await
    .1;
    assert_eq!(
        storage.list("dicts/").await.unwrap().len(),
        1,
        "a repository with a dictionary trains no other"
    );
    // Equal amounts of new, similar data: the dictionary makes the second smaller.
    assert_eq!(first.summary.new_chunks, second.summary.new_chunks);
    assert!(
        (second.summary.new_stored_bytes as f64) < first.summary.new_stored_bytes as f64 * 0.95,
        "with a dictionary {} bytes, without {}",
        second.summary.new_stored_bytes,
        first.summary.new_stored_bytes
    );

    // A reader that opens the repository afresh loads the dictionary from storage.
    let fresh = Repository::open(storage.clone(), &Secret::password("pw"))
        .await
        .unwrap();
    assert_eq!(restore_bytes(&fresh, &second).await.unwrap(), second_data);
    assert_eq!(restore_bytes(&fresh, &first).await.unwrap(), first_data);
    let report = check(&fresh, &CheckOptions { read_data: true })
        .await
        .unwrap();
    assert!(report.is_ok(), "{:?}", report.errors);

    // The dictionary lost: what needs it fails loudly, naming it; the rest still restores.
    storage.delete(&dicts[0].path).await.unwrap();
    let fresh = Repository::open(storage.clone(), &Secret::password("pw"))
        .await
        .unwrap();
    let err = restore_bytes(&fresh, &second).await.unwrap_err();
    assert!(
        err.to_string().contains("zstd dictionary") && err.to_string().contains("dicts/"),
        "{err}"
    );
    assert_eq!(restore_bytes(&fresh, &first).await.unwrap(), first_data);
    let report = check(&fresh, &CheckOptions { read_data: true })
        .await
        .unwrap();
    assert!(!report.is_ok());
    assert!(
        report.errors.iter().any(|e| e.contains("zstd dictionary")),
        "{:?}",
        report.errors
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_sharing_a_budget_smaller_than_one_read_still_restore_whole() {
    // Four streams restored at once through one budget of a single unit: every read asks for
    // more than there is, gets the whole budget in turn, and none waits for ever.
    let (_, repo) = memory_repo().await;
    let mut snaps = Vec::new();
    for seed in 0..4 {
        let data = dump_like(300_000, 10 + seed);
        let (_, snap) = backup_bytes(&repo, "dump.sql", data.clone()).await;
        snaps.push((snap, data));
    }
    let index = Arc::new(repo.load_index().await.unwrap());
    let opts = tidemark_repo::ops::restore::RestoreOptions {
        window: 256 << 10,
        budget: Some(tidemark_repo::ops::restore::Budget::new(64 << 10)),
        ..Default::default()
    };
    let restores = snaps.iter().map(|(snap, _)| {
        let (repo, index, opts) = (repo.clone(), index.clone(), opts.clone());
        let stream = snap.streams[0].clone();
        async move {
            let out = SharedBuf::default();
            tidemark_repo::ops::restore::restore_stream(
                &repo,
                &index,
                &stream,
                out.clone(),
                &opts,
                Default::default(),
            )
            .await
            .unwrap();
            let bytes = out.0.lock().unwrap().clone();
            bytes
        }
    });
    let restored = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        futures::future::join_all(restores),
    )
    .await
    .expect("the streams finish");
    for ((_, data), got) in snaps.iter().zip(restored) {
        assert!(got == *data, "restored whole");
    }
}

/// A delta restore over an older, damaged copy of a tree rewrites only the chunks that
/// differ, removes what the snapshot does not have, replaces paths of the wrong kind, and
/// reports each file's CRC32C over its final content.
#[tokio::test(flavor = "multi_thread")]
async fn a_delta_restore_rewrites_only_what_differs_and_removes_the_rest() {
    use tidemark_repo::ops::backup::Cutting;
    use tidemark_repo::ops::restore::{restore_tree, restore_tree_with, ChunkCheck};

    let (_, repo) = memory_repo().await;
    let a: Vec<u8> = (0..3u32 << 20)
        .map(|i| ((i / 4096) ^ (i % 253)) as u8)
        .collect();
    let b = dump_like(2_000, 3);
    let c = b"small\n".to_vec();
    let files = [("t/a", &a), ("t/sub/b", &b), ("t/c", &c)];
    let snap = backup_files(&repo, &files, Cutting::Fixed(64 << 10)).await;
    let index = repo.load_index().await.unwrap();
    let entries: Vec<_> = snap.streams.iter().collect();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let root = dir.path().join("tree");
    restore_tree(
        &repo,
        &index,
        &entries,
        "t/",
        &root,
        Default::default(),
        ChunkCheck::Rehash,
    )
    .await
    .unwrap();

    // Damage: one byte of a's 11th block and a tail added; b gone; c a directory; extras.
    let mut damaged = a.clone();
    damaged[10 * 65536 + 7] ^= 0x55;
    damaged.extend_from_slice(&[9; 100]);
    std::fs::write(root.join("a"), &damaged).unwrap();
    std::fs::remove_file(root.join("sub/b")).unwrap();
    std::fs::remove_file(root.join("c")).unwrap();
    std::fs::create_dir_all(root.join("c/inner")).unwrap();
    std::fs::write(root.join("c/inner/x"), b"x").unwrap();
    std::fs::write(root.join("extra"), b"not in the snapshot").unwrap();
    std::fs::create_dir_all(root.join("sub/gone/deeper")).unwrap();
    std::fs::write(root.join("sub/gone/deeper/y"), b"y").unwrap();

    let (written, summary) = restore_tree_with(
        &repo,
        &index,
        &entries,
        "t/",
        &root,
        Default::default(),
        ChunkCheck::Rehash,
        true,
    )
    .await
    .unwrap();
    assert!(std::fs::read(root.join("a")).unwrap() == a, "a comes back");
    assert_eq!(std::fs::read(root.join("sub/b")).unwrap(), b);
    assert_eq!(std::fs::read(root.join("c")).unwrap(), c);
    assert!(!root.join("extra").exists() && !root.join("sub/gone").exists());
    for (name, data) in files {
        let w = written
            .iter()
            .find(|w| w.path == name.strip_prefix("t/").unwrap())
            .unwrap();
        assert_eq!(
            (w.size, w.crc32c),
            (data.len() as u64, crc32c::crc32c(data)),
            "{name}"
        );
    }
    // Only a's damaged block was fetched for a; b and c were written whole.
    assert_eq!(
        summary.bytes_written,
        65536 + b.len() as u64 + c.len() as u64,
        "{summary:?}"
    );
    assert_eq!(summary.bytes_kept, a.len() as u64 - 65536, "{summary:?}");
    // extra, sub/gone; c's directory was replaced, not counted as removed.
    assert_eq!(summary.removed, 2, "{summary:?}");
    assert_eq!((summary.files_written, summary.files_kept), (3, 0));

    // A second delta restore over the whole tree writes nothing.
    let (_, again) = restore_tree_with(
        &repo,
        &index,
        &entries,
        "t/",
        &root,
        Default::default(),
        ChunkCheck::Rehash,
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        (again.bytes_written, again.files_kept, again.removed),
        (0, 3, 0),
        "{again:?}"
    );
}
