//! A three-node JetStream cluster (routes on 127.0.0.1): the stream leader dies mid-run and
//! the worker waits out the election without spinning and without losing a message.

use std::collections::HashSet;
use std::time::Duration;

use queue_worker::dev::natsd::{free_port, NatsServer};
use queue_worker::message::publish::{publish, Submission};

use crate::support::{FakeGateway, Step};

struct Cluster {
    nodes: Vec<NatsServer>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
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
                    .unwrap()
            })
            .collect();
        Cluster { nodes, _dir: dir }
    }

    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_stream_leader_loses_nothing() {
    crate::support::init_logs();
    let mut cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let gateway = FakeGateway::start().await;
    gateway.script(
        "work",
        vec![Step::status(200).delay(Duration::from_millis(10))],
    );
    let pairs = vec![
        ("nats_url".to_string(), cluster.urls()),
        ("gateway_url".to_string(), gateway.url()),
        ("metrics_port".to_string(), "0".to_string()),
        ("nats_stream_replicas".to_string(), "3".to_string()),
        ("max_inflight".to_string(), "8".to_string()),
        ("ack_wait".to_string(), "2s".to_string()),
    ];
    let config = queue_worker::config::Config::load(
        &queue_worker::config::Sources::from_pairs(pairs).unwrap(),
    )
    .unwrap();

    // The cluster needs a moment to elect a meta leader before the stream can be made.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ids = loop {
        match publish(
            &config,
            &Submission {
                function: "work".into(),
                ..Default::default()
            },
            300,
        )
        .await
        {
            Ok(ids) => break ids,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("cluster not ready yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("cluster never became ready: {e:#}"),
        }
    };
    let worker = queue_worker::worker::start(config.clone()).await.unwrap();
    gateway
        .wait_for("50 calls", Duration::from_secs(30), |g| {
            g.calls().len() >= 50
        })
        .await;

    let addrs: Vec<async_nats::ServerAddr> = cluster
        .nodes
        .iter()
        .map(|n| n.url().parse().unwrap())
        .collect();
    let client = async_nats::connect(addrs).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("OF_faas-request").await.unwrap();
    let leader = stream
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("a stream leader");
    let index: usize = leader.trim_start_matches('n').parse().unwrap();
    tokio::task::block_in_place(|| cluster.nodes[index].kill());

    gateway
        .wait_for(
            "every message after the failover",
            Duration::from_secs(90),
            |g| {
                let seen: HashSet<String> = g.calls().iter().map(|c| c.call_id()).collect();
                ids.iter().all(|id| seen.contains(id))
            },
        )
        .await;
    // And the queue empties: every message acknowledged on the new leader.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let c = stream.consumer_info("faas-workers").await;
        if let Ok(c) = c {
            if c.num_pending == 0 && c.num_ack_pending == 0 {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the queue did not drain after the failover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::support::stop(worker).await;
}
