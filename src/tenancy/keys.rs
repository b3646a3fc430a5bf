//! API keys bound to tenants: the keys file, constant-time lookup, and reload on change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What a key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Send pulses for this tenant only.
    Tenant(String),
    /// A trusted service: any tenant.
    Trusted,
}

#[derive(Debug, Clone)]
struct Entry {
    hash: [u8; 32],
    grant: Grant,
    label: String,
}

/// Whether a secret is a shipped placeholder (`change-me…`, `REPLACE-ME…`, `<…>`), which must
/// never work as a credential: the manifests ship such values, and a deployment that forgot
/// to replace them is refused at start rather than opened to anyone who read them.
pub fn is_placeholder(secret: &str) -> bool {
    let s = secret.to_ascii_lowercase().replace('_', "-");
    s.contains("change-me")
        || s.contains("changeme")
        || s.contains("replace-me")
        || s.starts_with('<')
}

/// The word whose SHA-256 `hash` is, if it is one anyone would try (the examples' `test`).
fn well_known_key(hash: &[u8; 32]) -> Option<&'static str> {
    ["test", "", "password", "secret", "changeme", "change-me"]
        .into_iter()
        .find(|w| Sha256::digest(w.as_bytes()).as_slice() == hash)
}

/// The loaded key set.
#[derive(Debug, Default)]
pub struct KeySet {
    entries: Vec<Entry>,
}

impl KeySet {
    /// Parses a keys file; every bad line is reported.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(h), Some(who)) = (parts.next(), parts.next()) else {
                errors.push(format!(
                    "line {}: expected `<sha256 hex> <tenant|*> [label]`",
                    n + 1
                ));
                continue;
            };
            let mut hash = [0u8; 32];
            if is_placeholder(h) {
                errors.push(format!(
                    "line {}: a placeholder, not a key's hash: put the SHA-256 of a random key there (printf %s \"$KEY\" | sha256sum)",
                    n + 1
                ));
                continue;
            }
            if hex::decode_to_slice(h, &mut hash).is_err() {
                errors.push(format!("line {}: not a 64-hex-digit SHA-256", n + 1));
                continue;
            }
            if let Some(word) = well_known_key(&hash) {
                errors.push(format!(
                    "line {}: the SHA-256 of {word:?}, a key anyone would guess: use a random key",
                    n + 1
                ));
                continue;
            }
            let grant = if who == "*" {
                Grant::Trusted
            } else {
                Grant::Tenant(who.to_string())
            };
            let label = parts.next().unwrap_or(who).to_string();
            entries.push(Entry { hash, grant, label });
        }
        if errors.is_empty() {
            Ok(KeySet { entries })
        } else {
            Err(errors.join("; "))
        }
    }

    /// The grant of a presented key, and its label, if the key is known.
    pub fn lookup(&self, key: &str) -> Option<(&Grant, &str)> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        // Compare with every entry, always: the time taken does not depend on which one matches.
        for e in &self.entries {
            if bool::from(e.hash.ct_eq(&digest)) {
                found = Some((&e.grant, e.label.as_str()));
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A key set and the digest of the file text it came from.
struct Loaded {
    set: Arc<KeySet>,
    digest: [u8; 32],
}

/// The key set of a running service, reloadable.
pub struct ApiKeys {
    path: PathBuf,
    /// The keys and the SHA-256 of the file text they came from, swapped whole on reload so
    /// a request never waits for one.
    current: ArcSwap<Loaded>,
    /// The digest of a changed file seen by the last poll and not yet applied: a poll applies a
    /// change only once it reads the same content twice in a row, so a file being rewritten in
    /// place (truncated, then written) is never applied half-written or empty.
    seen: crate::settle::Settle,
}

impl ApiKeys {
    /// Loads the file; an unreadable or invalid file at start-up is an error.
    pub fn load(path: &Path) -> Result<Arc<Self>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let set = KeySet::parse(&text)?;
        info!(keys = set.len(), path = %path.display(), "API keys loaded");
        Ok(Arc::new(ApiKeys {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(Loaded {
                set: Arc::new(set),
                digest: Sha256::digest(&text).into(),
            }),
            seen: Default::default(),
        }))
    }

    pub fn get(&self) -> Arc<KeySet> {
        self.current.load().set.clone()
    }

    /// Re-reads the file and applies it if its content changed (or always, when `force`).
    /// Content, not modification time, decides: a rewrite within the clock's granularity, or
    /// between reading a file and reading its mtime, is never missed. Without `force` (the
    /// poll), a change is applied when two reads in a row agree on it.
    pub fn reload(&self, force: bool) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "API keys file not readable; keeping the previous keys");
                return;
            }
        };
        let digest = crate::settle::Settle::digest(&text);
        if !force && digest == self.current.load().digest {
            return;
        }
        // Changed since the last poll: maybe still being written. Next poll decides.
        if !force && !self.seen.agreed(digest) {
            return;
        }
        match KeySet::parse(&text) {
            Ok(set) => {
                info!(keys = set.len(), "API keys reloaded");
                self.current.store(Arc::new(Loaded {
                    set: Arc::new(set),
                    digest,
                }));
            }
            Err(e) => warn!(error = %e, "API keys file not reloaded; keeping the previous keys"),
        }
    }

    /// Reloads on change (polled every 2 s) and on SIGHUP, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<()>();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => self.reload(false),
                _ = sighup => self.reload(true),
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(k: &str) -> String {
        hex::encode(Sha256::digest(k.as_bytes()))
    }

    #[test]
    fn keys_map_to_tenants_or_trust() {
        let text = format!(
            "# comment\n{} t-1 team-a\n{} *\n",
            hash("secret-a"),
            hash("secret-svc")
        );
        let set = KeySet::parse(&text).unwrap();
        assert_eq!(
            set.lookup("secret-a"),
            Some((&Grant::Tenant("t-1".into()), "team-a"))
        );
        assert_eq!(set.lookup("secret-svc").map(|g| g.0), Some(&Grant::Trusted));
        assert_eq!(set.lookup("nope"), None);
        assert!(KeySet::parse("zz t-1\n").unwrap_err().contains("line 1"));
    }

    /// The manifests' placeholder line, and the hash of a word anyone would try (the old
    /// manifest shipped SHA-256 of `test` as a trusted key), are refused with what to do.
    #[test]
    fn a_placeholder_or_a_guessable_key_is_refused() {
        let err = KeySet::parse("REPLACE-ME-with-the-sha256-of-a-random-key * svc\n").unwrap_err();
        assert!(err.contains("placeholder"), "{err}");
        let err = KeySet::parse(&format!("{} * svc\n", hash("test"))).unwrap_err();
        assert!(err.contains("\"test\""), "{err}");
    }

    #[test]
    fn a_rewrite_is_seen_even_when_the_mtime_does_not_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{} t-1\n", hash("old-key"))).unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        // The key is revoked and replaced; the file keeps its modification time (a rewrite
        // within the clock's granularity, or read between the file and its mtime).
        std::fs::write(&path, format!("{} t-1\n", hash("new-key"))).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        keys.reload(false);
        keys.reload(false);
        assert!(
            keys.get().lookup("old-key").is_none(),
            "revoked key still works"
        );
        assert!(keys.get().lookup("new-key").is_some());
    }

    /// A keys file rewritten in place (truncated, then written) is never applied empty: a poll
    /// that reads it between the two steps does not lock every client out.
    #[tokio::test(start_paused = true)]
    async fn a_file_read_while_being_rewritten_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{} t-1\n", hash("key"))).unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        let stop = CancellationToken::new();
        let _watcher = tokio::spawn(keys.clone().watch(stop.clone()));
        tokio::task::yield_now().await;
        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        assert!(keys.get().lookup("key").is_some(), "a poll read it empty");
        std::fs::write(&path, format!("{} t-1\n{} t-2\n", hash("key"), hash("k2"))).unwrap();
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert!(keys.get().lookup("key").is_some());
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert!(keys.get().lookup("key").is_some() && keys.get().lookup("k2").is_some());
        stop.cancel();
    }

    /// The poll is a timer: with tokio's clock paused, the two seconds pass at once.
    #[tokio::test(start_paused = true)]
    async fn the_watcher_applies_a_rewrite_at_its_next_poll_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{} t-1\n", hash("old-key"))).unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        let stop = CancellationToken::new();
        let watcher = tokio::spawn(keys.clone().watch(stop.clone()));
        tokio::task::yield_now().await;
        std::fs::write(&path, format!("{} t-1\n", hash("new-key"))).unwrap();
        tokio::time::sleep(Duration::from_millis(3_900)).await;
        assert!(
            keys.get().lookup("old-key").is_some(),
            "one poll saw the change: not applied until a second read agrees"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            keys.get().lookup("old-key").is_none(),
            "revoked at the second poll"
        );
        assert!(keys.get().lookup("new-key").is_some());
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), watcher)
            .await
            .expect("the watcher ends with the shutdown")
            .unwrap();
    }
}
