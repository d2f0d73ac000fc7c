//! Self-tests of `tests/support/redis.rs`: private servers, clusters, the shared servers, and
//! that no `redis-server` outlives the test process.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use std::{fs, thread};

use support::redis::{cluster_seeds, redis_cli, shared_redis, RedisCluster, RedisServer};

#[tokio::test]
async fn a_private_server_restarts_empty_on_the_same_port() {
    let mut server = RedisServer::start();
    let port = server.port();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert!(server.is_up());
    assert_eq!(server.cli(&["SET", "k", "v"]), "OK");
    assert_eq!(server.cli(&["GET", "k"]), "v");

    server.kill();
    assert!(!server.is_up());
    assert_eq!(server.pid(), None);
    server.kill(); // Already down: nothing to do.

    server.restart();
    assert!(server.is_up());
    assert_eq!(server.port(), port);
    assert_eq!(server.cli(&["GET", "k"]), "", "a restarted server is empty");

    server.cli(&["SET", "k", "v"]);
    server.flushdb();
    assert_eq!(server.cli(&["DBSIZE"]), "0");
    server.restart(); // From up, too.
    assert!(server.is_up());
    assert_eq!(server.port(), port);
}

#[test]
fn a_cluster_spreads_hash_tags_over_its_masters() {
    let cluster = RedisCluster::start(3);
    let ports = cluster.ports();
    let seeds: Vec<_> = ports
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}"))
        .collect();
    assert_eq!(cluster.seeds(), seeds.join(","));
    for seed in &seeds {
        let info = redis_cli(seed, &["CLUSTER", "INFO"]);
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_slots_ok:16384"), "{info}");
    }

    // Two keys per hash tag, written through one seed, following redirections.
    for tag in 0..12 {
        for key in ["a", "b"] {
            let set = redis_cli(
                &seeds[0],
                &["-c", "SET", &format!("{{ws:{tag}}}:{key}"), "1"],
            );
            assert_eq!(set, "OK");
        }
    }
    let holders: Vec<Vec<String>> = cluster
        .nodes()
        .iter()
        .map(|node| {
            let keys = node.cli(&["KEYS", "*"]);
            keys.lines().map(str::to_owned).collect()
        })
        .collect();
    assert!(
        holders.iter().all(|keys| !keys.is_empty()),
        "every master holds some of the tags: {holders:?}"
    );
    for tag in 0..12 {
        let together = holders.iter().filter(|keys| {
            keys.contains(&format!("{{ws:{tag}}}:a")) && keys.contains(&format!("{{ws:{tag}}}:b"))
        });
        assert_eq!(
            together.count(),
            1,
            "the keys of {{ws:{tag}}} on one node: {holders:?}"
        );
    }
}

#[test]
fn the_shared_servers_answer() {
    if let Some(url) = shared_redis() {
        assert_eq!(redis_cli(&url, &["PING"]), "PONG");
    }
    let seeds = cluster_seeds();
    assert_eq!(seeds, cluster_seeds(), "one cluster per process");
    let seeds: Vec<_> = seeds.split(',').collect();
    assert_eq!(seeds.len(), 3, "{seeds:?}");
    let info = redis_cli(seeds[1], &["CLUSTER", "INFO"]);
    assert!(info.contains("cluster_state:ok"), "{info}");
}

#[test]
fn a_server_outlives_the_thread_that_started_it() {
    let server = thread::spawn(RedisServer::start).join().unwrap();
    thread::sleep(Duration::from_millis(200));
    assert!(server.is_up());
    let (pid, url) = (server.pid().unwrap(), server.url());
    drop(server);
    assert!(!is_running(pid));
    assert!(redis_cli_fails(&url));
}

const CHILD_ENV: &str = "TIERGATE_REDIS_SUPPORT_CHILD";

/// Runs this binary's `child_holds_a_server_until_killed`, kills it with SIGKILL, and checks that
/// its server died with it.
#[test]
fn servers_die_with_a_killed_test_process() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_holds_a_server_until_killed",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .find(|line| line.starts_with("redis-server "))
        .expect("the child started a server");
    let mut words = line.split_whitespace().skip(1);
    let pid: u32 = words.next().unwrap().parse().unwrap();
    let url = words.next().unwrap().to_owned();
    let dir = words.next().unwrap().to_owned();
    assert!(is_running(pid));

    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_running(pid) {
        assert!(
            Instant::now() < deadline,
            "redis-server {pid} outlived its test process"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(redis_cli_fails(&url));
    // Removed by the next test process otherwise; this one is done with it.
    fs::remove_dir_all(dir).unwrap();
}

/// Only does something when run by `servers_die_with_a_killed_test_process`.
#[test]
fn child_holds_a_server_until_killed() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let server = RedisServer::start();
    let (pid, url, dir) = (server.pid().unwrap(), server.url(), server.dir().display());
    println!("redis-server {pid} {url} {dir}");
    thread::sleep(Duration::from_secs(60));
}

/// Whether `pid` runs (a zombie waiting for its parent to reap it does not).
fn is_running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        !state.is_some_and(|state| state.starts_with(['Z', 'X']))
    })
}

fn redis_cli_fails(url: &str) -> bool {
    let status = Command::new("redis-cli")
        .args(["-u", url, "PING"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    !status.success()
}
