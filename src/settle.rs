//! Files the service re-reads (API keys, meters) are applied only once two reads in a row agree
//! on their content, so that a file being rewritten in place (truncated, then written) is never
//! applied empty or half-written.

use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The content a poll saw changed and not yet applied.
#[derive(Default)]
pub struct Settle(Mutex<Option<[u8; 32]>>);

impl Settle {
    /// The SHA-256 of a file's text, as compared between reads.
    pub fn digest(text: &str) -> [u8; 32] {
        Sha256::digest(text.as_bytes()).into()
    }

    /// Whether a changed content (`digest`) was already seen by the previous read: then it is
    /// settled and may be applied; otherwise it is remembered for the next read to confirm.
    pub fn agreed(&self, digest: [u8; 32]) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == Some(digest) {
            true
        } else {
            *seen = Some(digest);
            false
        }
    }
}
