//! age encryption with zeroizing plaintext buffers.

use std::io::{Read, Write};

use zeroize::Zeroizing;

use crate::{Error, Result};

/// Encrypts `plaintext` to one recipient. The ciphertext is not secret.
pub(crate) fn encrypt(recipient: &dyn age::Recipient, plaintext: &[u8]) -> Result<Vec<u8>> {
    let crypto = |e: &dyn std::fmt::Display| Error::Crypto(format!("encrypting: {e}"));
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(recipient)).map_err(|e| crypto(&e))?;
    // age output is plaintext + header + 16 bytes per 64 KiB chunk.
    let mut out = Vec::with_capacity(plaintext.len() + 512);
    let mut writer = encryptor.wrap_output(&mut out).map_err(|e| crypto(&e))?;
    writer.write_all(plaintext).map_err(|e| crypto(&e))?;
    writer.finish().map_err(|e| crypto(&e))?;
    Ok(out)
}

/// Decrypts into a zeroizing buffer. The ciphertext is always larger than the
/// plaintext, so the buffer is allocated once and never reallocated (which
/// would leave an unzeroed copy in freed memory).
pub(crate) fn decrypt(
    identity: &dyn age::Identity,
    ciphertext: &[u8],
) -> std::result::Result<Zeroizing<Vec<u8>>, age::DecryptError> {
    let decryptor = age::Decryptor::new_buffered(ciphertext)?;
    let mut reader = decryptor.decrypt(std::iter::once(identity))?;
    let mut out = Zeroizing::new(Vec::with_capacity(ciphertext.len() + 1));
    reader.read_to_end(&mut out)?;
    Ok(out)
}

/// Serializes `value` as JSON into a zeroizing buffer of exactly the right
/// capacity: a first pass only counts bytes, so no reallocation copies secrets.
pub(crate) fn to_json_zeroizing<T: serde::Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>> {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let json = |e: serde_json::Error| Error::Crypto(format!("serializing a profile: {e}"));
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_err(json)?;
    let mut buf = Zeroizing::new(Vec::with_capacity(count.0));
    serde_json::to_writer(&mut *buf, value).map_err(json)?;
    Ok(buf)
}
