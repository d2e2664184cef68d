//! Real peers for the tests: a TCP proxy a test can cut, and an SMTP server.

use crate::{Proc, spawn, wait_for_line};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// A TCP proxy in front of a service that a test can cut: every connection through it is
/// closed at once and new ones are closed as soon as they arrive, until it is restored. It
/// cuts one process off a service that everyone else still reaches.
pub struct CutProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listen on a free port and forward to `target` (`host:port`).
    pub async fn start(target: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let target = target.to_owned();
        let accept = {
            let (cut, conns) = (cut.clone(), conns.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(std::sync::atomic::Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let target = target.clone();
                    let handle = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    conns.lock().expect("lock").push(handle.abort_handle());
                }
            })
        };
        Ok(Self {
            port,
            cut,
            conns,
            accept,
        })
    }

    /// Close every connection and refuse new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }

    /// Let connections through again.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }
}

/// A real SMTP server (`tests/support/smtp_sink.py`) that writes what it receives to a
/// folder, for e-mail steps.
pub struct SmtpSink {
    pub port: u16,
    pub dir: PathBuf,
    _proc: Proc,
}

impl SmtpSink {
    pub async fn start(parent: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = parent.join("mail");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/smtp_sink.py");
        let (proc, mut rx) = spawn(
            "smtp sink",
            Path::new("python3"),
            &[
                script.to_str().context("path")?,
                &port.to_string(),
                dir.to_str().context("path")?,
            ],
            &[],
            parent,
            parent.join("smtp.log"),
        )
        .await?;
        if let Err(e) = wait_for_line(&mut rx, "ready", Duration::from_secs(20)).await {
            bail!("the SMTP sink did not start: {e}\n{}", proc.log_text());
        }
        Ok(Self {
            port,
            dir,
            _proc: proc,
        })
    }

    /// The messages received so far, oldest first.
    pub fn messages(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort_by_key(|p| {
            p.file_stem()
                .and_then(|s| s.to_str()?.parse::<u32>().ok())
                .unwrap_or(0)
        });
        files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .collect()
    }
}
