//! The binary: bad configuration exits with code 2 and names the key.

use std::process::Command;

/// Runs `check-config` with `args` and `env`; returns (exit code, stdout, stderr).
fn check_config(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = worker();
    cmd.args(args).arg("check-config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn worker() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_queue-worker"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

#[test]
fn bad_env_value_exits_2_naming_the_key() {
    let out = worker().env("max_inflight", "lots").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_inflight") && err.contains("\"lots\"") && err.contains("whole number"),
        "{err}"
    );
}

#[test]
fn a_bad_callback_allow_list_exits_2_naming_the_key_and_the_entry() {
    let out = worker()
        .env("callback_allowed_networks", "10.0.0.0/8, 169.254.0.0/33")
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("callback_allowed_networks") && err.contains("\"169.254.0.0/33\""),
        "{err}"
    );
}

#[test]
fn bad_file_value_and_unknown_key_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let config = path.to_str().unwrap();
    std::fs::write(&path, "ack_wait: 10\n").unwrap();
    let (code, _, err) = check_config(&["--config", config], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("ack_wait") && err.contains("config file"),
        "{err}"
    );

    std::fs::write(&path, "max_inflihgt: 3\n").unwrap();
    let (code, _, err) = check_config(&["--config", config], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("max_inflihgt"), "{err}");
}

#[test]
fn flags_win_over_env_and_the_example_file_loads() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml");
    let (code, out, err) = check_config(
        &["--config", example, "--max-inflight", "9"],
        &[("max_inflight", "5")],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("max_inflight: 9"), "{out}");
}

#[test]
fn a_proxy_calls_cannot_use_exits_2_before_connecting() {
    let gw = ("gateway_url", "http://gw.example:8080");
    let (code, _, err) = check_config(&[], &[gw, ("ALL_PROXY", "socks5://u:secret@p:1080")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("socks5://p:1080") && err.contains("NO_PROXY") && !err.contains("secret"),
        "{err}"
    );
    // Exempt the gateway, or name an http:// proxy: fine.
    let (code, _, err) = check_config(
        &[],
        &[
            gw,
            ("ALL_PROXY", "socks5://p:1080"),
            ("NO_PROXY", "gw.example"),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = check_config(&[], &[gw, ("http_proxy", "http://p:3128")]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn scaling_mode_accepts_function_and_names_what_is_allowed() {
    let (code, out, err) = check_config(&[], &[("scaling_mode", "function")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("Function"), "{out}");
    let (code, _, err) = check_config(&[], &[("scaling_mode", "per-function")]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("scaling_mode") && err.contains("static or function"),
        "{err}"
    );
}

/// A child process killed when the test ends, also when it fails: an orphan would keep
/// the test runner's output pipe open and hang whoever reads it.
struct Spawned(Option<std::process::Child>);

impl Spawned {
    fn new(cmd: &mut Command) -> Spawned {
        Spawned(Some(
            cmd.stdout(std::process::Stdio::null()).spawn().unwrap(),
        ))
    }
    fn get(&mut self) -> &mut std::process::Child {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends SIGTERM, checks the exit code is 0, and returns stderr.
fn terminate(mut child: Spawned) -> String {
    let child = child.0.take().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    err
}

#[test]
fn sigterm_drains_and_exits_0() {
    let nats = queue_worker::dev::natsd::NatsServer::start().unwrap();
    let port = queue_worker::dev::natsd::free_port().unwrap();
    let child = Spawned::new(
        worker()
            .env("nats_url", nats.url())
            .env("gateway_url", "http://127.0.0.1:9")
            .env("metrics_port", port.to_string())
            .stderr(std::process::Stdio::piped()),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let ready = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
        });
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker never became ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let err = terminate(child);
    assert!(err.contains("Draining") && err.contains("Stopped"), "{err}");
}

#[test]
fn the_frontdoor_binary_queues_and_stops_on_sigterm() {
    let nats = queue_worker::dev::natsd::NatsServer::start().unwrap();
    let metrics = queue_worker::dev::natsd::free_port().unwrap();
    let listen = queue_worker::dev::natsd::free_port().unwrap();
    let child = Spawned::new(
        worker()
            .env("nats_url", nats.url())
            .env("metrics_port", metrics.to_string())
            .args(["frontdoor", "--listen", &format!("127.0.0.1:{listen}")])
            .stderr(std::process::Stdio::piped()),
    );
    let http = |port: u16, request: &str| -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        let _ = s.write_all(request.as_bytes());
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !http(metrics, "GET /readyz HTTP/1.0\r\n\r\n").contains(" 200 ") {
        assert!(
            std::time::Instant::now() < deadline,
            "front door never ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let answer = http(
        listen,
        "POST /async-function/sleep HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert!(
        answer.starts_with("HTTP/1.0 202") || answer.starts_with("HTTP/1.1 202"),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("x-call-id: "),
        "{answer}"
    );
    let err = terminate(child);
    assert!(err.contains("Stopped"), "{err}");
}

#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    // The reader (`true`) is gone before the command writes: every write gets EPIPE.
    let script = format!(
        "{{ sleep 0.3; exec {} check-config; }} | true; echo \"status=${{PIPESTATUS[0]}}\"",
        env!("CARGO_BIN_EXE_queue-worker")
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("status=0"), "{stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_sample_function_binary_limits_like_the_watchdog() {
    let port = queue_worker::dev::natsd::free_port().unwrap();
    let mut child = Spawned::new(
        worker()
            .args([
                "sample-function",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--min-ms",
                "3000",
                "--max-ms",
                "3000",
                "--function-inflight",
                "1",
            ])
            .stderr(std::process::Stdio::piped()),
    );
    let request = move |path: &str| -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        let _ =
            s.write_all(format!("POST {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n").as_bytes());
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !request("/callback").contains(" 200 ") {
        if let Ok(Some(status)) = child.get().try_wait() {
            let mut err = String::new();
            use std::io::Read;
            child
                .get()
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("sample-function exited with {status}: {err}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sample-function never answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Two calls at once against a limit of one: one runs (3 s), the other is refused at once.
    let calls: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || request("/function/sleep")))
        .collect();
    let mut answers: Vec<String> = calls.into_iter().map(|c| c.join().unwrap()).collect();
    answers.sort_by_key(|a| a.contains(" 429 "));
    assert!(answers[0].contains(" 200 "), "{answers:?}");
    assert!(answers[1].contains(" 429 "), "{answers:?}");
    assert!(
        answers[1]
            .to_ascii_lowercase()
            .contains("x-openfaas-internal"),
        "{answers:?}"
    );
    let err = terminate(child);
    assert!(!err.contains("panicked"), "{err}");
}

/// Starts the worker binary on `env` with `log_flush_interval`, stderr to a file; publishes
/// `n` jobs and waits until the gateway has answered them all.
async fn run_jobs_logging_to_file(
    env: &crate::support::Env,
    flush_interval: &str,
    n: usize,
) -> (Spawned, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let child = Spawned::new(
        worker()
            .env("nats_url", env.nats.url())
            .env("gateway_url", env.gateway.url())
            .env("metrics_port", "0")
            .env("log_flush_interval", flush_interval)
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let sub = queue_worker::message::publish::Submission {
        function: "echo".into(),
        ..Default::default()
    };
    queue_worker::message::publish::publish(&env.config(&[]), &sub, n)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while env.gateway.calls_to("echo") < n {
        assert!(std::time::Instant::now() < deadline, "jobs not run");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (child, log, dir)
}

fn invoked_lines(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" Invoked "))
        .count()
}

#[tokio::test]
async fn batched_log_lines_appear_within_the_interval() {
    let env = crate::support::Env::start().await;
    let (child, log, _dir) = run_jobs_logging_to_file(&env, "100ms", 20).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while invoked_lines(&log) < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 20 Invoked lines written while running",
            invoked_lines(&log)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let err = tokio::task::spawn_blocking(move || terminate(child))
        .await
        .unwrap();
    assert_eq!(err.matches(" Invoked ").count(), 0, "stderr was a file");
    assert_eq!(invoked_lines(&log), 20);
}

#[tokio::test]
async fn buffered_log_lines_are_written_at_exit_in_order() {
    let env = crate::support::Env::start().await;
    let (child, log, _dir) = run_jobs_logging_to_file(&env, "10s", 20).await;
    // Batching is on: no info line yet, ten seconds before the flush.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(invoked_lines(&log), 0);
    tokio::task::spawn_blocking(move || terminate(child))
        .await
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(invoked_lines(&log), 20, "{text}");
    let last_invoked = text.rfind(" Invoked ").unwrap();
    let stopped = text.find("Stopped").expect("shutdown logged");
    assert!(last_invoked < stopped, "{text}");
}

/// A TLS front for `backend` (a plain-HTTP address) on a free loopback port, serving
/// `cert`/`key`: each connection is decrypted and piped through.
async fn tls_front(
    cert: &std::path::Path,
    key: &std::path::Path,
    backend: std::net::SocketAddr,
) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: nothing to pipe.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut plain = tokio::net::TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// An `https` gateway is called over TLS and verified against the system's trust store,
/// which `SSL_CERT_FILE` replaces: a gateway whose certificate the store does not vouch
/// for is never sent the call (nor its credentials), and the failure is logged.
#[tokio::test]
async fn an_https_gateway_is_verified_against_the_trust_store() {
    let env = crate::support::Env::start().await;
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let [ca, cert, key, ..] = crate::auth::pki(dir.path());
    let [unrelated_ca, ..] = crate::auth::pki(other.path());
    let backend = env
        .gateway
        .url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let front = tls_front(&cert, &key, backend).await;
    let gateway = format!("https://admin:s3cret@localhost:{}", front.port());
    let run = |trust: &std::path::Path, log: &std::path::Path, proxy: Option<String>| {
        let mut cmd = worker();
        cmd.env("nats_url", env.nats.url())
            .env("gateway_url", &gateway)
            .env("metrics_port", "0")
            .env("log_flush_interval", "0")
            .env("initial_retry_wait", "100ms")
            .env("SSL_CERT_FILE", trust)
            .stderr(std::fs::File::create(log).unwrap());
        if let Some(proxy) = proxy {
            cmd.env("HTTPS_PROXY", proxy);
        }
        Spawned::new(&mut cmd)
    };
    let sub = queue_worker::message::publish::Submission {
        function: "echo".into(),
        ..Default::default()
    };
    queue_worker::message::publish::publish(&env.config(&[]), &sub, 1)
        .await
        .unwrap();

    // Not trusted: the call fails in the handshake and is retried later.
    let log = dir.path().join("untrusted.log");
    let untrusted = run(&unrelated_ca, &log, None);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains(" Invoked ") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "no call: {text}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(text.contains("status=error"), "{text}");
    assert!(text.contains("certificate"), "{text}");
    drop(untrusted);
    assert_eq!(env.gateway.calls_to("echo"), 0);

    // Trusted: the job is redelivered and runs, with the gateway's credentials.
    let log = dir.path().join("trusted.log");
    let trusted = run(&ca, &log, None);
    env.gateway
        .wait_for(
            "the call over TLS",
            std::time::Duration::from_secs(30),
            |g| g.calls_to("echo") == 1,
        )
        .await;
    let call = env.gateway.calls().pop().unwrap();
    assert_eq!(call.header("authorization"), "Basic YWRtaW46czNjcmV0");
    let err = tokio::task::spawn_blocking(move || terminate(trusted))
        .await
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");

    // Through a proxy: a CONNECT tunnel (with the proxy's credentials), TLS inside it.
    let (proxy, asked) = fake_proxy().await;
    let log = dir.path().join("tunnelled.log");
    let tunnelled = run(&ca, &log, Some(format!("http://puser:ppass@{proxy}")));
    queue_worker::message::publish::publish(&env.config(&[]), &sub, 1)
        .await
        .unwrap();
    env.gateway
        .wait_for(
            "the tunnelled call",
            std::time::Duration::from_secs(30),
            |g| g.calls_to("echo") == 2,
        )
        .await;
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    let (line, headers) = &asked[0];
    assert_eq!(
        line,
        &format!("CONNECT localhost:{} HTTP/1.1", front.port())
    );
    for (name, _) in headers {
        assert_eq!(name, &crate::flow::go_canonical(name), "{headers:?}");
    }
    assert_eq!(
        header_of(headers, "proxy-authorization"),
        Some("Basic cHVzZXI6cHBhc3M=")
    );
    tokio::task::spawn_blocking(move || terminate(tunnelled))
        .await
        .unwrap();
}

/// What a fake proxy was asked: each request's first line and its headers (names as
/// written).
type Asked = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<(String, String)>)>>>;

/// A fake HTTP proxy on a free loopback port. `CONNECT host:port` is answered 200 and piped
/// to that port on 127.0.0.1; any other request (absolute form, as to a forward proxy) is
/// recorded and answered 200 by the proxy itself.
async fn fake_proxy() -> (std::net::SocketAddr, Asked) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked: Asked = Default::default();
    let record = asked.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut conn = tokio::io::BufReader::new(tcp);
                loop {
                    let mut first = String::new();
                    if conn.read_line(&mut first).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut headers = Vec::new();
                    loop {
                        let mut line = String::new();
                        conn.read_line(&mut line).await.unwrap();
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        let (k, v) = line.split_once(':').unwrap();
                        headers.push((k.to_string(), v.trim().to_string()));
                    }
                    let first = first.trim_end().to_string();
                    record
                        .lock()
                        .unwrap()
                        .push((first.clone(), headers.clone()));
                    if let Some(target) = first.strip_prefix("CONNECT ") {
                        let port = target.split([':', ' ']).nth(1).unwrap();
                        let mut upstream =
                            tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
                                .await
                                .unwrap();
                        conn.get_mut()
                            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                            .await
                            .unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                        return;
                    }
                    let length: usize = headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .map_or(0, |(_, v)| v.parse().unwrap());
                    let mut body = vec![0; length];
                    conn.read_exact(&mut body).await.unwrap();
                    conn.get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await
                        .unwrap();
                }
            });
        }
    });
    (addr, asked)
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// As Go's net/http and reqwest do, function calls honour `HTTP_PROXY` (absolute-form
/// requests with the proxy's credentials, the gateway's own still in `Authorization`) and
/// `NO_PROXY` (straight to the gateway).
#[tokio::test]
async fn function_calls_go_through_the_environments_proxy() {
    let env = crate::support::Env::start().await;
    let (proxy, asked) = fake_proxy().await;
    let sub = queue_worker::message::publish::Submission {
        function: "echo".into(),
        ..Default::default()
    };
    let spawn = |gateway: &str, no_proxy: &str| {
        Spawned::new(
            worker()
                .env("nats_url", env.nats.url())
                .env("gateway_url", gateway)
                .env("metrics_port", "0")
                .env("HTTP_PROXY", format!("http://puser:ppass@{proxy}"))
                .env("NO_PROXY", no_proxy)
                .stderr(std::process::Stdio::piped()),
        )
    };

    // gateway.test does not resolve: only the proxy can take the call.
    let child = spawn("http://admin:s3cret@gateway.test:8080", "");
    queue_worker::message::publish::publish(&env.config(&[]), &sub, 1)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while asked.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy got no call"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (line, headers) = asked.lock().unwrap()[0].clone();
    assert_eq!(line, "POST http://gateway.test:8080/function/echo HTTP/1.1");
    // Through a proxy too, header names are written as Go's worker writes them.
    for (name, _) in &headers {
        assert_eq!(name, &crate::flow::go_canonical(name), "{headers:?}");
    }
    // base64("puser:ppass") and base64("admin:s3cret")
    assert_eq!(
        header_of(&headers, "proxy-authorization"),
        Some("Basic cHVzZXI6cHBhc3M=")
    );
    assert_eq!(
        header_of(&headers, "authorization"),
        Some("Basic YWRtaW46czNjcmV0")
    );
    let err = tokio::task::spawn_blocking(move || terminate(child))
        .await
        .unwrap();
    assert!(err.contains("Function calls go through a proxy"), "{err}");
    assert!(!err.contains("ppass"), "{err}");

    // NO_PROXY names the gateway's host: straight there.
    let child = spawn(&env.gateway.url(), "127.0.0.1");
    queue_worker::message::publish::publish(&env.config(&[]), &sub, 1)
        .await
        .unwrap();
    env.gateway
        .wait_for("the direct call", std::time::Duration::from_secs(20), |g| {
            g.calls_to("echo") == 1
        })
        .await;
    assert_eq!(asked.lock().unwrap().len(), 1);
    tokio::task::spawn_blocking(move || terminate(child))
        .await
        .unwrap();
}

/// A log reader that stalls (a slow container log driver) must not stop the worker: its
/// stderr is a pipe nobody reads until the end, and the jobs log far more than the pipe's
/// 64 KiB and the worker's log queue hold (`debug` logs each 2 KiB body). Every job is still
/// called once and acknowledged, the lines that did not fit are counted, and after the
/// reader catches up the worker stops on SIGTERM as usual.
#[tokio::test]
async fn a_stalled_stderr_drops_lines_but_never_holds_up_calls() {
    let env = crate::support::Env::start().await;
    let port = queue_worker::dev::natsd::free_port().unwrap();
    let mut child = Spawned::new(
        worker()
            .env("nats_url", env.nats.url())
            .env("gateway_url", env.gateway.url())
            .env("metrics_port", port.to_string())
            .env("ack_wait", "2s")
            .env("log_flush_interval", "10ms")
            .env("debug", "true")
            .stderr(std::process::Stdio::piped()),
    );
    // Held, unread, until the end.
    let stderr = child.get().stderr.take().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !reqwest::get(format!("{base}/readyz"))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(std::time::Instant::now() < deadline, "worker not ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let n = 1_000;
    let sub = queue_worker::message::publish::Submission {
        function: "echo".into(),
        body: vec![b'x'; 2048],
        ..Default::default()
    };
    let ids = queue_worker::message::publish::publish(&env.config(&[]), &sub, n)
        .await
        .unwrap();
    env.wait_drained(std::time::Duration::from_secs(20)).await;
    let calls = env.gateway.calls();
    assert_eq!(calls.len(), n, "each job called exactly once");
    let called: std::collections::HashSet<String> = calls.iter().map(|c| c.call_id()).collect();
    assert_eq!(called, ids.into_iter().collect(), "every job called");

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("queue_worker_log_lines_dropped_total "))
        .unwrap_or_else(|| panic!("no dropped-lines metric:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(dropped > 0.0, "{metrics}");

    // The reader catches up; what was queued, and the shutdown, is written.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut { stderr }, &mut text).unwrap();
        text
    });
    tokio::task::spawn_blocking(move || terminate(child))
        .await
        .unwrap();
    let text = reader.join().unwrap();
    assert!(text.contains(" Invoked "), "{text}");
    assert!(text.contains("Stopped"), "{text}");
}
