//! Automatic promotion up the ladder: a tier names the tier above and the conditions to reach
//! it (days since creation, tokens settled over 30 days, attributes the operator's systems
//! set); the gateway promotes a workspace once they all hold, within `promotion_interval_secs`
//! (or at once on an attribute change), upward only, never a pinned one, and records why.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tiergate::config::RawSettings;

use crate::harness::*;

/// A gateway that checks for promotions every second, and the ladder `p-free` → `p-pro`.
async fn ladder() -> TestGateway {
    let gw = TestGateway::start_with(Options {
        raw: RawSettings {
            promotion_interval_secs: Some(1),
            ..RawSettings::default()
        },
        ..Options::default()
    })
    .await;
    gw.put_tier("p-pro", json!({"rank": 101, "tokens_per_minute": 50000}))
        .await;
    gw.put_tier(
        "p-free",
        json!({
            "rank": 100,
            "tokens_per_minute": 1000,
            "promotion": {
                "to": "p-pro",
                "min_days": 7,
                "min_tokens_30d": 10,
                "min_attributes": {"paid_usd": 50, "verified": true}
            }
        }),
    )
    .await;
    gw
}

/// The workspace's tier, once the gateway's catalogue holds it too (the store's row changes
/// first, the catalogue right after).
async fn tier_of(gw: &TestGateway, ws: i64) -> String {
    let started = std::time::Instant::now();
    loop {
        let (s, v) = gw
            .admin(Method::GET, &format!("/workspaces/{ws}"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let tpm = if v["tier"] == "p-pro" { 50000 } else { 1000 };
        if v["limits"]["tokens_per_minute"] == tpm {
            return v["tier"].as_str().unwrap().to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the catalogue does not follow the store: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn set_attributes(gw: &TestGateway, ws: i64, attributes: Value) -> Value {
    let (s, v) = gw
        .admin(
            Method::PUT,
            &format!("/workspaces/{ws}/attributes"),
            Some(attributes),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

/// Sends a chat request with `key` and waits until its tokens are in the ledger.
async fn spend(gw: &TestGateway, key: &str) {
    let r = gw.chat(key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap();
    gw.exact_usage(key).await;
}

fn condition<'a>(next: &'a Value, name: &str) -> &'a Value {
    next["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no condition {name} in {next}"))
}

#[tokio::test]
async fn a_workspace_that_meets_every_condition_is_promoted_and_the_others_are_not() {
    let gw = ladder().await;
    let (meets, meets_key) = gw.workspace("p-free").await;
    let (poor, poor_key) = gw.workspace("p-free").await;
    let (pinned, pinned_key) = gw.workspace("p-free").await;
    let (s, _) = gw
        .admin(
            Method::PATCH,
            &format!("/workspaces/{pinned}"),
            Some(json!({"pinned": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // The workspace sees its next tier, what it gives and which conditions hold, in the API and
    // on its console page.
    let cookie = crate::console::signed_in(&gw, &meets_key).await;
    let page = crate::console::get(&gw, "/console/workspace", Some(&cookie)).await;
    assert!(
        page.body.contains(r#"data-next-tier="p-pro""#),
        "{}",
        page.body
    );
    assert!(page
        .body
        .contains(r#"data-condition="min_days" data-met="false""#));
    assert!(page
        .body
        .contains(r#"data-condition="attributes.verified" data-met="false""#));
    let next = gw.limits(&meets_key).await["next_tier"].clone();
    assert_eq!(next["name"], "p-pro", "{next}");
    assert_eq!(next["automatic"], true);
    assert_eq!(next["limits"]["tokens_per_minute"], 50000);
    assert_eq!(condition(&next, "min_days")["met"], false);
    assert_eq!(condition(&next, "min_days")["actual"], 0.0);
    assert_eq!(
        condition(&next, "attributes.verified")["actual"],
        Value::Null
    );

    for key in [&meets_key, &poor_key, &pinned_key] {
        spend(&gw, key).await;
    }
    // Attributes alone do not promote while a condition (the days) does not hold.
    let v = set_attributes(&gw, meets, json!({"paid_usd": 60, "verified": true})).await;
    assert_eq!(v["tier"], "p-free");
    assert_eq!(v["attributes"], json!({"paid_usd": 60.0, "verified": true}));
    set_attributes(&gw, poor, json!({"paid_usd": 10, "verified": true})).await;
    set_attributes(&gw, pinned, json!({"paid_usd": 500, "verified": true})).await;
    let next = gw.limits(&meets_key).await["next_tier"].clone();
    assert_eq!(condition(&next, "attributes.paid_usd")["met"], true);
    let page = crate::console::get(&gw, "/console/workspace", Some(&cookie)).await;
    assert!(page
        .body
        .contains(r#"data-condition="attributes.verified" data-met="true""#));
    assert_eq!(condition(&next, "min_tokens_30d")["met"], true, "{next}");

    // A week and a day later, the background check promotes the one that qualifies, within
    // its interval (1 s here; the bound allows a busy machine).
    gw.advance(Duration::from_secs(8 * 86_400));
    eventually(Duration::from_secs(15), "the promotion", || async {
        tier_of(&gw, meets).await == "p-pro"
    })
    .await;
    // Its next request has the new tier's limits.
    let r = gw.chat(&meets_key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("50000"));
    // Why, and by whom, is recorded.
    let (_, ws) = gw
        .admin(Method::GET, &format!("/workspaces/{meets}"), None)
        .await;
    assert_eq!(ws["promoted"]["from"], "p-free");
    assert_eq!(ws["promoted"]["to"], "p-pro");
    let reason = ws["promoted"]["reason"].as_str().unwrap();
    assert!(reason.contains("min_days 8 >= 7"), "{reason}");
    assert!(reason.contains("attributes.paid_usd 60 >= 50"), "{reason}");
    let (_, audit) = gw
        .admin(
            Method::GET,
            &format!("/audit?action=workspace.promote&workspace_id={meets}"),
            None,
        )
        .await;
    let entries = audit["data"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(entries[0]["actor"], "promotion");
    assert_eq!(entries[0]["before"]["tier"], "p-free");
    assert_eq!(entries[0]["after"]["tier"], "p-pro");

    // The one short of an attribute and the pinned one stay: an attribute change checks a
    // workspace at once, so this is the same check the background one makes.
    let v = set_attributes(&gw, poor, json!({"paid_usd": 49.5, "verified": true})).await;
    assert_eq!(v["tier"], "p-free");
    let v = set_attributes(&gw, pinned, json!({"paid_usd": 500, "verified": true})).await;
    assert_eq!(v["tier"], "p-free");
    assert_eq!(tier_of(&gw, pinned).await, "p-free");
    let next = gw.limits(&pinned_key).await["next_tier"].clone();
    assert_eq!(next["pinned"], true);
    assert!(next["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["met"] == true));
    // At the top of this ladder, the promoted one has no automatic next step.
    let next = gw.limits(&meets_key).await["next_tier"].clone();
    assert!(next.is_null() || next["automatic"] == false, "{next}");

    // The operator's console shows the promotion and the attributes, pins and releases, and
    // an edit of the tier's limits there keeps its promotion.
    let op = crate::console_operator::Operator::sign_in(&gw.url, ADMIN).await;
    let page = op
        .get(&format!("/console/operator/workspaces/{meets}"))
        .await;
    assert!(
        page.body.contains("Last promoted from p-free to p-pro"),
        "{}",
        page.body
    );
    assert!(page.body.contains(r#"data-attribute="paid_usd""#));
    let pin = format!("/console/operator/workspaces/{poor}/pin");
    assert_eq!(
        op.post(&pin, &[("pinned", "true")]).await.status,
        StatusCode::SEE_OTHER
    );
    let v = set_attributes(&gw, poor, json!({"paid_usd": 50, "verified": true})).await;
    assert_eq!(v["tier"], "p-free", "pinned from the console: {v}");
    assert_eq!(
        op.post(&pin, &[("pinned", "false")]).await.status,
        StatusCode::SEE_OTHER
    );
    let edit = op
        .post(
            "/console/operator/tiers/p-free",
            &[("rank", "100"), ("tokens_per_minute", "2000")],
        )
        .await;
    assert_eq!(edit.status, StatusCode::SEE_OTHER, "{}", edit.body);
    let (_, tiers) = gw.admin(Method::GET, "/tiers", None).await;
    let free = tiers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "p-free")
        .unwrap()
        .clone();
    assert_eq!(free["tokens_per_minute"], 2000);
    assert_eq!(free["promotion"]["to"], "p-pro", "{free}");

    // An attribute change that makes a workspace qualify promotes it at once.
    let v = set_attributes(&gw, poor, json!({"paid_usd": 50, "verified": true})).await;
    assert_eq!(v["tier"], "p-pro", "{v}");
    // Unpinned, the pinned one goes up with the next check.
    let (s, _) = gw
        .admin(
            Method::PATCH,
            &format!("/workspaces/{pinned}"),
            Some(json!({"pinned": false})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    eventually(
        Duration::from_secs(15),
        "the promotion once unpinned",
        || async { tier_of(&gw, pinned).await == "p-pro" },
    )
    .await;
}

#[tokio::test]
async fn promotion_is_upward_only_and_its_input_is_checked() {
    let gw = ladder().await;
    let refused = |body: Value| {
        let gw = &gw;
        async move {
            let (s, v) = gw.admin(Method::PUT, "/tiers/p-odd", Some(body)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
            v["message"].as_str().unwrap().to_string()
        }
    };
    // Down the ladder, to itself, to an unknown tier, or without ranks: refused, naming it.
    let m = refused(json!({"rank": 200, "promotion": {"to": "p-pro"}})).await;
    assert!(
        m.contains("promotion.to") && m.contains("rank above"),
        "{m}"
    );
    let m = refused(json!({"rank": 1, "promotion": {"to": "p-odd"}})).await;
    assert!(m.contains("itself"), "{m}");
    let m = refused(json!({"rank": 1, "promotion": {"to": "nowhere"}})).await;
    assert!(m.contains("unknown tier"), "{m}");
    let m = refused(json!({"promotion": {"to": "p-pro"}})).await;
    assert!(m.contains("rank above"), "{m}");
    let m = refused(json!({"rank": 1, "promotion": {"to": "p-pro", "min_dayz": 3}})).await;
    assert!(m.contains("min_dayz"), "{m}");
    let m = refused(
        json!({"rank": 1, "promotion": {"to": "p-pro", "min_attributes": {"bad name": 1}}}),
    )
    .await;
    assert!(m.contains("bad name"), "{m}");

    // The tier as put is the tier as listed, promotion included.
    let (_, tiers) = gw.admin(Method::GET, "/tiers", None).await;
    let free = tiers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "p-free")
        .unwrap()
        .clone();
    assert_eq!(free["promotion"]["to"], "p-pro");
    assert_eq!(free["promotion"]["min_days"], 7);

    // Attributes are numbers or booleans, under names of a fixed alphabet.
    let (ws, _) = gw.workspace("p-free").await;
    for bad in [
        json!({"plan": "gold"}),
        json!({"bad name": 1}),
        json!({"x": null}),
        json!([1]),
    ] {
        let (s, v) = gw
            .admin(
                Method::PUT,
                &format!("/workspaces/{ws}/attributes"),
                Some(bad.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let (s, _) = gw
        .admin(
            Method::PUT,
            "/workspaces/999999/attributes",
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The target re-ranked below its source: the promotion is skipped, so the limits page no
    // longer promises it (it showed `automatic: true` with every condition met).
    let (_, key) = gw.workspace("p-free").await;
    assert_eq!(gw.limits(&key).await["next_tier"]["automatic"], true);
    gw.put_tier("p-pro", json!({"rank": 99, "tokens_per_minute": 50000}))
        .await;
    let next = gw.limits(&key).await["next_tier"].clone();
    assert_ne!(next["automatic"], true, "{next}");
}

/// Two instances on one database (Postgres when there is one) and one Redis: both run the check,
/// the workspace is promoted once (one audit entry), and both instances give it the new limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_checking_at_once_promote_a_workspace_once() {
    let Some(redis) = crate::support::redis::shared_redis() else {
        return;
    };
    let fleet = TestGateway::fleet(2, &redis, |raw| {
        raw.promotion_interval_secs = Some(1);
    })
    .await;
    let (one, two) = (&fleet[0], &fleet[1]);
    one.put_tier("f-pro", json!({"rank": 201, "tokens_per_minute": 50000}))
        .await;
    one.put_tier(
        "f-free",
        json!({"rank": 200, "tokens_per_minute": 1000,
               "promotion": {"to": "f-pro", "min_tokens_30d": 1, "min_attributes": {"verified": true}}}),
    )
    .await;
    let (ws, key) = one.workspace("f-free").await;
    // Qualified but for its tokens: the attribute change checks it at once and leaves it.
    let (s, v) = one
        .admin(
            Method::PUT,
            &format!("/workspaces/{ws}/attributes"),
            Some(json!({"verified": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["tier"], "f-free");
    // Tokens through the second instance: both instances' checks may see them.
    let r = two.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap();
    for gw in [one, two] {
        eventually(
            std::time::Duration::from_secs(15),
            "the promotion seen on every instance",
            || async {
                let r = gw.chat(&key, hello(), &[]).await;
                header(&r, "x-ratelimit-limit-tokens") == Some("50000")
            },
        )
        .await;
    }
    // Both went on checking for a while: still one promotion.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (_, audit) = one
        .admin(
            Method::GET,
            &format!("/audit?action=workspace.promote&workspace_id={ws}"),
            None,
        )
        .await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 1, "{audit}");
}

/// A promotion clears the increases a workspace was granted that its new tier meets: an
/// approved 3 requests/s kept a workspace promoted to a tier of 5/s at 3 (an outside audit).
/// An increase beyond the new tier, and an operator's restriction, stay.
#[tokio::test]
async fn a_promotion_clears_the_increases_its_new_tier_meets() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "o-pro",
        json!({"rank": 201, "requests_per_second": 5, "tokens_per_minute": 50000}),
    )
    .await;
    gw.put_tier(
        "o-free",
        json!({
            "rank": 200,
            "requests_per_second": 2,
            "tokens_per_minute": 1000,
            "promotion": {"to": "o-pro", "min_attributes": {"paid_usd": 5}}
        }),
    )
    .await;
    let (ws, key) = gw.workspace("o-free").await;
    let overrides = json!({
        "requests_per_second": 3,
        "tokens_per_minute": 100000,
        "concurrent_requests": 2
    });
    let (s, v) = gw
        .admin(
            Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"limits": overrides})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let v = set_attributes(&gw, ws, json!({"paid_usd": 10})).await;
    assert_eq!(v["tier"], "o-pro", "{v}");
    // 3/s was an increase over 2/s that 5/s meets: cleared. 100000 tokens/minute is above what
    // the new tier gives, and the concurrency limit a restriction: both kept.
    assert_eq!(
        v["overrides"],
        json!({"tokens_per_minute": 100000, "concurrent_requests": 2}),
        "{v}"
    );
    assert_eq!(v["limits"]["requests_per_second"], 5.0, "{v}");
    // Enforced: five at once, where the override held it to three.
    let mut admitted = 0;
    for _ in 0..6 {
        if gw.chat(&key, hello(), &[]).await.status() == StatusCode::OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5);
}
