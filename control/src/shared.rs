//! What console replicas share through etcd besides the store: the CA (its key included)
//! and the first admin token, sealed with AES-256-GCM under a key-encryption key that
//! each replica reads from a file (etcd and its backups never hold them in the clear).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::store::{EtcdStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("key-encryption key {path}: {why}")]
    Kek { path: String, why: String },
    #[error(
        "{0} in etcd cannot be opened with this key-encryption key (another key, or the data was altered)"
    )]
    Unsealed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Identity(#[from] segmesh_identity::IdentityError),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Other(String),
}

/// The key-encryption key: 32 bytes, in a file as 64 hexadecimal digits (e.g. `openssl
/// rand -hex 32 > kek`) or as the raw bytes.
pub struct Kek(LessSafeKey);

impl Kek {
    pub fn load(path: &std::path::Path) -> Result<Kek, SharedError> {
        let bad = |why: String| SharedError::Kek {
            path: path.display().to_string(),
            why,
        };
        let raw = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let text = String::from_utf8_lossy(&raw);
        let hex = text.trim();
        let bytes: Vec<u8> = if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digits"))
                .collect()
        } else if raw.len() == 32 {
            raw
        } else {
            return Err(bad(format!(
                "expected 32 bytes or 64 hexadecimal digits, found {} bytes",
                raw.len()
            )));
        };
        Kek::from_bytes(&bytes).map_err(bad)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Kek, String> {
        let k =
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| "not an AES-256 key".to_owned())?;
        Ok(Kek(LessSafeKey::new(k)))
    }

    /// A random nonce, then the ciphertext and its tag; `name` is bound as associated
    /// data (a sealed CA cannot be passed off as another value).
    pub fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's random source");
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .expect("AES-GCM seals any length we store");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, SharedError> {
        if sealed.len() < NONCE_LEN {
            return Err(SharedError::Unsealed(name.into()));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| SharedError::Unsealed(name.into()))?;
        let mut buf = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| SharedError::Unsealed(name.into()))?;
        Ok(plain.to_vec())
    }
}

#[derive(Serialize, Deserialize)]
struct SealedCa {
    trust_domain: String,
    chain_pem: String,
    key_pem: String,
    bundle_pem: String,
}

/// The replicas' CA: the one in etcd, or `make()`'s if there is none yet (of replicas
/// starting together exactly one writes it; the others read it). True when this call
/// created it.
pub fn shared_ca(
    store: &EtcdStore,
    kek: &Kek,
    make: impl FnOnce() -> Result<segmesh_identity::Ca, SharedError>,
) -> Result<(segmesh_identity::Ca, bool), SharedError> {
    const NAME: &str = "ca";
    let open = |sealed: Vec<u8>| -> Result<segmesh_identity::Ca, SharedError> {
        let c: SealedCa = serde_json::from_slice(&kek.open(NAME, &sealed)?)?;
        Ok(segmesh_identity::Ca::from_pem(
            &c.trust_domain,
            &c.chain_pem,
            &c.key_pem,
            &c.bundle_pem,
        )?)
    };
    if let Some(sealed) = store.blob(NAME)? {
        return Ok((open(sealed)?, false));
    }
    let ca = make()?;
    let plain = serde_json::to_vec(&SealedCa {
        trust_domain: ca.trust_domain().to_owned(),
        chain_pem: ca.chain_pem(),
        key_pem: ca.key_pem().to_owned(),
        bundle_pem: ca.bundle_pem(),
    })?;
    if store.create_blob(NAME, &kek.seal(NAME, &plain))? {
        return Ok((ca, true));
    }
    // Another replica got there first: use its CA.
    let sealed = store
        .blob(NAME)?
        .ok_or_else(|| SharedError::Other("the CA vanished from etcd".into()))?;
    Ok((open(sealed)?, false))
}

/// Shares the first admin token (sealed) so that every replica can write it to its
/// own data directory.
pub fn publish_admin_token(store: &EtcdStore, kek: &Kek, token: &str) -> Result<(), SharedError> {
    store.create_blob("admin-token", &kek.seal("admin-token", token.as_bytes()))?;
    Ok(())
}

/// The first admin token, once the replica that created the CA published it.
pub fn admin_token(store: &EtcdStore, kek: &Kek) -> Result<Option<String>, SharedError> {
    match store.blob("admin-token")? {
        Some(sealed) => Ok(Some(
            String::from_utf8(kek.open("admin-token", &sealed)?)
                .map_err(|_| SharedError::Unsealed("admin-token".into()))?,
        )),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_name() {
        let k = Kek::from_bytes(&[7u8; 32]).unwrap();
        let other = Kek::from_bytes(&[8u8; 32]).unwrap();
        let s = k.seal("ca", b"secret");
        assert_ne!(&s[NONCE_LEN..NONCE_LEN + 6], b"secret", "not in the clear");
        assert_eq!(k.open("ca", &s).unwrap(), b"secret");
        assert!(other.open("ca", &s).is_err(), "another key");
        assert!(k.open("admin-token", &s).is_err(), "another name");
        let mut flipped = s.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(k.open("ca", &flipped).is_err(), "altered");
        assert!(k.open("ca", &s[..5]).is_err(), "truncated");
        assert_ne!(k.seal("ca", b"secret"), s, "a fresh nonce each time");
    }

    #[test]
    fn a_kek_file_is_hex_or_raw_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("segmesh-kek-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("kek");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        let hex = Kek::load(&p).unwrap();
        std::fs::write(&p, [0xabu8; 32]).unwrap();
        let raw = Kek::load(&p).unwrap();
        assert_eq!(
            raw.open("x", &hex.seal("x", b"same key")).unwrap(),
            b"same key"
        );
        std::fs::write(&p, "too short").unwrap();
        let e = Kek::load(&p).err().unwrap().to_string();
        assert!(e.contains("expected 32 bytes"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
