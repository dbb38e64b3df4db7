//! A local `nats-server -js` child process on a free loopback port and a temporary store,
//! killed on drop. The demo runs on it, and so do the integration tests (which may also kill
//! and restart it on the same store to simulate a crash).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Finds the server binary: `$NATS_SERVER_BIN`, then `PATH`, then Debian's `/usr/sbin`.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 for a server that must be told its port up front (a cluster
/// route, a restart on the same port).
///
/// Ports come from 20000–32767, below Linux's ephemeral range (32768–60999): a port the kernel
/// hands out for a `:0` listener or an outgoing connection's local end (which the many
/// concurrent tests open all the time) is never one of these, so between this check and the
/// server's bind only another `free_port` caller could take it, and within this process a
/// counter keeps callers apart. CI once lost a cluster start to an ephemeral port taken in
/// that window.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_768;
    // Start each process somewhere else so that two test binaries rarely probe the same ports.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    // Every port of the range is taken: fall back to one the kernel picks.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running nats-server with JetStream.
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    pub port: u16,
    pub store: PathBuf,
    extra_args: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a server on a port the server picks itself (no race with other processes)
    /// with a fresh temporary store.
    pub fn start() -> anyhow::Result<NatsServer> {
        let dir = tempfile::tempdir()?;
        let mut s = NatsServer::start_with(&dir.path().join("jetstream"), 0, Vec::new())?;
        s._dir = Some(dir);
        Ok(s)
    }

    /// Starts a server on `port` (0: the server picks one and reports it in a ports file)
    /// with its JetStream store in `store`, plus `extra_args` (cluster settings, for example).
    pub fn start_with(
        store: &Path,
        port: u16,
        extra_args: Vec<String>,
    ) -> anyhow::Result<NatsServer> {
        let binary = find_binary().context(
            "nats-server not found: install it (Debian: apt-get install -y nats-server) or set NATS_SERVER_BIN",
        )?;
        let mut s = NatsServer {
            child: None,
            binary,
            port,
            store: store.to_owned(),
            extra_args,
            _dir: None,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.store)?;
        let log = std::fs::File::create(self.store.with_extension("log"))?;
        let ports_dir = self.store.with_extension("ports");
        let mut cmd = Command::new(&self.binary);
        cmd.args(["-js", "-a", "127.0.0.1", "-sd"]).arg(&self.store);
        if self.port == 0 {
            std::fs::create_dir_all(&ports_dir)?;
            cmd.args(["-p", "-1", "--ports_file_dir"]).arg(&ports_dir);
        } else {
            cmd.args(["-p", &self.port.to_string()]);
        }
        let child = cmd
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "nats-server exited with {status}; see {}",
                        self.store.with_extension("log").display()
                    );
                }
            }
            if self.port == 0 {
                // The directory is this server's own; the file is named after the pid of
                // the real server process (which a wrapper script may have started).
                if let Some(port) = std::fs::read_dir(&ports_dir)
                    .ok()
                    .into_iter()
                    .flatten()
                    .flatten()
                    .find_map(|e| read_port(&e.path()))
                {
                    self.port = port;
                }
            }
            if self.port != 0 && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "nats-server did not listen on port {} within 10s",
            self.port
        )
    }

    /// The server's process id: from its ports file, which names the real server even when
    /// `NATS_SERVER_BIN` is a wrapper script; else the child's.
    pub fn pid(&self) -> Option<u32> {
        self.pid_from_ports()
            .or_else(|| self.child.as_ref().map(|c| c.id()))
    }

    fn pid_from_ports(&self) -> Option<u32> {
        std::fs::read_dir(self.store.with_extension("ports"))
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| {
                let name = e.file_name();
                let stem = name.to_str()?.strip_suffix(".ports")?;
                stem.rsplit('_').next()?.parse().ok()
            })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.forget_ports_file();
        }
    }

    /// A restart reuses the port without a ports file, so the old one (naming a process that
    /// is gone) must not answer [`NatsServer::pid`] any more.
    fn forget_ports_file(&self) {
        let _ = std::fs::remove_dir_all(self.store.with_extension("ports"));
    }

    /// Stops the server as an orderly shutdown does (SIGTERM, then waits for it to exit), so
    /// it writes its stream and consumer state out; a test can then edit the store while
    /// nothing holds it. Falls back to [`NatsServer::kill`] if the signal cannot be sent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The ports file names the real server (a wrapper script may stand in between).
        let pid = self.pid_from_ports().unwrap_or(child.id());
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            let _ = child.kill();
        }
        let _ = child.wait();
        self.forget_ports_file();
        // A wrapper may exit before the server it started.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.port != 0
            && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// The client port from a ports file: `{"nats":["nats://127.0.0.1:4222"],...}`.
fn read_port(file: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(file).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = v.get("nats")?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
