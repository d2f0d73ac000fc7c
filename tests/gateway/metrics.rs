//! `/metrics`: the exposition parses as Prometheus text, counts admitted and denied requests with
//! the right labels, observes its histograms, stays on the admin listener, carries no label a
//! client chooses; and the Grafana dashboard in `deploy/grafana/` uses only metrics it exports.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{eventually, hello, Options, TestGateway};

/// One sample of the exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The exposition, parsed strictly: every line a `# HELP`, a `# TYPE` or a sample; every
/// sample's family typed before it, its samples together; label values escaped as the format
/// says; each histogram's buckets cumulative, ending at `+Inf` with its `_count`.
fn parse(text: &str) -> Vec<Sample> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(is_metric_name(name), "{line}");
            assert!(!help.is_empty(), "{line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "twice: {line}"
            );
            if let Some(previous) = current.replace(name.to_string()) {
                finished.insert(previous);
            }
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "unexpected line {line:?}"
        );
        let sample = parse_sample(line);
        let family = family_of(&sample.name, &types);
        assert_eq!(
            current.as_deref(),
            Some(family.as_str()),
            "{line}: not in its family"
        );
        assert!(
            !finished.contains(&family),
            "{line}: its family was already closed"
        );
        match types[&family].as_str() {
            "counter" => assert!(
                sample.name.ends_with("_total") && sample.value >= 0.0,
                "{line}"
            ),
            "histogram" => assert!(sample.name != family, "{line}"),
            _ => assert_eq!(sample.name, family, "{line}"),
        }
        samples.push(sample);
    }
    check_histograms(&samples, &types);
    samples
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn family_of(name: &str, types: &HashMap<String, String>) -> String {
    if types.contains_key(name) {
        return name.to_string();
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| t == "histogram") {
                return base.to_string();
            }
        }
    }
    panic!("{name}: no TYPE before it");
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).expect("a value");
    let name = &line[..name_end];
    assert!(is_metric_name(name), "{line}");
    let rest = &line[name_end..];
    match rest.strip_prefix('{') {
        Some(labels) => parse_labels(line, name, labels),
        None => Sample {
            name: name.to_string(),
            labels: BTreeMap::new(),
            value: parse_value(line, rest.strip_prefix(' ').expect("a space")),
        },
    }
}

/// The labels (`rest` starts at the first one's name), then the value.
fn parse_labels(line: &str, name: &str, mut rest: &str) -> Sample {
    let mut labels = BTreeMap::new();
    loop {
        let eq = rest.find('=').expect("label=");
        let key = &rest[..eq];
        assert!(
            is_metric_name(key) && !key.contains(':'),
            "{line}: label {key}"
        );
        let body = rest[eq + 1..].strip_prefix('"').expect("a quoted value");
        let mut value = String::new();
        let mut chars = body.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => panic!("{line}: bad escape {other:?}"),
                },
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let after = &body[end.expect("a closed label value")..];
        assert!(
            labels.insert(key.to_string(), value).is_none(),
            "{line}: {key} twice"
        );
        if let Some(more) = after.strip_prefix(',') {
            rest = more;
        } else {
            let value = after.strip_prefix("} ").expect("} and the value");
            return Sample {
                name: name.to_string(),
                labels,
                value: parse_value(line, value),
            };
        }
    }
}

fn parse_value(line: &str, value: &str) -> f64 {
    match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().unwrap_or_else(|_| panic!("{line}: value {v:?}")),
    }
}

/// Each histogram series: buckets in rising order of `le`, counts never falling, `+Inf` last and
/// equal to `_count`.
fn check_histograms(samples: &[Sample], types: &HashMap<String, String>) {
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let mut labels = s.labels.clone();
            let le = labels.remove("le").expect("a bucket has le");
            series
                .entry(labels)
                .or_default()
                .push((parse_value(&le, &le), s.value));
        }
        for (labels, buckets) in series {
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{family}{labels:?}: {buckets:?}"
            );
            let (le, inf) = *buckets.last().unwrap();
            assert_eq!(le, f64::INFINITY, "{family}{labels:?}");
            let count = value(samples, &format!("{family}_count"), &labels_ref(&labels));
            assert_eq!(Some(inf), count, "{family}{labels:?}");
        }
    }
}

fn labels_ref(labels: &BTreeMap<String, String>) -> Vec<(&str, &str)> {
    labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The value of the series `name` with exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?}"))
}

/// Every label the exposition may carry, with its values when they are a fixed set.
const LABELS: [(&str, Option<&[&str]>); 7] = [
    (
        "route",
        Some(&[
            "chat_completions",
            "completions",
            "fim_completions",
            "embeddings",
            "responses",
            "other",
        ]),
    ),
    ("status", None),
    ("tier", None),
    (
        "outcome",
        Some(&[
            "admitted",
            "rate_limited",
            "quota_exceeded",
            "too_large",
            "unavailable",
            // tiergate_console_sign_ins_total.
            "signed_in",
            "refused",
            "too_many_attempts",
        ]),
    ),
    ("limit", None),
    ("policy", Some(&["closed", "open", "local"])),
    ("le", None),
];

#[tokio::test]
async fn metrics_count_requests_decisions_tokens_and_latencies_with_bounded_labels() {
    let gw = TestGateway::start_with(Options {
        admin_listener: true,
        ..Options::default()
    })
    .await;
    gw.put_tier(
        "metered",
        json!({"requests_per_second": 1, "burst": 1, "tokens_per_month": 1_000_000}),
    )
    .await;
    let (_, key) = gw.workspace("metered").await;

    // Admitted, settled to 7 + 5 tokens.
    let r = gw.chat(&key, hello(), &[("x-mock-usage", "7,5")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    // The same second: denied by requests_per_second.
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // No key: refused before the workspace is known.
    let r = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A suspended workspace's: refused, its workspace known (it was counted as `(none)`: an
    // outside audit).
    let (suspended, suspended_key) = gw.workspace("metered").await;
    let (s, v) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/workspaces/{suspended}"),
            Some(json!({"status": "suspended"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = gw.chat(&suspended_key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // An embedding, a second later, and a pass-through route.
    gw.advance(Duration::from_secs(1));
    let r = gw
        .post(
            &key,
            "/v1/embeddings",
            json!({"model": "mistral-embed", "input": "one two three"}),
            &[("x-mock-usage", "3,0")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    gw.advance(Duration::from_secs(1));
    let r = gw
        .client
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Only on the admin listener, as Prometheus text 0.0.4.
    let r = gw
        .client
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = gw
        .client
        .get(format!("{}/metrics", gw.admin_url.as_ref().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    let m = parse(&text);

    let requests = |route, status, tier| {
        get(
            &m,
            "tiergate_requests_total",
            &[("route", route), ("status", status), ("tier", tier)],
        )
    };
    assert_eq!(requests("chat_completions", "200", "metered"), 1.0);
    assert_eq!(requests("chat_completions", "429", "metered"), 1.0);
    assert_eq!(requests("chat_completions", "401", "(none)"), 1.0);
    assert_eq!(requests("chat_completions", "403", "metered"), 1.0);
    assert_eq!(requests("embeddings", "200", "metered"), 1.0);
    assert_eq!(requests("other", "200", "metered"), 1.0);
    let total: f64 = m
        .iter()
        .filter(|s| s.name == "tiergate_requests_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(total, 6.0, "every proxied request once");

    let decisions = |outcome, limit| {
        get(
            &m,
            "tiergate_decisions_total",
            &[("outcome", outcome), ("limit", limit)],
        )
    };
    assert_eq!(decisions("admitted", ""), 3.0);
    assert_eq!(decisions("rate_limited", "requests_per_second"), 1.0);
    assert_eq!(decisions("unavailable", ""), 0.0);
    assert_eq!(get(&m, "tiergate_unauthenticated_total", &[]), 1.0);

    // Tokens: settled to the upstream's usage; the reservation error is estimate - settled.
    let chat = [("route", "chat_completions")];
    let settled = get(&m, "tiergate_tokens_settled_total", &chat);
    assert_eq!(settled, 12.0);
    let estimated = get(&m, "tiergate_tokens_estimated_total", &chat);
    assert!(estimated > 0.0);
    assert_eq!(
        get(&m, "tiergate_reservation_error_tokens_count", &chat),
        1.0
    );
    assert_eq!(
        get(&m, "tiergate_reservation_error_tokens_sum", &chat),
        estimated - settled
    );
    let embeddings = [("route", "embeddings")];
    assert_eq!(get(&m, "tiergate_tokens_settled_total", &embeddings), 3.0);
    assert_eq!(
        get(&m, "tiergate_reservation_error_tokens_count", &embeddings),
        1.0
    );
    // A pass-through route reserves nothing and has no estimate to be wrong about.
    assert_eq!(
        value(
            &m,
            "tiergate_reservation_error_tokens_count",
            &[("route", "other")]
        ),
        None
    );

    // Latencies: the upstream's for the three forwarded, the gateway's for all five.
    let count = |name: &str, route| get(&m, name, &[("route", route)]);
    assert_eq!(
        count(
            "tiergate_upstream_latency_seconds_count",
            "chat_completions"
        ),
        1.0
    );
    assert_eq!(
        count("tiergate_upstream_latency_seconds_count", "embeddings"),
        1.0
    );
    assert_eq!(
        count("tiergate_upstream_latency_seconds_count", "other"),
        1.0
    );
    assert_eq!(
        count("tiergate_gateway_latency_seconds_count", "chat_completions"),
        4.0
    );
    assert_eq!(
        count("tiergate_gateway_latency_seconds_count", "embeddings"),
        1.0
    );
    let upstream = count("tiergate_upstream_latency_seconds_sum", "chat_completions");
    let own = count("tiergate_gateway_latency_seconds_sum", "chat_completions");
    assert!(upstream > 0.0 && own > 0.0, "{upstream} {own}");
    // The gateway's own time is measured apart from the upstream's: an upstream 300 ms slow
    // adds to the first, not to the second.
    gw.advance(Duration::from_secs(1));
    let r = gw
        .chat(&key, hello(), &[("x-mock-latency-ms", "300")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let m2 = parse(&gw.metrics().await);
    let upstream_added = get(&m2, "tiergate_upstream_latency_seconds_sum", &chat) - upstream;
    let own_added = get(&m2, "tiergate_gateway_latency_seconds_sum", &chat) - own;
    assert!(upstream_added >= 0.3, "{upstream_added}");
    assert!(own_added < 0.25, "{own_added}");
    // Bucketed: at least one bucket below 300 ms missed it, one above counted it.
    assert_eq!(
        get(
            &m2,
            "tiergate_upstream_latency_seconds_bucket",
            &[("route", "chat_completions"), ("le", "0.25")]
        ),
        get(
            &m,
            "tiergate_upstream_latency_seconds_bucket",
            &[("route", "chat_completions"), ("le", "0.25")]
        )
    );

    // Gauges read at scrape time.
    assert_eq!(get(&m, "tiergate_limiter_backend_up", &[]), 1.0);
    assert!(get(&m, "tiergate_catalog_staleness_seconds", &[]) < 30.0);
    assert!(get(&m, "tiergate_catalog_version", &[]) >= 1.0);
    assert!(get(&m, "tiergate_tracked_workspaces", &[]) >= 1.0);
    let written = || async {
        let m = parse(&gw.metrics().await);
        get(&m, "tiergate_ledger_pending", &[]) == 0.0
            && get(&m, "tiergate_ledger_queue", &[]) == 0.0
            && get(&m, "tiergate_ledger_last_write_age_seconds", &[]) < 1.0
    };
    eventually(Duration::from_secs(10), "the ledger written", written).await;

    // Bounded labels: only the known names (no workspace, key, model or request label), fixed
    // sets where fixed, and nothing a client chose anywhere in the text.
    for s in &m {
        for (label, value) in &s.labels {
            let (_, allowed) = LABELS
                .iter()
                .find(|(name, _)| name == label)
                .unwrap_or_else(|| panic!("label {label} on {}", s.name));
            if let Some(allowed) = allowed {
                assert!(
                    allowed.contains(&value.as_str()),
                    "{}: {label}={value}",
                    s.name
                );
            }
        }
        if let Some(status) = s.labels.get("status") {
            let code: u16 = status.parse().unwrap();
            assert!((100..600).contains(&code), "{status}");
        }
        if let Some(tier) = s.labels.get("tier") {
            assert!(["metered", "(none)"].contains(&tier.as_str()), "{tier}");
        }
    }
    for secret in [
        key.as_str(),
        &key[..12],
        "mistral-small-latest",
        "mistral-embed",
        &request_id,
    ] {
        assert!(!text.contains(secret), "{secret} in /metrics");
    }
}

/// The names of the metrics that the dashboard's queries use.
fn dashboard_metrics(dashboard: &Value, into: &mut BTreeSet<String>) {
    match dashboard {
        Value::Object(map) => {
            for (k, v) in map {
                if let (true, Some(query)) = (k == "expr" || k == "definition", v.as_str()) {
                    let mut rest = query;
                    while let Some(at) = rest.find("tiergate_") {
                        let name: String = rest[at..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        rest = &rest[at + name.len()..];
                        into.insert(name);
                    }
                }
                dashboard_metrics(v, into);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_metrics(v, into)),
        _ => {}
    }
}

#[tokio::test]
async fn the_grafana_dashboard_uses_only_metrics_that_are_exported() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/tiergate.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 10));
    let mut used = BTreeSet::new();
    dashboard_metrics(&dashboard, &mut used);
    assert!(used.len() > 20, "{used:?}");

    // A request of each kind, so that every series the dashboard reads exists.
    let (gw, key) = TestGateway::on_tier(json!({"requests_per_second": 1})).await;
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    assert_eq!(
        gw.chat(&key, hello(), &[]).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let exported: BTreeSet<String> = parse(&gw.metrics().await)
        .into_iter()
        .map(|s| s.name)
        .collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard reads {missing:?}, which /metrics lacks"
    );
}

#[tokio::test]
async fn a_stream_is_counted_when_its_head_is_answered_and_a_client_that_left_as_499() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 100_000})).await;
    let mut body = hello();
    body["stream"] = json!(true);
    let r = gw.chat(&key, body, &[("x-mock-usage", "4,6")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap();
    // Settled once the stream ended, after its answer's head.
    eventually(Duration::from_secs(5), "the stream settled", || async {
        let m = parse(&gw.metrics().await);
        value(
            &m,
            "tiergate_tokens_settled_total",
            &[("route", "chat_completions")],
        ) == Some(10.0)
    })
    .await;
    let m = parse(&gw.metrics().await);
    let chat = [("route", "chat_completions")];
    assert_eq!(
        get(&m, "tiergate_upstream_latency_seconds_count", &chat),
        1.0
    );
    assert_eq!(
        get(&m, "tiergate_gateway_latency_seconds_count", &chat),
        1.0
    );
    assert_eq!(
        get(&m, "tiergate_reservation_error_tokens_count", &chat),
        1.0
    );

    // A client that gives up before the answer's head: 499, and no latency observed.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = impatient
        .post(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(&key)
        .header("x-mock-latency-ms", "3000")
        .json(&json!({"model": "m", "input": "x"}))
        .send()
        .await;
    assert!(r.is_err(), "the client timed out");
    eventually(Duration::from_secs(5), "the 499 counted", || async {
        let m = parse(&gw.metrics().await);
        value(
            &m,
            "tiergate_requests_total",
            &[
                ("route", "embeddings"),
                ("status", "499"),
                ("tier", "test-tier"),
            ],
        ) == Some(1.0)
    })
    .await;
    let m = parse(&gw.metrics().await);
    assert_eq!(
        get(
            &m,
            "tiergate_gateway_latency_seconds_count",
            &[("route", "embeddings")]
        ),
        0.0
    );
}

/// Every metric the README's table lists is in `/metrics` from the start, before anything it
/// counts has happened: `tiergate_shadow_denied_total` was missing until the first shadow
/// denial (an outside audit), so an alert or a dashboard on it found no series.
#[tokio::test]
async fn every_metric_the_readme_lists_is_there_from_the_start() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("\n## Metrics")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Metrics section");
    let listed: Vec<&str> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `tiergate_"))
        .map(|rest| &rest[..rest.find('`').expect("a closing backtick")])
        .collect();
    assert!(listed.len() > 30, "the table was not read: {listed:?}");
    let gw = TestGateway::start().await;
    let text = gw.metrics().await;
    let missing: Vec<_> = listed
        .iter()
        .map(|name| format!("tiergate_{name}"))
        // Its labels (status, tier) are known only from a request, as its row says.
        .filter(|name| name != "tiergate_requests_total")
        .filter(|name| !text.contains(&format!("# TYPE {name} ")))
        .collect();
    assert!(missing.is_empty(), "not in /metrics: {missing:?}");
}
