//! Redis for the tests: a private `redis-server` per test ([`RedisServer`]), a Redis Cluster of
//! masters ([`RedisCluster`]), and the shared servers that `.ci/run` starts ([`shared_redis`],
//! [`cluster_seeds`]).
//!
//! # Design
//!
//! - **Synchronous.** Processes and `redis-cli`, no Redis client crate, so the helpers work from
//!   `#[test]` and `#[tokio::test]` alike. They block the calling thread: a server starts in a
//!   few milliseconds, a cluster in about 2 s. On a current-thread runtime that also serves a
//!   gateway, start Redis first or from `tokio::task::spawn_blocking`.
//! - **No server outlives the test process.** Dropping a [`RedisServer`] or [`RedisCluster`] kills
//!   it, also when the test panics. Every `redis-server` is started with
//!   `PR_SET_PDEATHSIG = SIGKILL`, so it dies with the test process even when that process is
//!   killed. The kernel sends that signal when the *thread* that spawned the child exits, and
//!   libtest runs each test on a thread of its own, so servers are spawned by one thread that
//!   lives as long as the process. The process-wide cluster of [`cluster_seeds`] is killed, and
//!   its files removed, when the process exits. The temp dirs of a test process that was killed
//!   are removed by the next one.
//! - **Ports** are random, below the kernel's ephemeral range, checked free by binding them, and
//!   drawn again when `redis-server` still finds one taken. Outgoing connections take their local
//!   ports from the ephemeral range, so a port freed by [`RedisServer::kill`] is still free for
//!   [`RedisServer::restart`].
//! - **Shared servers.** [`shared_redis`] is the server every machine of this project runs (and
//!   `.ci/run` starts when it is down). Tests on it must use keys of their own and never flush
//!   it. Without it a test is skipped with a loud line, except in CI (`CI` set), where it fails:
//!   CI never passes by skipping.
//! - **Coarse timeouts** (20 s to start); a panic shows the servers' logs.

#![allow(dead_code)] // Each test binary uses a part of this module.

use std::fs::{self, File};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, Once, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The shared server's URL; default [`DEFAULT_SHARED_REDIS`].
pub const SHARED_REDIS_ENV: &str = "TIERGATE_TEST_REDIS";
pub const DEFAULT_SHARED_REDIS: &str = "redis://127.0.0.1:6379";
/// Comma-separated seed URLs of a running cluster (`.ci/run` sets it).
pub const CLUSTER_ENV: &str = "TIERGATE_TEST_REDIS_CLUSTER";

const START_TIMEOUT: Duration = Duration::from_secs(20);
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(2);
const PORT_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);
const PORT_ATTEMPTS: usize = 5;
const LOWEST_PORT: u16 = 15000;
/// Temp dirs are `tiergate-redis-PID-XXXXXX`, PID being the test process's.
const DIR_PREFIX: &str = "tiergate-redis-";
const LOG_FILE: &str = "redis.log";
const CLUSTER_CONFIG_FILE: &str = "nodes.conf";
const CLUSTER_SLOTS: &str = "16384";

/// A private `redis-server` on 127.0.0.1, with no persistence and a temp dir of its own.
/// Dropping it kills it.
pub struct RedisServer {
    port: u16,
    cluster_port: Option<u16>,
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    /// An empty server on a free loopback port, answering PING.
    pub fn start() -> RedisServer {
        Self::start_node(false)
    }

    fn start_node(cluster: bool) -> RedisServer {
        remove_dirs_of_dead_processes();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("a temp dir for redis-server");
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let cluster_port = cluster.then(free_port);
            match launch(dir.path(), port, cluster_port) {
                Ok(child) => {
                    return RedisServer {
                        port,
                        cluster_port,
                        child: Some(child),
                        dir,
                    }
                }
                Err(Launch::PortTaken(log)) => last_log = log,
                Err(Launch::Failed(why)) => panic!("{why}"),
            }
        }
        panic!("redis-server found its port taken {PORT_ATTEMPTS} times; last log:\n{last_log}")
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` to the running server (`SIGSTOP`: it stops answering, its connections
    /// held open, as a stalled host; `SIGCONT`: it goes on with what it was sent meanwhile).
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid().expect("the server runs") as libc::pid_t;
        // SAFETY: kill(2) with the pid of a child this process started and has not reaped.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "kill({pid}, {signal})");
    }

    /// Kills the server (SIGKILL: no goodbye to clients) and returns once it has exited and its
    /// port can be bound again. Does nothing more when it is already down.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            reap(child);
        }
        let ports = [Some(self.port), self.cluster_port];
        let deadline = Instant::now() + PORT_RELEASE_TIMEOUT;
        for port in ports.into_iter().flatten() {
            while TcpListener::bind(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "port {port} still taken {PORT_RELEASE_TIMEOUT:?} after redis-server was killed"
                );
                thread::sleep(POLL);
            }
        }
    }

    /// Kills the server if it runs, then starts a fresh, empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + PORT_RELEASE_TIMEOUT;
        loop {
            match launch(self.dir.path(), self.port, self.cluster_port) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(Launch::PortTaken(_)) if Instant::now() < deadline => thread::sleep(POLL),
                Err(Launch::PortTaken(log)) => panic!(
                    "cannot restart redis-server: another process took port {}:\n{log}",
                    self.port
                ),
                Err(Launch::Failed(why)) => panic!("{why}"),
            }
        }
    }

    /// Empties the current database.
    pub fn flushdb(&self) {
        let answer = self.cli(&["FLUSHDB"]);
        assert_eq!(answer, "OK", "FLUSHDB on {}", self.url());
    }

    /// Whether this server runs and answers PING.
    pub fn is_up(&self) -> bool {
        self.child.is_some() && ping(&self.url())
    }

    /// Runs `redis-cli` against this server; see [`redis_cli`].
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(&self.url(), args)
    }

    /// The server's own temp dir (its log, a cluster node's config), removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server has logged since it was last started.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join(LOG_FILE)).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            reap(child);
        }
    }
}

/// A Redis Cluster of masters only, each a [`RedisServer`] with cluster mode on. Dropping it
/// kills every node.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `masters` (at least 3) nodes sharing the 16384 slots, created with
    /// `redis-cli --cluster create`; returns once every node reports `cluster_state:ok` with all
    /// slots covered and knows every other node.
    pub fn start(masters: usize) -> RedisCluster {
        assert!(
            masters >= 3,
            "a Redis Cluster needs at least 3 masters, not {masters}"
        );
        let cluster = RedisCluster {
            nodes: (0..masters)
                .map(|_| RedisServer::start_node(true))
                .collect(),
        };
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        create.args(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port)),
        );
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        if let Err(why) = run(create, START_TIMEOUT) {
            panic!("creating the cluster failed: {why}\n{}", cluster.logs());
        }
        cluster.wait_until_healthy();
        cluster
    }

    fn wait_until_healthy(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let known = self.nodes.len().to_string();
        loop {
            let infos: Vec<_> = self
                .nodes
                .iter()
                .map(|node| try_redis_cli(&node.url(), &["CLUSTER", "INFO"], PING_TIMEOUT))
                .collect();
            let healthy = infos.iter().all(|info| {
                info.as_deref().is_ok_and(|info| {
                    info_field(info, "cluster_state") == Some("ok")
                        && info_field(info, "cluster_slots_ok") == Some(CLUSTER_SLOTS)
                        && info_field(info, "cluster_known_nodes") == Some(known.as_str())
                })
            });
            if healthy {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the cluster {} was not healthy within {START_TIMEOUT:?}: CLUSTER INFO \
                     {infos:#?}\n{}",
                    self.seeds(),
                    self.logs()
                );
            }
            thread::sleep(POLL * 5);
        }
    }

    /// `redis://127.0.0.1:P1,redis://127.0.0.1:P2,...`
    pub fn seeds(&self) -> String {
        let urls: Vec<_> = self.nodes.iter().map(RedisServer::url).collect();
        urls.join(",")
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Every node's log, for panic messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("--- log of node {}:\n{}", node.url(), node.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The shared Redis (`TIERGATE_TEST_REDIS`, default `redis://127.0.0.1:6379`) if it answers PING.
/// Otherwise: in CI (`CI` set, and not `0` or `false`) a panic, so a missing server fails the
/// tests; elsewhere `None` and a loud SKIP line on stderr: `let Some(url) = shared_redis() else
/// { return };`. Never flush it: other tests and processes use it at the same time.
pub fn shared_redis() -> Option<String> {
    let url = env_var(SHARED_REDIS_ENV).unwrap_or_else(|| DEFAULT_SHARED_REDIS.to_owned());
    let why = match try_redis_cli(&url, &["PING"], PING_TIMEOUT) {
        Ok(answer) if answer == "PONG" => return Some(url),
        Ok(answer) => format!("it answered {answer:?} to PING"),
        Err(error) => error,
    };
    if in_ci() {
        panic!(
            "CI needs the shared Redis at {url}, which does not answer: {why}. .ci/run starts it \
             on 127.0.0.1:6379; {SHARED_REDIS_ENV} names another."
        );
    }
    eprintln!(
        "\n*** SKIP {}: no shared Redis at {url} ({why}). Start redis-server on 127.0.0.1:6379 or \
         set {SHARED_REDIS_ENV}; in CI this is a failure. ***\n",
        current_test()
    );
    None
}

/// Seeds of a 3-master Redis Cluster, `redis://127.0.0.1:P1,...`: `TIERGATE_TEST_REDIS_CLUSTER`
/// when set (`.ci/run` starts that cluster; its nodes are checked once), else a cluster started
/// on the first call and kept for the life of the test process. Tests share it: use keys of
/// your own.
pub fn cluster_seeds() -> String {
    static SEEDS: OnceLock<String> = OnceLock::new();
    SEEDS
        .get_or_init(|| match env_var(CLUSTER_ENV) {
            Some(seeds) => {
                check_cluster(&seeds);
                seeds
            }
            None => start_process_cluster(),
        })
        .clone()
}

fn check_cluster(seeds: &str) {
    for seed in seeds.split(',').map(str::trim) {
        let info = try_redis_cli(seed, &["CLUSTER", "INFO"], PING_TIMEOUT);
        let state = info
            .as_deref()
            .map(|info| info_field(info, "cluster_state"));
        assert!(
            state == Ok(Some("ok")),
            "{CLUSTER_ENV}={seeds}: {seed} is not a node of a healthy cluster ({info:?}); \
             .ci/run starts one with .ci/redis-cluster.sh"
        );
    }
}

static PROCESS_CLUSTER: Mutex<Option<RedisCluster>> = Mutex::new(None);

fn start_process_cluster() -> String {
    let cluster = RedisCluster::start(3);
    let seeds = cluster.seeds();
    *PROCESS_CLUSTER
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(cluster);
    // Statics are never dropped; this kills the nodes and removes their temp dirs when the
    // process exits normally (PR_SET_PDEATHSIG kills them in any case).
    extern "C" fn stop_process_cluster() {
        if let Ok(mut cluster) = PROCESS_CLUSTER.try_lock() {
            drop(cluster.take());
        }
    }
    // SAFETY: registers a function that takes no argument and cannot unwind (dropping the
    // cluster ignores every error).
    unsafe {
        libc::atexit(stop_process_cluster);
    }
    seeds
}

/// Runs `redis-cli -u URL ARGS...` (10 s at most) and returns its output without the final
/// newline; panics when it cannot connect, fails or hangs. Options go before the command, e.g.
/// `["-c", "SET", "{ws}:k", "v"]` to follow cluster redirections. A nil reply reads as `""`;
/// an error reply is returned as its text (`ERR ...`).
pub fn redis_cli(url: &str, args: &[&str]) -> String {
    try_redis_cli(url, args, CLI_TIMEOUT).unwrap_or_else(|error| panic!("{error}"))
}

fn try_redis_cli(url: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut command = Command::new("redis-cli");
    command.arg("-u").arg(url).args(args);
    run(command, timeout)
}

fn ping(url: &str) -> bool {
    try_redis_cli(url, &["PING"], PING_TIMEOUT).is_ok_and(|answer| answer == "PONG")
}

/// A `field:value` line of `INFO` or `CLUSTER INFO`.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(field)?.strip_prefix(':'))
}

enum Launch {
    /// The port (or cluster bus port) was taken: try others. Holds the log.
    PortTaken(String),
    Failed(String),
}

/// Starts `redis-server` in `dir` and waits until it answers PING.
fn launch(dir: &Path, port: u16, cluster_port: Option<u16>) -> Result<Child, Launch> {
    // A fresh server: a cluster node must not come back as the node it was.
    let _ = fs::remove_file(dir.join(CLUSTER_CONFIG_FILE));
    let log_path = dir.join(LOG_FILE);
    let log = File::create(&log_path)
        .and_then(|log| Ok((log.try_clone()?, log)))
        .map_err(|e| Launch::Failed(format!("cannot create {}: {e}", log_path.display())))?;
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir);
    if let Some(cluster_port) = cluster_port {
        command
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", CLUSTER_CONFIG_FILE])
            .args(["--cluster-port", &cluster_port.to_string()]);
    }
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.0)
        .stderr(log.1);
    let mut child = spawn_for_life(command).map_err(|e| {
        Launch::Failed(format!(
            "cannot run redis-server (is Redis installed?): {e}"
        ))
    })?;
    let url = format!("redis://127.0.0.1:{port}");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            return Err(if log.contains("Address already in use") {
                Launch::PortTaken(log)
            } else {
                Launch::Failed(format!(
                    "redis-server on port {port} exited at start ({status}); its log:\n{log}"
                ))
            });
        }
        if ping(&url) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            reap(child);
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            return Err(Launch::Failed(format!(
                "redis-server on port {port} did not answer PING within {START_TIMEOUT:?}; its \
                 log:\n{log}"
            )));
        }
        thread::sleep(POLL);
    }
}

/// A test process that was killed could not remove its servers' temp dirs (its servers died
/// with it): the first server of each process removes them.
fn remove_dirs_of_dead_processes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|name| name.strip_prefix(DIR_PREFIX)?.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    });
}

fn reap(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from a thread that lives as long as the process, with
/// [`die_with_parent`]: the child dies with the process and only with it.
fn spawn_for_life(mut command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    die_with_parent(&mut command);
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, received) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("redis-spawner".to_owned())
            .spawn(move || {
                for (mut command, reply) in received {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("a thread to spawn redis-server");
        Mutex::new(requests)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send((command, reply))
        .expect("the spawner thread runs");
    answer.recv().expect("the spawner thread answers")
}

/// SIGKILL the child when the thread that spawns it exits (see the module documentation).
fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure only calls prctl and getppid, which are
    // async-signal-safe, and builds errors without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: no signal would ever come.
            if u32::try_from(libc::getppid()) != Ok(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Runs a short-lived command, killing it after `timeout`; its trimmed stdout when it succeeds.
fn run(mut command: Command, timeout: Duration) -> Result<String, String> {
    let what = format!("{command:?}");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut command);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
            _ => {
                reap(child);
                return Err(format!("{what} did not finish within {timeout:?}"));
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if status.success() {
        Ok(stdout.trim_end_matches('\n').to_owned())
    } else {
        let output = format!("{stdout}{stderr}");
        Err(format!("{what} failed ({status}): {}", output.trim()))
    }
}

fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// A loopback port that can be bound now and has not been handed out by this process before,
/// drawn at random below the ephemeral range.
fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let ceiling = ephemeral_ports_start().max(LOWEST_PORT + 1000);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    for attempt in 0..1000_u64 {
        let random = RandomState::new().hash_one(attempt);
        let port = LOWEST_PORT + (random % u64::from(ceiling - LOWEST_PORT)) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    panic!("no free loopback port between {LOWEST_PORT} and {ceiling}")
}

fn ephemeral_ports_start() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

fn in_ci() -> bool {
    env_var("CI").is_some_and(|value| !matches!(value.trim(), "0" | "false"))
}

fn current_test() -> String {
    thread::current().name().unwrap_or("a test").to_owned()
}
