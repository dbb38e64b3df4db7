//! NATS's faults: the server crashes and comes back on its store; in a three-node cluster
//! (stream and consumer R3) the stream leader and then the consumer leader are killed.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use queue_worker::dev::natsd::{free_port, NatsServer};
use queue_worker::message::publish::{publish, Submission};

use super::ledger::{report, Extra, Ledger};
use super::{first_call_after, soak, wait_all_called};
use crate::support::{submit, Env, FakeGateway, Step};

/// Waits for the first call that starts after `t`; how long after `t` it came.
async fn wait_resumed(gateway: &FakeGateway, t: Instant, what: &str) -> Duration {
    gateway
        .wait_for(what, Duration::from_secs(60), |g| {
            first_call_after(g, t).is_some()
        })
        .await;
    first_call_after(gateway, t).unwrap()
}

/// nats-server killed (`SIGKILL`) and started again on the same store (R1, file storage):
/// nothing lost, and calls resume within 5 s of the server being back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_on_its_store() {
    let mut env = Env::start().await;
    env.gateway.script(
        "work",
        vec![Step::status(200).delay(Duration::from_millis(20))],
    );
    // A short ack_wait: nats-server 2.9.10 restarted after SIGKILL recovers its consumer
    // state with the ack floor reset (measured: ack floor at sequence 1, a few phantom
    // ack-pending entries that only clear after ack_wait). 2.15 recovers it exactly.
    let settings = [("max_inflight", "8"), ("ack_wait", "2s")];
    let config = env.config(&settings);
    let mut ledger = Ledger::new();
    ledger.published(submit(&config, "work", 1_000 * soak()).await);
    let worker = queue_worker::worker::start(config.clone()).await.unwrap();
    env.gateway
        .wait_for("50 calls", Duration::from_secs(20), |g| {
            g.calls().len() >= 50
        })
        .await;

    let back = tokio::task::block_in_place(|| {
        env.nats.kill();
        std::thread::sleep(Duration::from_millis(300));
        env.nats.restart().unwrap();
        Instant::now()
    });
    let resume = wait_resumed(&env.gateway, back, "a call after the restart").await;

    wait_all_called(&env.gateway, &ledger, Duration::from_secs(60)).await;
    env.wait_drained(Duration::from_secs(30)).await;
    // nats-server 2.9.10 restarted after SIGKILL may keep messages that were run and
    // acknowledged (the consumer owes nothing, the stream still counts them): the worker
    // must report them as stale rather than as work.
    let js = env.js().await;
    let left = super::ledger::stream_call_ids(&js, "OF_faas-request")
        .await
        .len();
    let stale = stale_gauge(&worker, left).await;
    let text = crate::support::scrape(&worker).await;
    crate::support::stop(worker).await;
    let t = ledger.settle(&env.gateway, &config).await;
    eprintln!("{left} messages left in the stream after the drain; stale gauge {stale}");
    report(
        "nats-server restarted on its store",
        &t,
        &Extra {
            resume: Some(resume),
            stale: Some(stale),
            ..Extra::default()
        },
    );
    assert_eq!((t.lost, t.unexpected, t.dead_lettered), (0, 0, 0), "{t:?}");
    assert_eq!(t.acked + stale, t.published, "{t:?}, stale {stale}");
    assert!(
        resume <= Duration::from_secs(5),
        "calls resumed {resume:?} after NATS was back"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("queue_worker_nats_reconnect_total ") && !l.ends_with(" 0")),
        "reconnect not counted:\n{text}"
    );
}

/// Waits (up to 20 s: the worker confirms stale messages over two looks 5 s apart) until
/// `queue_worker_stale_messages` for all functions reads `want`; returns what it reads.
async fn stale_gauge(worker: &queue_worker::worker::Running, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = crate::support::scrape(worker).await;
        let value = text
            .lines()
            .find(|l| {
                l.starts_with("queue_worker_stale_messages{")
                    && l.contains(r#"function_name="all-functions""#)
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as usize;
        if value == want || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A three-node JetStream cluster on loopback.
pub struct Cluster {
    pub nodes: Vec<NatsServer>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the three nodes; a node that cannot bind its ports (taken between the check and
    /// the bind) fails its start, and the whole cluster is tried again on new ports.
    pub fn start() -> Cluster {
        let mut last = None;
        for _ in 0..3 {
            match Cluster::try_start() {
                Ok(cluster) => return cluster,
                Err(e) => last = Some(e),
            }
        }
        panic!("cannot start a 3-node cluster: {last:?}");
    }

    fn try_start() -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let client_ports: Vec<u16> = (0..3).map(|_| free_port().unwrap()).collect();
        let route_ports: Vec<u16> = (0..3).map(|_| free_port().unwrap()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = (0..3)
            .map(|i| {
                let args = vec![
                    "-n".to_string(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "qw".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", route_ports[i]),
                    "--routes".into(),
                    routes.clone(),
                ];
                NatsServer::start_with(&dir.path().join(format!("n{i}")), client_ports[i], args)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Cluster { nodes, _dir: dir })
    }

    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A JetStream context on node `i` alone.
    pub async fn js_on(&self, i: usize) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.nodes[i].url()).await.unwrap();
        async_nats::jetstream::new(client)
    }
}

/// The index of the node named in a cluster info's leader (`n0`, `n1`, `n2`).
fn node(leader: Option<String>) -> Option<usize> {
    leader?.trim_start_matches('n').parse().ok()
}

/// The stream's leader and the consumer's leader, asked of node `via`; None while either is
/// being elected.
async fn leaders(js: &async_nats::jetstream::Context) -> Option<(usize, usize)> {
    let mut stream = js.get_stream("OF_faas-request").await.ok()?;
    let s = node(stream.info().await.ok()?.cluster.clone()?.leader)?;
    let c = node(
        stream
            .consumer_info("faas-workers")
            .await
            .ok()?
            .cluster
            .clone()?
            .leader,
    )?;
    Some((s, c))
}

/// Waits until every replica of the stream and the consumer is current again (after a
/// node's restart), asked of node `via`.
async fn wait_all_current(cluster: &Cluster, via: usize) {
    let js = cluster.js_on(via).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = async {
            let mut stream = js.get_stream("OF_faas-request").await.ok()?;
            let s = stream.info().await.ok()?.cluster.clone()?;
            let c = stream
                .consumer_info("faas-workers")
                .await
                .ok()?
                .cluster
                .clone()?;
            let current = |r: &Vec<async_nats::jetstream::stream::PeerInfo>| {
                r.len() == 2 && r.iter().all(|p| p.current)
            };
            Some(
                s.leader.is_some()
                    && c.leader.is_some()
                    && current(&s.replicas)
                    && current(&c.replicas),
            )
        }
        .await;
        if ok == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "the cluster did not heal");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Kills node `victim` after subscribing, on another node, to the leader-elected advisory
/// `subject`; returns when the kill happened and when the new leader was announced.
async fn kill_and_wait_election(
    cluster: &mut Cluster,
    victim: usize,
    subject: String,
) -> (Instant, Instant) {
    let observer = async_nats::connect(cluster.nodes[(victim + 1) % 3].url())
        .await
        .unwrap();
    let mut elected = observer.subscribe(subject.clone()).await.unwrap();
    observer.flush().await.unwrap();
    let killed = tokio::task::block_in_place(|| {
        cluster.nodes[victim].kill();
        Instant::now()
    });
    tokio::time::timeout(Duration::from_secs(60), elected.next())
        .await
        .unwrap_or_else(|_| panic!("no {subject} within 60 s"))
        .unwrap();
    (killed, Instant::now())
}

/// Stream and consumer R3 on three nodes: the stream leader is killed (`kill -9`) mid-run,
/// comes back, then the consumer leader is killed. Nothing is lost, and calls resume within
/// 2 s of the new consumer leader's election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_stream_leader_then_the_consumer_leader() {
    crate::support::init_logs();
    let mut cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let gateway = FakeGateway::start().await;
    gateway.script(
        "work",
        vec![Step::status(200).delay(Duration::from_millis(20))],
    );
    let pairs = vec![
        ("nats_url".to_string(), cluster.urls()),
        ("gateway_url".to_string(), gateway.url()),
        ("metrics_port".to_string(), "0".to_string()),
        ("nats_stream_replicas".to_string(), "3".to_string()),
        ("max_inflight".to_string(), "4".to_string()),
        ("ack_wait".to_string(), "2s".to_string()),
    ];
    let config = queue_worker::config::Config::load(
        &queue_worker::config::Sources::from_pairs(pairs).unwrap(),
    )
    .unwrap();

    // The cluster needs a moment to elect a meta leader before the stream can be made.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sub = Submission {
        function: "work".into(),
        ..Default::default()
    };
    let mut ledger = Ledger::new();
    loop {
        match publish(&config, &sub, 4_000 * soak()).await {
            Ok(ids) => {
                ledger.published(ids);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("cluster not ready yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("cluster never became ready: {e:#}"),
        }
    }
    let worker = queue_worker::worker::start(config.clone()).await.unwrap();
    gateway
        .wait_for("200 calls", Duration::from_secs(30), |g| {
            g.calls().len() >= 200
        })
        .await;

    // The stream leader.
    let (stream_leader, _) = leaders(&cluster.js_on(0).await).await.expect("leaders");
    let (_, elected) = kill_and_wait_election(
        &mut cluster,
        stream_leader,
        "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.OF_faas-request".into(),
    )
    .await;
    let after_stream = wait_resumed(
        &gateway,
        elected,
        "a call after the stream leader's election",
    )
    .await;
    tokio::task::block_in_place(|| cluster.nodes[stream_leader].restart().unwrap());
    wait_all_current(&cluster, (stream_leader + 1) % 3).await;

    // The consumer leader.
    let via = (stream_leader + 1) % 3;
    let (stream_leader_now, consumer_leader) =
        leaders(&cluster.js_on(via).await).await.expect("leaders");
    // When one node leads both, its death costs two elections; the calls wait for both.
    let both = stream_leader_now == consumer_leader;
    let calls_before = gateway.calls().len();
    let (killed, elected) = kill_and_wait_election(
        &mut cluster,
        consumer_leader,
        "$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.OF_faas-request.faas-workers".into(),
    )
    .await;
    let after_consumer = wait_resumed(
        &gateway,
        elected,
        "a call after the consumer leader's election",
    )
    .await;
    let election = elected - killed;
    assert!(
        gateway.calls().len() < ledger.count() + calls_before,
        "work remained when the consumer leader died"
    );

    wait_all_called(&gateway, &ledger, Duration::from_secs(120)).await;
    // And the queue empties: every message acknowledged on the new leaders.
    let js = cluster.js_on((consumer_leader + 1) % 3).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = async {
            js.get_stream("OF_faas-request")
                .await
                .ok()?
                .consumer_info("faas-workers")
                .await
                .ok()
        }
        .await;
        if c.is_some_and(|c| c.num_pending == 0 && c.num_ack_pending == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "the queue did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::support::stop(worker).await;
    tokio::task::block_in_place(|| cluster.nodes[consumer_leader].restart().unwrap());
    let t = ledger.settle(&gateway, &config).await;
    eprintln!(
        "stream leader killed: calls {after_stream:?} after the election; consumer leader \
         killed (leading the stream too: {both}): elected after {election:?}, calls \
         {after_consumer:?} after the election"
    );
    report(
        "3-node cluster: stream leader, then consumer leader killed",
        &t,
        &Extra {
            resume: Some(after_consumer),
            ..Extra::default()
        },
    );
    t.assert_nothing_lost();
    assert!(
        after_consumer <= Duration::from_secs(2),
        "calls resumed {after_consumer:?} after the new consumer leader's election"
    );
}
