//! Key objects: the master key wrapped by a passphrase (Argon2id) or a raw secret (format §3.3).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{aad, open_with, seal_with, MasterKey};
use crate::error::{Error, Result};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};

/// What opens a repository. Never printed.
#[derive(Clone)]
pub enum Secret {
    /// A passphrase, stretched with Argon2id.
    Password(Zeroizing<String>),
    /// A raw secret of at least 32 bytes (from a file or the environment).
    Raw(Zeroizing<Vec<u8>>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Password(_) => f.write_str("Secret::Password(..)"),
            Secret::Raw(_) => f.write_str("Secret::Raw(..)"),
        }
    }
}

impl Secret {
    /// Read a secret from a key file (raw bytes, or hex of at least 32 bytes) or else a
    /// password file (its first line). `None` when neither file is given.
    ///
    /// # Errors
    /// A message naming the file (never quoting it) when it cannot be read or is empty.
    pub fn from_files(
        key_file: Option<&std::path::Path>,
        password_file: Option<&std::path::Path>,
    ) -> std::result::Result<Option<Secret>, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map(Zeroizing::new)
                .map_err(|e| format!("failed to read secret file {}: {e}", p.display()))
        };
        if let Some(p) = key_file {
            let raw = read(p)?;
            let raw = match hex::decode(String::from_utf8_lossy(&raw).trim()) {
                Ok(decoded) if decoded.len() >= 32 => Zeroizing::new(decoded),
                _ => raw,
            };
            return Ok(Some(Secret::Raw(raw)));
        }
        if let Some(p) = password_file {
            let raw = read(p)?;
            let text = Zeroizing::new(String::from_utf8_lossy(&raw).into_owned());
            let line = text.lines().next().unwrap_or("");
            if line.is_empty() {
                return Err(format!(
                    "password file {} is empty; write the password on its first line",
                    p.display()
                ));
            }
            return Ok(Some(Secret::password(line)));
        }
        Ok(None)
    }

    /// A passphrase secret.
    pub fn password(p: impl Into<String>) -> Self {
        Secret::Password(Zeroizing::new(p.into()))
    }
}

/// Argon2id cost parameters for new passphrase keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB (default 65536 = 64 MiB).
    pub m_cost_kib: u32,
    /// Passes (default 3).
    pub t_cost: u32,
    /// Lanes, computed in parallel (default 4, as RFC 9106 recommends with 64 MiB and 3 passes).
    pub p_cost: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 65536,
            t_cost: 3,
            p_cost: 4,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests only; never for real repositories.
    pub fn insecure_for_tests() -> Self {
        KdfParams {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "lowercase")]
enum Kdf {
    Argon2id {
        m_cost_kib: u32,
        t_cost: u32,
        p_cost: u32,
        salt: String,
    },
    None,
}

/// A key object as stored under `keys/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    version: u32,
    /// When the key was added.
    pub created: DateTime<Utc>,
    /// The host that added it.
    pub hostname: String,
    /// The user that added it.
    pub username: String,
    kdf: Kdf,
    wrapped: String,
}

/// The host name, for key, lock and snapshot records.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// The user name, for key and snapshot records.
pub fn username() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default()
}

/// The largest Argon2id parameters a reader will try (format §3.3).
const MAX_M_COST_KIB: u32 = 4 * 1024 * 1024;
const MAX_T_COST: u32 = 64;
const MAX_P_COST: u32 = 64;

fn kek(secret: &Secret, kdf: &Kdf) -> Result<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    match (secret, kdf) {
        (
            Secret::Password(p),
            Kdf::Argon2id {
                m_cost_kib,
                t_cost,
                p_cost,
                salt,
            },
        ) => {
            let salt = hex::decode(salt).map_err(|_| Error::corrupt("key", "salt is not hex"))?;
            // Format §3.3: a replaced key object must not make the reader allocate without bound.
            if *m_cost_kib > MAX_M_COST_KIB || *t_cost > MAX_T_COST || *p_cost > MAX_P_COST {
                return Err(Error::corrupt(
                    "key",
                    format!(
                        "Argon2id parameters out of range (memory {m_cost_kib} KiB, {t_cost} passes, \
                         {p_cost} lanes; at most {MAX_M_COST_KIB} KiB, {MAX_T_COST} passes, \
                         {MAX_P_COST} lanes)"
                    ),
                ));
            }
            let params = argon2::Params::new(*m_cost_kib, *t_cost, *p_cost, Some(32))
                .map_err(|e| Error::corrupt("key", format!("bad Argon2id parameters: {e}")))?;
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(p.as_bytes(), &salt, &mut *out)
                .map_err(|e| Error::corrupt("key", format!("Argon2id failed: {e}")))?;
        }
        (Secret::Raw(r), Kdf::None) => {
            *out = blake3::derive_key("tidemark 2026-11 raw key v1", r);
        }
        // A passphrase cannot open a raw key and vice versa; this is "wrong secret".
        _ => {
            return Err(Error::WrongPassword {
                location: String::new(),
            })
        }
    }
    Ok(out)
}

impl KeyFile {
    /// Wrap `master` with `secret`.
    ///
    /// # Errors
    /// `Invalid` for a raw secret shorter than 32 bytes or an empty password.
    pub fn wrap(master: &MasterKey, secret: &Secret, params: KdfParams) -> Result<KeyFile> {
        let kdf = match secret {
            Secret::Password(p) => {
                if p.is_empty() {
                    return Err(Error::Invalid("the password is empty".into()));
                }
                let salt: [u8; 32] = rand::random();
                Kdf::Argon2id {
                    m_cost_kib: params.m_cost_kib,
                    t_cost: params.t_cost,
                    p_cost: params.p_cost,
                    salt: hex::encode(salt),
                }
            }
            Secret::Raw(r) => {
                if r.len() < 32 {
                    return Err(Error::Invalid(format!(
                        "a raw key must have at least 32 bytes; this one has {}",
                        r.len()
                    )));
                }
                Kdf::None
            }
        };
        let k = kek(secret, &kdf)?;
        let cipher = XChaCha20Poly1305::new((&*k).into());
        let wrapped = hex::encode(seal_with(&cipher, aad::KEY, &master.0));
        Ok(KeyFile {
            version: 1,
            created: Utc::now(),
            hostname: hostname(),
            username: username(),
            kdf,
            wrapped,
        })
    }

    /// Unwrap the master key. `Ok(None)` means the secret does not fit this key.
    ///
    /// # Errors
    /// `Corrupt` when the key object is malformed, `UnsupportedVersion` for a newer format.
    pub fn unwrap_master(&self, secret: &Secret, object: &str) -> Result<Option<MasterKey>> {
        if self.version != 1 {
            return Err(Error::UnsupportedVersion {
                object: object.to_owned(),
                version: self.version,
            });
        }
        let k = match kek(secret, &self.kdf) {
            Ok(k) => k,
            Err(Error::WrongPassword { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let cipher = XChaCha20Poly1305::new((&*k).into());
        let wrapped = hex::decode(&self.wrapped)
            .map_err(|_| Error::corrupt(object, "wrapped key is not hex"))?;
        match open_with(&cipher, aad::KEY, &wrapped) {
            Ok(plain) => {
                let plain = Zeroizing::new(plain);
                let bytes: [u8; 32] = plain[..]
                    .try_into()
                    .map_err(|_| Error::corrupt(object, "wrapped key has the wrong length"))?;
                Ok(Some(MasterKey(bytes)))
            }
            Err(_) => Ok(None),
        }
    }

    /// `argon2id` or `raw`.
    pub fn kind(&self) -> &'static str {
        match self.kdf {
            Kdf::Argon2id { .. } => "password",
            Kdf::None => "raw",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_key_opens_only_with_its_password() {
        let m = MasterKey::generate();
        let kf = KeyFile::wrap(
            &m,
            &Secret::password("right"),
            KdfParams::insecure_for_tests(),
        )
        .unwrap();
        assert_eq!(
            kf.unwrap_master(&Secret::password("right"), "k")
                .unwrap()
                .unwrap()
                .0,
            m.0
        );
        assert!(kf
            .unwrap_master(&Secret::password("wrong"), "k")
            .unwrap()
            .is_none());
        assert!(kf
            .unwrap_master(&Secret::Raw(Zeroizing::new(vec![1; 32])), "k")
            .unwrap()
            .is_none());
    }

    #[test]
    fn parallel_lanes_open_and_absurd_parameters_are_refused_before_allocating() {
        let m = MasterKey::generate();
        let lanes = KdfParams {
            m_cost_kib: 256,
            t_cost: 1,
            p_cost: 4,
        };
        let kf = KeyFile::wrap(&m, &Secret::password("pw"), lanes).unwrap();
        let opened = kf.unwrap_master(&Secret::password("pw"), "k").unwrap();
        assert_eq!(opened.unwrap().0, m.0);

        let mut forged = kf.clone();
        if let Kdf::Argon2id { m_cost_kib, .. } = &mut forged.kdf {
            *m_cost_kib = u32::MAX;
        }
        let err = forged
            .unwrap_master(&Secret::password("pw"), "keys/x")
            .unwrap_err();
        assert!(
            err.to_string().contains("out of range"),
            "unexpected error: {err}"
        );
    }

    #[test]
    fn a_raw_key_must_be_long_enough() {
        let m = MasterKey::generate();
        assert!(KeyFile::wrap(
            &m,
            &Secret::Raw(Zeroizing::new(vec![1; 8])),
            KdfParams::default()
        )
        .is_err());
        let kf = KeyFile::wrap(
            &m,
            &Secret::Raw(Zeroizing::new(vec![1; 32])),
            KdfParams::default(),
        )
        .unwrap();
        assert!(kf
            .unwrap_master(&Secret::Raw(Zeroizing::new(vec![1; 32])), "k")
            .unwrap()
            .is_some());
    }

    #[test]
    fn key_files_do_not_contain_the_master_key() {
        let m = MasterKey::generate();
        let kf =
            KeyFile::wrap(&m, &Secret::password("p"), KdfParams::insecure_for_tests()).unwrap();
        let json = serde_json::to_string(&kf).unwrap();
        assert!(!json.contains(&hex::encode(m.0)));
    }
}
