//! The service under test: in-process (`TestApp`) or as its real binary (`Ingestor`), with the
//! reference Processor and the producer beside it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pulse_ingestor::app::App;
use pulse_ingestor::config::Config;
use pulse_producer::processor::{Faults, Processor};
use tokio::sync::oneshot;

use super::{
    Dec, Key, RedisServer, assert_books, eventually, flush_now, free_port, http, post, settings,
    wait_delivered,
};

/// The service running in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The metrics listener, when `METRICS_ADDR` is set (port 0 picks a free one).
    pub metrics_addr: Option<SocketAddr>,
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<Result<(), pulse_ingestor::app::AppError>>,
    /// The Redis this app owns, when started with [`TestApp::start`].
    redis: Option<RedisServer>,
    pub client: reqwest::Client,
}

impl TestApp {
    pub async fn spawn(vars: HashMap<String, String>) -> Self {
        let cfg = Config::from_map(&vars).expect("test config is valid");
        let app = App::build(cfg).await.expect("app builds");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        TestApp {
            addr,
            metrics_addr,
            base: format!("http://{addr}"),
            stop: Some(tx),
            handle,
            redis: None,
            client: http(),
        }
    }

    /// A Redis of its own (stopped with the app) and the service on it, with the base
    /// [`settings`] and `extra`: what most tests need.
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        let redis = RedisServer::start();
        let mut app = Self::spawn(settings(&redis, extra)).await;
        app.redis = Some(redis);
        app
    }

    /// The Redis of an app made by [`TestApp::start`].
    pub fn redis(&self) -> &RedisServer {
        self.redis.as_ref().expect("TestApp::start owns a Redis")
    }

    /// `POST /ingest` with a JSON body.
    pub async fn post_pulse(
        &self,
        body: &serde_json::Value,
    ) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        post(&self.client, &format!("{}/ingest", self.base), body).await
    }

    /// `POST /ingest/batch` with a JSON array.
    pub async fn post_batch(
        &self,
        body: &serde_json::Value,
    ) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        post(&self.client, &format!("{}/ingest/batch", self.base), body).await
    }

    /// `POST /admin/flush`.
    pub async fn flush_now(&self) -> serde_json::Value {
        flush_now(&self.base).await
    }

    /// Waits until nothing is pending.
    pub async fn wait_delivered(&self, timeout: Duration) {
        wait_delivered(&self.base, timeout).await
    }

    /// The books balance in this app's Redis: every key exactly as `expected`.
    pub fn assert_books(&self, prefix: &str, expected: &BTreeMap<Key, Dec>) {
        assert_books(expected, &self.redis().totals(prefix));
    }

    /// Graceful shutdown, as SIGTERM does it.
    pub async fn stop(mut self) -> Result<(), pulse_ingestor::app::AppError> {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap()
    }
}

/// The reference Processor, in-process.
pub async fn processor(faults: Faults) -> (Arc<Processor>, String) {
    let p = Processor::new(faults, None).unwrap();
    let addr = pulse_producer::processor::spawn(p.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (p, format!("http://{addr}"))
}

/// The one way tests start `pulse-producer`: with these arguments (stdout and stderr are the
/// caller's to set).
pub fn producer_command<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin("pulse-producer"));
    cmd.args(args).kill_on_drop(true);
    cmd
}

/// Runs `pulse-producer` with these arguments and returns its exit code and output.
pub async fn producer<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, String) {
    let out = producer_command(args).output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// [`producer`] in the background (a load beside a scenario).
pub fn producer_in_background(args: Vec<String>) -> tokio::task::JoinHandle<(i32, String)> {
    tokio::spawn(async move { producer(&args).await })
}

/// A real binary of this workspace.
pub fn bin(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_pulse-ingestor"))
        .parent()
        .unwrap()
        .to_path_buf();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A real `pulse-ingestor` process.
pub struct Ingestor {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl Ingestor {
    pub async fn spawn(
        vars: &HashMap<String, String>,
        log_dir: &std::path::Path,
        name: &str,
    ) -> Self {
        Self::spawn_with(vars, log_dir, name, free_port(), &[]).await
    }

    /// Starts the binary on `port`, optionally under a wrapper command (e.g. `faketime`).
    pub async fn spawn_with(
        vars: &HashMap<String, String>,
        log_dir: &std::path::Path,
        name: &str,
        port: u16,
        wrapper: &[&str],
    ) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(bin("pulse-ingestor"));
                c
            }
            None => Command::new(bin("pulse-ingestor")),
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info");
        // Its own process group, so that whatever it starts (or a preloaded library forks)
        // goes with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.stdout(Stdio::null()).stderr(file).spawn().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let c = http();
        let ok = eventually(Duration::from_secs(20), || {
            let c = c.clone();
            let u = format!("{base}/healthz");
            async move { c.get(u).send().await.is_ok() }
        })
        .await;
        assert!(
            ok,
            "{name} did not start; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Ingestor { child, base, log }
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ingestor {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
