//! Keys derived from the master key, the encrypted envelope, and keyed chunk ids (format §3, §4).

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::Zeroize;

use crate::id::ChunkId;

/// Bytes of nonce before and tag after every envelope's ciphertext.
pub const NONCE_LEN: usize = 24;
/// Authentication tag length.
pub const TAG_LEN: usize = 16;
/// Envelope overhead.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Associated data for each kind of envelope (format §3.2).
pub mod aad {
    /// Pack headers.
    pub const PACK_HEADER: &[u8] = b"tidemark/pack-header/v1";
    /// The config object.
    pub const CONFIG: &[u8] = b"tidemark/config/v1";
    /// Index objects.
    pub const INDEX: &[u8] = b"tidemark/index/v1";
    /// Snapshots.
    pub const SNAPSHOT: &[u8] = b"tidemark/snapshot/v1";
    /// Locks.
    pub const LOCK: &[u8] = b"tidemark/lock/v1";
    /// Wrapped master keys.
    pub const KEY: &[u8] = b"tidemark/key/v1";
    /// zstd dictionaries.
    pub const DICT: &[u8] = b"tidemark/dict/v1";
}

/// The 32-byte master key. Zeroed on drop; never printed.
#[derive(Clone)]
pub struct MasterKey(pub(crate) [u8; 32]);

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A fresh random master key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        MasterKey(k)
    }
}

/// An envelope failed authentication: wrong key, or the bytes were changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailed;

/// Seal `plaintext` with `key` and `aad` into nonce || ciphertext || tag.
pub fn seal_with(cipher: &XChaCha20Poly1305, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    // One buffer, encrypted in place: nonce, ciphertext, tag.
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.resize(NONCE_LEN, 0);
    // Random 192-bit nonces from the thread's CSPRNG (ChaCha, seeded and reseeded from the
    // operating system): no system call per blob.
    rand::thread_rng().fill_bytes(&mut out[..NONCE_LEN]);
    out.extend_from_slice(plaintext);
    let (nonce, body) = out.split_at_mut(NONCE_LEN);
    let tag = cipher
        .encrypt_in_place_detached(XNonce::from_slice(nonce), aad, body)
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    out.extend_from_slice(&tag);
    out
}

/// Open an envelope; fails if it is too short or its tag does not verify.
pub fn open_with(
    cipher: &XChaCha20Poly1305,
    aad: &[u8],
    envelope: &[u8],
) -> Result<Vec<u8>, AuthFailed> {
    if envelope.len() < OVERHEAD {
        return Err(AuthFailed);
    }
    let (nonce, ct) = envelope.split_at(NONCE_LEN);
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| AuthFailed)
}

/// The subkeys every repository operation uses (format §3.1).
#[derive(Clone)]
pub struct Keys {
    cipher: XChaCha20Poly1305,
    id_key: [u8; 32],
    gear_seed: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.id_key.zeroize();
        self.gear_seed.zeroize();
    }
}

impl Keys {
    /// Derive the subkeys from the master key.
    pub fn derive(master: &MasterKey) -> Self {
        let mut enc = blake3::derive_key("tidemark 2026-11 encryption key v1", &master.0);
        let id_key = blake3::derive_key("tidemark 2026-11 chunk id key v1", &master.0);
        let gear = blake3::derive_key("tidemark 2026-11 chunker gear seed v1", &master.0);
        let gear_seed = u64::from_le_bytes(gear[..8].try_into().expect("8 bytes"));
        let cipher = XChaCha20Poly1305::new((&enc).into());
        enc.zeroize();
        Keys {
            cipher,
            id_key,
            gear_seed,
        }
    }

    /// Seal `plaintext` with associated data `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        seal_with(&self.cipher, aad, plaintext)
    }

    /// Open an envelope sealed with `aad`.
    ///
    /// # Errors
    /// `AuthFailed` if the envelope was modified or sealed with another key or AAD.
    pub fn open(&self, aad: &[u8], envelope: &[u8]) -> Result<Vec<u8>, AuthFailed> {
        open_with(&self.cipher, aad, envelope)
    }

    /// Open an envelope into `out` (cleared first), reusing its allocation.
    ///
    /// # Errors
    /// `AuthFailed` as for `open`; `out` is then left empty.
    pub fn open_into(
        &self,
        aad: &[u8],
        envelope: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AuthFailed> {
        out.clear();
        if envelope.len() < OVERHEAD {
            return Err(AuthFailed);
        }
        let (nonce, ct) = envelope.split_at(NONCE_LEN);
        out.extend_from_slice(ct);
        self.cipher
            .decrypt_in_place(XNonce::from_slice(nonce), aad, out)
            .map_err(|_| {
                out.clear();
                AuthFailed
            })
    }

    /// The keyed BLAKE3 id of a chunk's plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    /// The chunker's gear seed.
    pub fn gear_seed(&self) -> u64 {
        self.gear_seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_opens_only_with_its_key_and_aad() {
        let k = Keys::derive(&MasterKey::generate());
        let other = Keys::derive(&MasterKey::generate());
        let env = k.seal(b"a", b"secret data");
        assert_eq!(k.open(b"a", &env).unwrap(), b"secret data");
        assert_eq!(k.open(b"b", &env), Err(AuthFailed));
        assert_eq!(other.open(b"a", &env), Err(AuthFailed));
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let k = Keys::derive(&MasterKey::generate());
        let env = k.seal(b"a", &[7u8; 100]);
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x01;
            assert_eq!(k.open(b"a", &bad), Err(AuthFailed), "flip at byte {i}");
        }
    }

    #[test]
    fn chunk_ids_are_keyed() {
        let a = Keys::derive(&MasterKey::generate());
        let b = Keys::derive(&MasterKey::generate());
        assert_eq!(a.chunk_id(b"x"), a.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
    }

    #[test]
    fn nonces_are_fresh_for_every_envelope() {
        let k = Keys::derive(&MasterKey::generate());
        assert_ne!(
            k.seal(b"a", b"same")[..NONCE_LEN],
            k.seal(b"a", b"same")[..NONCE_LEN]
        );
    }
}
