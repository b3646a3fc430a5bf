//! Real PostgreSQL: a private `postgres` server (`initdb` into a temp dir) on a free loopback
//! port, run as the unprivileged `postgres` user when the tests run as root (the server refuses
//! root), stopped on drop; and the Processor binary on it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{bin, eventually, free_port, http};

/// The directory of `initdb` and `postgres`: `PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian keeps them off PATH), else `pg_config --bindir`.
pub fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let dir = e.path().join("bin");
            dir.join("initdb").exists().then_some((v, dir))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return dir;
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("PostgreSQL must be installed (scripts/test.sh installs it)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Root runs the server as `postgres` (uid, gid); anyone else as themselves.
fn server_user() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a `postgres` user (the postgresql package creates it)")
    };
    Some((id("-u"), id("-g")))
}

/// A real PostgreSQL server, stopped (immediate shutdown) on drop.
pub struct PgServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    user: Option<(u32, u32)>,
}

impl PgServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let user = server_user();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut pg = PgServer {
            port: free_port(),
            child: None,
            dir,
            user,
        };
        let out = pg
            .command("initdb")
            .args(["-D", &pg.data().display().to_string()])
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.run();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A PostgreSQL program, as the server's user.
    fn command(&self, program: &str) -> Command {
        let path = pg_bin().join(program);
        match self.user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".into(),
                ])
                .arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    /// Starts the server again after [`PgServer::stop`] (`setpriv` execs it: the child is the
    /// postmaster itself).
    pub fn run(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(self.dir.path().join("server.log"), Some(uid), Some(gid))
                .unwrap();
        }
        let child = self
            .command("postgres")
            .args(["-D", &self.data().display().to_string()])
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1"])
            .args(["-k", &self.dir.path().display().to_string()])
            // Durable against a crash of the server process (what the tests do), not of the
            // machine: fast.
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = Command::new(pg_bin().join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("postgres did not start: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// `DATABASE_URL` for the Processor.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server: SIGQUIT is PostgreSQL's immediate shutdown (no checkpoint; the WAL is
    /// replayed at the next start, as after a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Runs SQL with `psql` and returns its unaligned, tuples-only output (`|`-separated).
    pub fn sql(&self, query: &str) -> String {
        let out = Command::new(pg_bin().join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &self.url()])
            .args(["-c", query])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {query}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real `pulse-processor` process on a database, killed on drop.
pub struct ProcessorProcess {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl ProcessorProcess {
    /// Starts the binary with `DATABASE_URL` and these extra arguments; waits for `/readyz`.
    pub async fn spawn(database_url: &str, dir: &Path, name: &str, args: &[&str]) -> Self {
        Self::spawn_on(free_port(), database_url, dir, name, args).await
    }

    /// [`ProcessorProcess::spawn`] on a given port (a restart where the ingestor delivers).
    pub async fn spawn_on(
        port: u16,
        database_url: &str,
        dir: &Path,
        name: &str,
        args: &[&str],
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bin("pulse-processor"))
            .env_clear()
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "info")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let c = http();
        let ok = eventually(Duration::from_secs(30), || {
            let c = c.clone();
            let u = format!("{base}/readyz");
            async move { c.get(u).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        let p = ProcessorProcess { child, base, log };
        assert!(ok, "{name} did not become ready; log: {}", p.log_text());
        p
    }

    /// The URL the ingestor delivers to.
    pub fn url(&self) -> String {
        format!("{}/batches", self.base)
    }

    /// `kill -9`: the open transaction dies with its connection.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProcessorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
