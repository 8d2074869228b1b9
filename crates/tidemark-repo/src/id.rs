//! Typed 32-byte ids, one type per object kind, so a pack id can never be used as a snapshot id.

use std::fmt;
use std::str::FromStr;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The id as 64 lowercase hex digits.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// The first 8 hex digits, for people.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
            /// The id of stored bytes: their unkeyed BLAKE3 hash (format section 2).
            pub fn of_bytes(data: &[u8]) -> Self {
                $name(*blake3::hash(data).as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out)
                    .map_err(|_| crate::Error::InvalidId { kind: stringify!($name), text: s.to_owned() })?;
                Ok($name(out))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A chunk: keyed BLAKE3 of its plaintext.
    ChunkId
);
id_type!(
    /// A pack: BLAKE3 of its stored bytes.
    PackId
);
id_type!(
    /// An index object.
    IndexId
);
id_type!(
    /// A snapshot.
    SnapshotId
);
id_type!(
    /// A key object.
    KeyId
);
id_type!(
    /// A lock object.
    LockId
);

impl PackId {
    /// The pack's path in the repository: `data/<2 hex>/<id>`.
    pub fn path(&self) -> String {
        let h = self.to_hex();
        format!("data/{}/{}", &h[..2], h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex_and_json() {
        let id = SnapshotId::of_bytes(b"hello");
        let parsed: SnapshotId = id.to_hex().parse().unwrap();
        assert_eq!(id, parsed);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SnapshotId>(&json).unwrap(), id);
        assert_eq!(id.short().len(), 8);
    }

    #[test]
    fn bad_hex_is_an_error_that_names_the_kind() {
        let e = "xyz".parse::<PackId>().unwrap_err();
        assert!(e.to_string().contains("PackId"), "{e}");
    }

    #[test]
    fn pack_paths_are_sharded_by_the_first_byte() {
        let id = PackId([0xab; 32]);
        assert!(id.path().starts_with("data/ab/abab"));
    }
}
