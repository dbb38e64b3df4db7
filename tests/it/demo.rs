//! The README's first command, `queue-worker demo`, through the binary: it runs to a
//! summary, and Ctrl-C stops it (and its nats-server) cleanly.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

fn demo(args: &[&str]) -> Child {
    crate::support::init_logs();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_queue-worker"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        cmd.env("NATS_SERVER_BIN", bin);
    }
    cmd.arg("demo")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Reads stdout lines until one contains `marker`; returns everything read.
async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    marker: &str,
) -> String {
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(marker) {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "{marker:?} never printed:\n{seen}"
    );
    seen
}

fn sigint(child: &Child) {
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn the_demo_runs_a_burst_to_its_summary() {
    let child = demo(&[
        "--jobs",
        "30",
        "--function-inflight",
        "4",
        "--inflight",
        "8",
    ]);
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("the demo ends by itself")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("30 jobs accepted (0 refused), 30 processed"),
        "{stdout}"
    );
    assert!(stdout.contains("30 callbacks"), "{stdout}");
    assert!(stdout.contains("done   30/30"), "{stdout}");
}

#[tokio::test]
async fn ctrl_c_stops_the_demo_and_its_nats_server() {
    let mut child = demo(&["--jobs", "5", "--stay"]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let seen = read_until(&mut lines, "Ctrl-C stops everything").await;
    let nats_port: u16 = seen
        .lines()
        .find_map(|l| l.trim().strip_prefix("nats-server"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|url| url.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no nats-server line in:\n{seen}"));
    // The front door answers while the demo stays up.
    let door = seen
        .lines()
        .find_map(|l| l.trim().strip_prefix("front door"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .replace("<name>", "sleep");
    let r = reqwest::Client::new().post(&door).send().await.unwrap();
    assert_eq!(r.status(), 202);

    sigint(&child);
    let rest = read_until(&mut lines, "Stopping").await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the demo stops after Ctrl-C")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{seen}{rest}");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", nats_port))
            .await
            .is_err(),
        "the demo's nats-server is gone"
    );
}

#[tokio::test]
async fn ctrl_c_during_the_burst_interrupts_it() {
    let mut child = demo(&["--jobs", "100000"]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    read_until(&mut lines, "POSTing").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigint(&child);
    let rest = read_until(&mut lines, "Interrupted after").await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the demo stops after Ctrl-C")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{rest}");
}
