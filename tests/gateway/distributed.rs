//! Several gateways sharing one set of limits (the Redis limiter). For now: the Redis servers
//! those tests use are there, as `tests/support/redis.rs` finds them.

use crate::support::redis::{cluster_seeds, redis_cli, shared_redis};

#[tokio::test]
async fn the_redis_servers_for_several_instances_answer() {
    if let Some(url) = shared_redis() {
        assert_eq!(redis_cli(&url, &["PING"]), "PONG");
    }
    // Blocks while a cluster starts (outside CI): nothing else runs on this test's runtime.
    let seeds = cluster_seeds();
    for seed in seeds.split(',') {
        let info = redis_cli(seed, &["CLUSTER", "INFO"]);
        assert!(info.contains("cluster_state:ok"), "{seed}: {info}");
    }
}
