//! The worker under test as its own process (the release `queue-worker` binary, configured by
//! env vars as in a pod), and what `/proc` says about it: CPU time and resident memory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A running `queue-worker`; killed on drop.
pub struct WorkerProc {
    child: tokio::process::Child,
    pid: u32,
    pub log: PathBuf,
    ticks: f64,
}

/// How to start the worker: env vars, exactly as a Deployment would set them.
pub struct WorkerSpec<'a> {
    pub nats_url: &'a str,
    pub queue: &'a str,
    pub gateway_url: &'a str,
    /// `None` keeps the worker's default.
    pub max_inflight: Option<usize>,
    /// Further settings, e.g. `("scaling_mode", "function")` for a later function-mode run.
    pub extra: Vec<(String, String)>,
}

impl WorkerProc {
    pub fn spawn(binary: &Path, spec: &WorkerSpec<'_>, log: PathBuf) -> anyhow::Result<WorkerProc> {
        let out = std::fs::File::create(&log)?;
        let mut cmd = tokio::process::Command::new(binary);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("nats_url", spec.nats_url)
            .env("queue_name", spec.queue)
            .env("gateway_url", spec.gateway_url)
            .env("metrics_port", "0");
        if let Some(n) = spec.max_inflight {
            cmd.env("max_inflight", n.to_string());
        }
        for (k, v) in &spec.extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let pid = child.id().context("worker exited at once")?;
        Ok(WorkerProc {
            child,
            pid,
            log,
            ticks: clock_ticks(),
        })
    }

    /// User + system CPU time of the whole process (all threads) so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_of(self.pid, self.ticks)
    }

    /// Resident set size and its high-water mark, in bytes.
    pub fn rss(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc status"))?;
            let kib: u64 = line
                .split_whitespace()
                .nth(1)
                .context("odd /proc status")?
                .parse()?;
            Ok(kib * 1024)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Fails with the end of the worker's log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("the worker exited ({status}):\n{}", tail(&self.log));
        }
        Ok(())
    }

    /// Waits until the worker has logged `needle` (its start-up is done), up to `limit`.
    pub async fn wait_for_log(&mut self, needle: &str, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.check_alive()?;
            if std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .contains(needle)
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the worker did not log {needle:?} within {limit:?}:\n{}",
                    tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// User + system CPU time of process `pid` (all threads) so far; `ticks` per second.
pub fn cpu_of(pid: u32, ticks: f64) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("odd /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok(Duration::from_secs_f64((utime + stime) / ticks))
}

/// A process's CPU time, read before and after a measurement.
pub struct CpuMeter {
    pid: u32,
    ticks: f64,
}

impl CpuMeter {
    pub fn new(pid: u32) -> CpuMeter {
        CpuMeter {
            pid,
            ticks: clock_ticks(),
        }
    }

    pub fn now(&self) -> anyhow::Result<Duration> {
        cpu_of(self.pid, self.ticks)
    }
}

/// The whole machine's CPU use over a window: every process, every core, user + system +
/// interrupts (the first line of `/proc/stat`). Per message, it is what a pipeline costs in
/// total, which is what bounds it when every process shares the same cores.
pub struct MachineCpu {
    busy: Duration,
    at: std::time::Instant,
}

/// What the machine spent over a window.
#[derive(Debug, Clone, Copy)]
pub struct MachineUse {
    /// Busy CPU time, all cores.
    pub busy: Duration,
    /// `busy` ÷ (cores × wall time): 1.0 is every core busy all the time.
    pub utilization: f64,
}

impl MachineCpu {
    pub fn start() -> anyhow::Result<MachineCpu> {
        Ok(MachineCpu {
            busy: machine_busy()?,
            at: std::time::Instant::now(),
        })
    }

    pub fn stop(&self) -> anyhow::Result<MachineUse> {
        let busy = machine_busy()?.saturating_sub(self.busy);
        let wall = self.at.elapsed().as_secs_f64();
        Ok(MachineUse {
            busy,
            utilization: busy.as_secs_f64() / (cores()? * wall),
        })
    }
}

/// The CPUs `/proc/stat` counts (its `cpuN` lines): the same set as its totals, which
/// `available_parallelism` (cgroup quotas, affinity) need not be.
pub fn cores() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let n = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l[3..].starts_with(|c: char| c.is_ascii_digit()))
        .count();
    anyhow::ensure!(n > 0, "no cpuN lines in /proc/stat");
    Ok(n as f64)
}

fn machine_busy() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse())
        .collect::<Result<_, _>>()
        .context("odd /proc/stat")?;
    anyhow::ensure!(fields.len() >= 7, "odd /proc/stat: {line}");
    // user nice system [idle iowait] irq softirq. Not steal: time the hypervisor gave to
    // another guest is nobody's work here. Guest time is already inside user.
    let busy: u64 = fields[0] + fields[1] + fields[2] + fields[5] + fields[6];
    Ok(Duration::from_secs_f64(busy as f64 / clock_ticks()))
}

/// The last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
