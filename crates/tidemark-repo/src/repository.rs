//! Opening and creating a repository, and reading and writing its sealed JSON objects.

use std::collections::HashSet;
use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tidemark_storage::{ErrorKind, ObjectMeta, PutMode, Storage};

use crate::config::{InitOptions, RepoConfig};
use crate::crypto::{aad, AuthFailed, Keys, MasterKey};
use crate::dict::Dictionaries;
use crate::error::{Error, Result};
use crate::id::{ChunkId, IndexId, KeyId, SnapshotId};
use crate::index::{IndexFile, IndexPack, MasterIndex};
use crate::key::{KdfParams, KeyFile, Secret};
use crate::pack::PackBuilder;
use crate::snapshot::Snapshot;

/// Reads of JSON objects in flight at once.
const LOAD_CONCURRENCY: usize = 16;
/// Largest JSON object we decompress (a defence against decompression bombs).
const MAX_JSON: u64 = 1 << 30;

/// The index objects of a location: those that read whole, and the damaged ones.
#[derive(Debug, Default)]
pub(crate) struct IndexFiles {
    /// Readable objects with their listing metadata.
    pub files: Vec<(IndexId, ObjectMeta, IndexFile)>,
    /// Damaged objects and why.
    pub damaged: Vec<(IndexId, Error)>,
}

/// The ids read, and the in-memory index of the objects that are not superseded.
pub(crate) fn index_of(
    files: Vec<(IndexId, ObjectMeta, IndexFile)>,
) -> (Vec<IndexId>, MasterIndex) {
    let superseded: HashSet<IndexId> = files
        .iter()
        .flat_map(|(_, _, f)| f.supersedes.iter().copied())
        .collect();
    let mut index = MasterIndex::new();
    let mut ids = Vec::new();
    for (id, _, f) in files {
        ids.push(id);
        if superseded.contains(&id) {
            continue;
        }
        for p in f.packs {
            index.add_pack(p);
        }
    }
    (ids, index)
}

/// An open repository: a location, its keys and its config. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Repository {
    storage: Arc<dyn Storage>,
    keys: Arc<Keys>,
    // Kept (zeroed on drop) so that `key add` can wrap it for a new secret.
    master: Arc<MasterKey>,
    config: Arc<RepoConfig>,
    key_id: KeyId,
    /// The zstd dictionaries, loaded on first use and shared by clones.
    dicts: Arc<std::sync::RwLock<Option<Arc<Dictionaries>>>>,
    /// Other locations of this repository that restores read a chunk from when this
    /// location's copy is missing or damaged (format §9a).
    fallbacks: Arc<crate::ops::restore::Fallbacks>,
}

impl Repository {
    /// Create a repository on an empty location, with `secret` as its first key.
    ///
    /// # Errors
    /// `AlreadyInitialized` if a config or keys exist; storage errors.
    pub async fn init(
        storage: Arc<dyn Storage>,
        secret: &Secret,
        opts: &InitOptions,
    ) -> Result<Repository> {
        let location = storage.name().to_owned();
        match storage.head("config").await {
            Ok(_) => return Err(Error::AlreadyInitialized { location }),
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if !storage.list("keys/").await?.is_empty() {
            return Err(Error::AlreadyInitialized { location });
        }
        let config = RepoConfig::new(opts)?;
        let master = MasterKey::generate();
        let keys = Keys::derive(&master);
        let key_id = write_key(&*storage, &master, secret, opts.kdf).await?;
        let json = serde_json::to_vec(&config).expect("config serializes");
        let sealed = keys.seal(aad::CONFIG, &json);
        match storage
            .put("config", Bytes::from(sealed), PutMode::CreateNew)
            .await
        {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::AlreadyExists => {
                // Another init won the race; leave its repository alone.
                storage.delete(&format!("keys/{key_id}")).await?;
                return Err(Error::AlreadyInitialized { location });
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Repository::assemble(storage, keys, master, config, key_id))
    }

    /// A fingerprint of the repository at `storage`, without a key: the BLAKE3 hash of its
    /// `config` object. That object is written once, with a random id and nonce, and copied
    /// byte for byte to other locations (format §9a), so the fingerprint is the same at every
    /// location of one repository and differs for a repository created again at the same
    /// place. Callers that cache something per repository check it cheaply with this, and
    /// learn the repository's id only by opening it.
    ///
    /// # Errors
    /// `NotARepository` when there is no config; storage errors.
    pub async fn fingerprint(storage: &dyn Storage) -> Result<String> {
        match storage.get("config").await {
            Ok(b) => Ok(blake3::hash(&b).to_hex().to_string()),
            Err(e) if e.kind == ErrorKind::NotFound => Err(Error::NotARepository {
                location: storage.name().to_owned(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Open a repository with `secret`.
    ///
    /// # Errors
    /// `NotARepository` when there is no config, `WrongPassword` when no key opens,
    /// `Corrupt` or `UnsupportedVersion` for a damaged or newer config.
    pub async fn open(storage: Arc<dyn Storage>, secret: &Secret) -> Result<Repository> {
        let location = storage.name().to_owned();
        let config_bytes = match storage.get("config").await {
            Ok(b) => b,
            Err(e) if e.kind == ErrorKind::NotFound => {
                return Err(Error::NotARepository { location })
            }
            Err(e) => return Err(e.into()),
        };
        let key_objects = storage.list("keys/").await?;
        if key_objects.is_empty() {
            return Err(Error::NotARepository { location });
        }
        let mut found = None;
        for meta in &key_objects {
            let kf = load_key(&*storage, &meta.path).await?;
            // Argon2id takes a noticeable fraction of a second: keep it off the async workers.
            let (secret2, path) = (secret.clone(), meta.path.clone());
            let unwrapped = tokio::task::spawn_blocking(move || kf.unwrap_master(&secret2, &path))
                .await
                .map_err(|e| Error::Invalid(format!("key derivation failed: {e}")))??;
            if let Some(master) = unwrapped {
                let id: KeyId = meta.path.trim_start_matches("keys/").parse()?;
                found = Some((master, id));
                break;
            }
        }
        let Some((master, key_id)) = found else {
            return Err(Error::WrongPassword { location });
        };
        let keys = Keys::derive(&master);
        let config = read_config(&keys, &config_bytes)?;
        Ok(Repository::assemble(storage, keys, master, config, key_id))
    }

    /// Make an empty location a second home of this repository (format §9a): copy its key
    /// objects, then its config, byte for byte, so that every object is valid at both.
    ///
    /// # Errors
    /// `AlreadyInitialized` naming the location when it holds a repository already (open it
    /// and compare with `same_repository` instead); storage errors.
    pub async fn add_location(&self, storage: Arc<dyn Storage>) -> Result<Repository> {
        let location = storage.name().to_owned();
        match storage.head("config").await {
            Ok(_) => return Err(Error::AlreadyInitialized { location }),
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        // Keys first, the config last: the config is what makes a location a repository.
        for meta in self.storage.list("keys/").await? {
            copy_object(&*self.storage, &*storage, &meta.path).await?;
        }
        if copy_object(&*self.storage, &*storage, "config").await? == 0 {
            // Another process made it a repository meanwhile.
            return Err(Error::AlreadyInitialized { location });
        }
        Ok(self.at(storage))
    }

    /// Reach this repository at another location without deriving the key again: the
    /// location's config must open with this repository's key (format §9a). An empty location
    /// is made a home of the repository first (`add_location`).
    ///
    /// # Errors
    /// `Invalid` naming both locations when the location holds another repository, or objects
    /// but no config; storage errors.
    pub async fn attach(&self, storage: Arc<dyn Storage>) -> Result<Repository> {
        let location = storage.name().to_owned();
        let config = match storage.get("config").await {
            Ok(b) => b,
            Err(e) if e.kind == ErrorKind::NotFound => {
                for dir in ["keys/", "snapshots/", "index/"] {
                    if !storage.list(dir).await?.is_empty() {
                        return Err(Error::Invalid(format!(
                            "location {location:?} holds repository objects ({dir}) but no config: it is damaged or half-made; repair or empty it before using it as a location of {:?}",
                            self.location()
                        )));
                    }
                }
                tracing::info!(
                    "location {location:?} is empty: adding it as a location of the repository at {:?}",
                    self.location()
                );
                return self.add_location(storage).await;
            }
            Err(e) => return Err(e.into()),
        };
        let same = read_config(&self.keys, &config).is_ok_and(|c| c.id == self.config.id);
        if !same {
            return Err(Error::Invalid(format!(
                "location {location:?} holds a different repository than {:?} (its config does not open with this repository's key); give it its own empty location, or add one with `tidemark init --copy-from`",
                self.location()
            )));
        }
        Ok(self.at(storage))
    }

    /// This repository, reached through another location holding the same objects.
    fn at(&self, storage: Arc<dyn Storage>) -> Repository {
        Repository {
            storage,
            keys: self.keys.clone(),
            master: self.master.clone(),
            config: self.config.clone(),
            key_id: self.key_id,
            dicts: Arc::default(),
            fallbacks: Arc::default(),
        }
    }

    /// This repository, with `others` (the same repository at other locations, from `attach`)
    /// to read a chunk from when a restore finds this location's copy missing or damaged.
    ///
    /// # Errors
    /// `Invalid` naming a location that holds another repository.
    pub fn with_fallbacks(mut self, others: Vec<Repository>) -> Result<Repository> {
        if let Some(o) = others.iter().find(|o| !self.same_repository(o)) {
            return Err(Error::Invalid(format!(
                "location {:?} holds a different repository than {:?}",
                o.location(),
                self.location()
            )));
        }
        self.fallbacks = Arc::new(crate::ops::restore::Fallbacks::new(others));
        Ok(self)
    }

    /// The other locations restores fall back to.
    pub(crate) fn fallbacks(&self) -> &crate::ops::restore::Fallbacks {
        &self.fallbacks
    }

    /// The other locations restores fall back to, in order.
    pub fn fallback_repositories(&self) -> Vec<Repository> {
        self.fallbacks.repositories()
    }

    /// Chunks restores have read from another location because this one's copy was missing or
    /// damaged (each also logged as a warning, naming the pack).
    pub fn chunks_read_elsewhere(&self) -> u64 {
        self.fallbacks.read_elsewhere()
    }

    /// Whether `other` is the same repository (same id and same master key) at any location.
    pub fn same_repository(&self, other: &Repository) -> bool {
        const PROBE: &[u8] = b"tidemark: same repository?";
        self.config.id == other.config.id && self.keys.chunk_id(PROBE) == other.keys.chunk_id(PROBE)
    }

    fn assemble(
        storage: Arc<dyn Storage>,
        keys: Keys,
        master: MasterKey,
        config: RepoConfig,
        key_id: KeyId,
    ) -> Self {
        Repository {
            storage,
            keys: Arc::new(keys),
            master: Arc::new(master),
            config: Arc::new(config),
            key_id,
            dicts: Arc::default(),
            fallbacks: Arc::default(),
        }
    }

    /// The storage location.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The location's name, for messages.
    pub fn location(&self) -> &str {
        self.storage.name()
    }

    /// The derived keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The key this repository was opened with.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The repository's zstd dictionaries (format §5.1), listed once per repository handle.
    ///
    /// # Errors
    /// Storage errors and damaged dictionary objects.
    pub async fn dictionaries(&self) -> Result<Arc<Dictionaries>> {
        if let Some(d) = self.dicts.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(d);
        }
        let d = Arc::new(crate::dict::load(self).await?);
        *self.dicts.write().unwrap_or_else(|p| p.into_inner()) = Some(d.clone());
        Ok(d)
    }

    /// Forget the cached dictionaries (after one was stored).
    pub(crate) fn reload_dictionaries(&self) {
        *self.dicts.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Seal `value` as zstd-compressed JSON and store it under `dir/<id>`; return the id bytes.
    pub(crate) async fn save_json<T: Serialize>(
        &self,
        dir: &str,
        aad: &[u8],
        value: &T,
    ) -> Result<[u8; 32]> {
        let (id, sealed) = self.seal_json(dir, aad, value)?;
        self.put_sealed(dir, id, sealed).await?;
        Ok(id)
    }

    /// Seal `value` as zstd-compressed JSON: its id (the hash of the sealed bytes) and the bytes.
    /// The same bytes are valid at every location of the repository (format §9a).
    pub(crate) fn seal_json<T: Serialize>(
        &self,
        dir: &str,
        aad: &[u8],
        value: &T,
    ) -> Result<([u8; 32], Bytes)> {
        let json = serde_json::to_vec(value).expect("repository objects serialize");
        let compressed =
            zstd::bulk::compress(&json, 3).map_err(|e| Error::io("compress", dir, e))?;
        let sealed = self.keys.seal(aad, &compressed);
        Ok((*blake3::hash(&sealed).as_bytes(), Bytes::from(sealed)))
    }

    /// Store sealed bytes under `dir/<id>`, create-if-absent.
    pub(crate) async fn put_sealed(&self, dir: &str, id: [u8; 32], sealed: Bytes) -> Result<()> {
        let path = format!("{dir}/{}", hex::encode(id));
        match self.storage.put(&path, sealed, PutMode::CreateNew).await {
            // Same name means same bytes (the name is their hash).
            Ok(()) => Ok(()),
            Err(e) if e.kind == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Load and verify a sealed JSON object.
    pub(crate) async fn load_json<T: DeserializeOwned>(&self, path: &str, aad: &[u8]) -> Result<T> {
        let bytes = self.storage.get(path).await?;
        let name = path.rsplit('/').next().unwrap_or(path);
        if hex::encode(blake3::hash(&bytes).as_bytes()) != name {
            return Err(Error::corrupt(
                path,
                "content does not match its name (hash mismatch)",
            ));
        }
        let compressed = self
            .keys
            .open(aad, &bytes)
            .map_err(|AuthFailed| Error::corrupt(path, "authentication failed"))?;
        decode_json(&compressed, path)
    }
}

/// Decode the opened content of a sealed JSON object: zstd (at most `MAX_JSON` bytes out),
/// JSON, version 1.
///
/// # Errors
/// `Corrupt` naming `path`; `UnsupportedVersion`.
pub(crate) fn decode_json<T: DeserializeOwned>(compressed: &[u8], path: &str) -> Result<T> {
    {
        let mut json = Vec::new();
        zstd::stream::read::Decoder::new(compressed)
            .and_then(|d| d.take(MAX_JSON).read_to_end(&mut json))
            .map_err(|e| Error::corrupt(path, format!("zstd: {e}")))?;
        let value: serde_json::Value = serde_json::from_slice(&json)
            .map_err(|e| Error::corrupt(path, format!("JSON: {e}")))?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(1) as u32;
        if version != 1 {
            return Err(Error::UnsupportedVersion {
                object: path.to_owned(),
                version,
            });
        }
        serde_json::from_value(value).map_err(|e| Error::corrupt(path, format!("JSON: {e}")))
    }
}

impl Repository {
    /// The sealed tail of an object of `size` bytes that ends with it and its length (u32 LE),
    /// as packs and log segments do, with at least `before` bytes ahead of it: where it starts,
    /// and its bytes. Two ranged reads.
    ///
    /// # Errors
    /// Storage errors; `Corrupt` naming the object (`what`) when the length does not fit.
    pub(crate) async fn sealed_tail(
        &self,
        path: &str,
        size: u64,
        before: u64,
        what: &str,
    ) -> Result<(u64, Bytes)> {
        if size < 4 + before {
            return Err(Error::corrupt(path, format!("too short for a {what}")));
        }
        let trailer = self.storage.get_range(path, size - 4..size).await?;
        let len = u32::from_le_bytes(
            trailer
                .as_ref()
                .try_into()
                .map_err(|_| Error::corrupt(path, "the trailer was cut short"))?,
        ) as u64;
        if len + 4 + before > size {
            return Err(Error::corrupt(
                path,
                format!("the trailer's length is beyond the start of the {what}"),
            ));
        }
        let start = size - 4 - len;
        Ok((start, self.storage.get_range(path, start..size - 4).await?))
    }

    /// Objects under `dir/` whose names are ids.
    pub async fn list_objects(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        let mut v = self.storage.list(&format!("{dir}/")).await?;
        v.retain(|m| {
            m.path
                .rsplit('/')
                .next()
                .is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        Ok(v)
    }

    /// Load every index object and build the in-memory index, ignoring superseded objects.
    /// A damaged index object is left out with a warning (its packs' own headers still say
    /// what they hold: `load_index_for` reads them, `repair index` rebuilds from them).
    ///
    /// # Errors
    /// Storage errors and index objects of an unknown version.
    pub async fn load_index(&self) -> Result<MasterIndex> {
        let read = self.read_index_files_lenient().await?;
        for (id, e) in &read.damaged {
            tracing::warn!(index = %id, error = %e, "left out a damaged index object; run `tidemark repair index`");
        }
        Ok(index_of(read.files).1)
    }

    /// The index a restore of `chunks` needs: `load_index`, and where one of them is in no
    /// index, the headers of the packs no index lists (format §6.1: the headers are what an
    /// index is rebuilt from), so that a lost or damaged index object never blocks a restore
    /// whose packs are intact.
    ///
    /// # Errors
    /// As `load_index`, and listing the packs.
    pub async fn load_index_for<'a>(
        &self,
        chunks: impl IntoIterator<Item = &'a ChunkId>,
    ) -> Result<MasterIndex> {
        let mut index = self.load_index().await?;
        let missing = chunks
            .into_iter()
            .filter(|c| index.get(c).is_none())
            .count();
        if missing > 0 {
            let found = crate::ops::repair::unindexed_packs(self, &index).await?;
            tracing::warn!(
                chunks = missing,
                packs = found.packs.len(),
                "chunks of this snapshot are in no index; reading the headers of the packs no index lists (run `tidemark repair index`)"
            );
            for p in found.packs {
                index.add_pack(p);
            }
        }
        Ok(index)
    }

    /// Every index object with its listing metadata (prune needs the write times).
    ///
    /// # Errors
    /// Storage errors; `Corrupt` for a damaged index object, with the advice to repair it
    /// (whoever deletes by the index must not read past a damaged one).
    pub(crate) async fn read_index_files(&self) -> Result<Vec<(IndexId, ObjectMeta, IndexFile)>> {
        let read = self.read_index_files_lenient().await?;
        match read.damaged.into_iter().next() {
            None => Ok(read.files),
            Some((id, e)) => Err(Error::corrupt(
                format!("index/{id}"),
                format!("{e}; run `tidemark repair index`, which rebuilds the index from the packs' headers"),
            )),
        }
    }

    /// Every index object that reads whole, and the ids of those that are damaged.
    ///
    /// # Errors
    /// Storage errors other than damage, and unknown format versions.
    pub(crate) async fn read_index_files_lenient(&self) -> Result<IndexFiles> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let metas = self.list_objects("index").await?;
            let loaded: Result<Vec<(IndexId, ObjectMeta, Result<IndexFile>)>> =
                futures::stream::iter(metas)
                    .map(|m| async move {
                        let id: IndexId = m.path.trim_start_matches("index/").parse()?;
                        match self.load_json::<IndexFile>(&m.path, aad::INDEX).await {
                            Ok(f) => Ok((id, m, Ok(f))),
                            Err(e @ Error::Corrupt { .. }) => Ok((id, m, Err(e))),
                            Err(e) => Err(e),
                        }
                    })
                    .buffer_unordered(LOAD_CONCURRENCY)
                    .try_collect()
                    .await;
            match loaded {
                Ok(all) => {
                    let mut out = IndexFiles::default();
                    for (id, m, f) in all {
                        match f {
                            Ok(f) => out.files.push((id, m, f)),
                            Err(e) => out.damaged.push((id, e)),
                        }
                    }
                    return Ok(out);
                }
                // Prune replaced an index between our list and read (format §6.1): list again once.
                Err(Error::Storage(e)) if e.kind == ErrorKind::NotFound && attempt == 1 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Store an index object.
    pub(crate) async fn save_index(&self, f: &IndexFile) -> Result<IndexId> {
        Ok(IndexId(self.save_json("index", aad::INDEX, f).await?))
    }

    /// Seal a pack's header, store the pack (create-if-absent; an existing object of the same
    /// name has the same bytes) and return its index entry.
    pub(crate) async fn save_pack(&self, builder: PackBuilder) -> Result<IndexPack> {
        let keys = self.keys.clone();
        let (id, bytes, entries) = tokio::task::spawn_blocking(move || builder.finish(&keys))
            .await
            .map_err(|e| Error::Invalid(format!("pack task failed: {e}")))?;
        let size = bytes.len() as u64;
        match self
            .storage
            .put(&id.path(), bytes, PutMode::CreateNew)
            .await
        {
            Ok(())
            | Err(tidemark_storage::Error {
                kind: ErrorKind::AlreadyExists,
                ..
            }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(IndexPack::new(id, size, &entries))
    }

    /// Load one snapshot.
    pub async fn load_snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        self.load_json(&format!("snapshots/{id}"), aad::SNAPSHOT)
            .await
    }

    /// Every snapshot, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<(SnapshotId, Snapshot)>> {
        let metas = self.list_objects("snapshots").await?;
        let mut v: Vec<(SnapshotId, Snapshot)> = futures::stream::iter(metas)
            .map(|m| async move {
                let id: SnapshotId = m.path.trim_start_matches("snapshots/").parse()?;
                match self.load_snapshot(id).await {
                    Ok(s) => Ok(Some((id, s))),
                    // Forgotten between list and read.
                    Err(Error::Storage(e)) if e.kind == ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(LOAD_CONCURRENCY)
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
        v.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(v)
    }

    /// Find a snapshot by id prefix, or `latest`.
    ///
    /// # Errors
    /// `SnapshotNotFound`, `AmbiguousSnapshot`.
    pub async fn find_snapshot(&self, which: &str) -> Result<(SnapshotId, Snapshot)> {
        if which == "latest" {
            return self
                .snapshots()
                .await?
                .pop()
                .ok_or_else(|| Error::SnapshotNotFound(which.into()));
        }
        if which.is_empty() || !which.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::SnapshotNotFound(which.into()));
        }
        let metas = self.list_objects("snapshots").await?;
        let matches: Vec<_> = metas
            .iter()
            .filter(|m| m.path["snapshots/".len()..].starts_with(&which.to_ascii_lowercase()))
            .collect();
        match matches.as_slice() {
            [] => Err(Error::SnapshotNotFound(which.into())),
            [m] => {
                let id: SnapshotId = m.path["snapshots/".len()..].parse()?;
                Ok((id, self.load_snapshot(id).await?))
            }
            _ => Err(Error::AmbiguousSnapshot(which.into())),
        }
    }

    /// Add a key for `secret`.
    pub async fn add_key(&self, secret: &Secret, kdf: KdfParams) -> Result<KeyId> {
        write_key(&*self.storage, &self.master, secret, kdf).await
    }

    /// Every key: id and record.
    pub async fn keys_list(&self) -> Result<Vec<(KeyId, KeyFile)>> {
        let mut out = Vec::new();
        for m in self.storage.list("keys/").await? {
            let id: KeyId = m.path.trim_start_matches("keys/").parse()?;
            out.push((id, load_key(&*self.storage, &m.path).await?));
        }
        out.sort_by_key(|k| k.1.created);
        Ok(out)
    }

    /// Remove a key. Refuses the last key and the key in use.
    pub async fn remove_key(&self, id: KeyId) -> Result<()> {
        let keys = self.keys_list().await?;
        if !keys.iter().any(|(k, _)| *k == id) {
            return Err(Error::Invalid(format!("no key {id} in the repository")));
        }
        if id == self.key_id {
            return Err(Error::Invalid(
                "refusing to remove the key in use; open the repository with another key first"
                    .into(),
            ));
        }
        if keys.len() <= 1 {
            return Err(Error::Invalid("refusing to remove the last key".into()));
        }
        self.storage.delete(&format!("keys/{id}")).await?;
        Ok(())
    }
}

async fn write_key(
    storage: &dyn Storage,
    master: &MasterKey,
    secret: &Secret,
    kdf: KdfParams,
) -> Result<KeyId> {
    let secret = secret.clone();
    let master = master.clone();
    let kf = tokio::task::spawn_blocking(move || KeyFile::wrap(&master, &secret, kdf))
        .await
        .map_err(|e| Error::Invalid(format!("key derivation failed: {e}")))??;
    let bytes = serde_json::to_vec_pretty(&kf).expect("key file serializes");
    let id = KeyId::of_bytes(&bytes);
    storage
        .put(
            &format!("keys/{id}"),
            Bytes::from(bytes),
            PutMode::CreateNew,
        )
        .await?;
    Ok(id)
}

/// Copy one object between two locations of a repository, as stored (create-if-absent: the
/// objects a copy moves are named by their content, or are the repository's fixed identity).
/// Returns the bytes copied: 0 when the object was there already.
///
/// # Errors
/// Storage errors at either location.
pub(crate) async fn copy_object(from: &dyn Storage, to: &dyn Storage, path: &str) -> Result<u64> {
    let bytes = from.get(path).await?;
    // Objects named by the hash of their bytes are checked on the way (format §2).
    let name = path.rsplit('/').next().unwrap_or(path);
    if name.len() == 64
        && name.bytes().all(|b| b.is_ascii_hexdigit())
        && hex::encode(blake3::hash(&bytes).as_bytes()) != name
    {
        return Err(Error::corrupt(
            format!("{path} at {}", from.name()),
            "content does not match its name (hash mismatch); it was not copied",
        ));
    }
    let n = bytes.len() as u64;
    match to.put(path, bytes, PutMode::CreateNew).await {
        Ok(()) => Ok(n),
        Err(e) if e.kind == ErrorKind::AlreadyExists => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Authenticate and decode a `config` object with `keys`.
///
/// # Errors
/// `Corrupt` when it does not open with these keys or is not a config; `UnsupportedVersion`.
fn read_config(keys: &Keys, bytes: &[u8]) -> Result<RepoConfig> {
    let plain = keys.open(aad::CONFIG, bytes).map_err(|AuthFailed| {
        Error::corrupt(
            "config",
            "authentication failed (the config object was modified or replaced)",
        )
    })?;
    decode_config(&plain)
}

/// Decode an opened `config` object.
///
/// # Errors
/// `Corrupt`; `UnsupportedVersion`.
pub(crate) fn decode_config(plain: &[u8]) -> Result<RepoConfig> {
    let value: serde_json::Value = serde_json::from_slice(plain)
        .map_err(|e| Error::corrupt("config", format!("not valid JSON: {e}")))?;
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if version != 1 {
        return Err(Error::UnsupportedVersion {
            object: "config".into(),
            version,
        });
    }
    serde_json::from_value(value).map_err(|e| Error::corrupt("config", e.to_string()))
}

async fn load_key(storage: &dyn Storage, path: &str) -> Result<KeyFile> {
    let bytes = storage.get(path).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::corrupt(path, format!("not a key object: {e}")))
}
