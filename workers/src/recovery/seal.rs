//! Seals a one-time code for its trip from the recovery worker to the SMS
//! worker: the SMS request passes through the outbox table and the broker's
//! queues, and neither may hold the code in clear. XChaCha20-Poly1305 under a
//! key derived from the code secret, with a random nonce per code.

use anyhow::{Context, anyhow, bail};
use chacha20poly1305::{XChaCha20Poly1305, XNonce, aead::Aead};
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

use crate::settings::Secret;

const NONCE_LEN: usize = 24;

/// Opens and seals codes; both ends derive it from `TC_CODE_SECRET`.
pub struct CodeSeal(XChaCha20Poly1305);

impl CodeSeal {
    pub fn new(secret: &Secret) -> anyhow::Result<Self> {
        // A key of its own, so the sealing key is never the HMAC key.
        let mut derive =
            <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(secret.expose().as_bytes())
                .context("the code secret cannot key an HMAC")?;
        derive.update(b"trusted-contact: sealing one-time codes for the SMS worker");
        let key = derive.finalize().into_bytes();
        let cipher = <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new_from_slice(&key)
            .map_err(|_| anyhow!("cannot key the code seal"))?;
        Ok(CodeSeal(cipher))
    }

    /// The code as it may travel: hex of nonce and ciphertext.
    pub fn seal(&self, code: &str) -> anyhow::Result<String> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .0
            .encrypt(&XNonce::from(nonce), code.as_bytes())
            .map_err(|_| anyhow!("cannot seal a code"))?;
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Ok(hex::encode(out))
    }

    pub fn open(&self, sealed: &str) -> anyhow::Result<String> {
        let bytes = hex::decode(sealed).context("a sealed code is not hex")?;
        if bytes.len() <= NONCE_LEN {
            bail!("a sealed code is too short");
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().context("nonce length")?;
        let plain = self
            .0
            .decrypt(&XNonce::from(nonce), ciphertext)
            .map_err(|_| anyhow!("a sealed code does not open with this secret"))?;
        String::from_utf8(plain).context("a sealed code is not text")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_code_opens_only_with_its_secret_and_does_not_show_the_code() {
        let seal = CodeSeal::new(&Secret::new("a secret long enough to key the seal")).unwrap();
        let sealed = seal.seal("042917").unwrap();
        assert!(!sealed.contains("042917"));
        assert_ne!(sealed, seal.seal("042917").unwrap(), "a fresh nonce per code");
        assert_eq!(seal.open(&sealed).unwrap(), "042917");
        let other = CodeSeal::new(&Secret::new("another secret, just as long")).unwrap();
        assert!(other.open(&sealed).is_err());
    }
}
