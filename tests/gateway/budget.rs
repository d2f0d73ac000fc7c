//! A workspace's own monthly budget (`PUT /v1/budget`): a cap below its limits, for the whole
//! workspace or per model, enforced as the month limits are (a denial takes nothing) and named
//! in the `429` (`workspace_budget`, `model_budget`); a cap above the limits is refused.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::*;

async fn put_budget(gw: &TestGateway, key: &str, budget: Value) -> (StatusCode, Value) {
    let r = gw
        .client
        .put(format!("{}/v1/budget", gw.url))
        .bearer_auth(key)
        .json(&budget)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

fn large() -> Value {
    let mut body = hello();
    body["model"] = json!("mistral-large-latest");
    body
}

/// Sends `body` until the gateway refuses it (at most 50 times); the admitted count and the
/// refusal.
async fn until_refused(gw: &TestGateway, key: &str, body: Value) -> (usize, reqwest::Response) {
    for admitted in 0..50 {
        let r = gw.chat(key, body.clone(), &[]).await;
        if r.status() != StatusCode::OK {
            return (admitted, r);
        }
        r.text().await.unwrap();
    }
    panic!("never refused");
}

#[tokio::test]
async fn a_budget_below_the_limit_is_enforced_and_named_and_one_above_is_refused() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "b-tier",
        json!({"tokens_per_minute": 1000000, "tokens_per_month": 100000,
               "models": {"mistral-large-latest": {"tokens_per_month": 5000}}}),
    )
    .await;
    let (ws, key) = gw.workspace("b-tier").await;

    // Over the limits: refused, naming the field; nothing set.
    let (s, e) = put_budget(&gw, &key, json!({"tokens_per_month": 100001})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("tokens_per_month"),
        "{e}"
    );
    let (s, e) = put_budget(&gw, &key, json!({"models": {"mistral-large-latest": 5001}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("models.mistral-large-latest"),
        "{e}"
    );
    for bad in [
        json!({"tokens_per_month": 0}),
        json!({"tokens_per_month": -1}),
        json!({"limit": 5}),
    ] {
        let (s, e) = put_budget(&gw, &key, bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {e}");
    }
    let got = gw
        .client
        .get(format!("{}/v1/budget", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(
        got.json::<Value>().await.unwrap(),
        json!({"models": {}, "tokens_per_month": null})
    );

    // Under: a budget of 100 tokens a month binds before the tier's 100,000.
    let (s, b) = put_budget(&gw, &key, json!({"tokens_per_month": 100})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, json!({"models": {}, "tokens_per_month": 100}));
    let (admitted, refused) = until_refused(&gw, &key, hello()).await;
    assert!(admitted >= 1, "requests under the budget pass");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "x-should-retry"), Some("false"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["type"], "quota_exceeded", "{body}");
    assert_eq!(body["code"], "workspace_budget", "{body}");
    assert_eq!(body["error"]["code"], "workspace_budget");
    // The denial took nothing: the month's tokens are what the admitted requests used.
    let used = gw.settled_month_tokens(&key).await;
    let again = gw.chat(&key, hello(), &[]).await;
    assert_eq!(again.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(gw.settled_month_tokens(&key).await, used);
    assert!(used <= 100, "{used}");

    // Cleared: the tier's limits again.
    let (s, b) = put_budget(&gw, &key, json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["tokens_per_month"], Value::Null);
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);

    // Per model: that model is capped, others are not.
    let (s, _) = put_budget(&gw, &key, json!({"models": {"mistral-large-latest": 60}})).await;
    assert_eq!(s, StatusCode::OK);
    let (_, refused) = until_refused(&gw, &key, large()).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        (body["type"].as_str(), body["code"].as_str()),
        (Some("quota_exceeded"), Some("model_budget")),
        "{body}"
    );
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    // Counted under the codes the answers gave, never as the quotas' (a dashboard could not
    // tell a workspace's own cap from its quota running out).
    let text = gw.metrics().await;
    for budget in ["workspace_budget", "model_budget"] {
        assert!(
            text.contains(&format!(
                "tiergate_decisions_total{{outcome=\"quota_exceeded\",limit=\"{budget}\"}}"
            )),
            "{budget}: {text}"
        );
    }
    assert!(
        !text.contains(
            "tiergate_decisions_total{outcome=\"quota_exceeded\",limit=\"tokens_per_month\"}"
        ),
        "a budget counted as the quota"
    );

    // Who set it is in the audit log: the workspace itself.
    let (_, audit) = gw
        .admin(
            Method::GET,
            &format!("/audit?workspace_id={ws}&action=workspace.update"),
            None,
        )
        .await;
    assert!(
        audit["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == format!("workspace:{ws}")),
        "{audit}"
    );
    assert_eq!(
        audit["data"][0]["after"]["budget"]["models"]["mistral-large-latest"],
        60
    );
    // The operator sees it in the admin API.
    let (_, shown) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}"), None)
        .await;
    assert_eq!(
        shown["budget"]["models"]["mistral-large-latest"], 60,
        "{shown}"
    );
}

#[tokio::test]
async fn on_a_tier_without_a_month_quota_any_budget_up_to_the_month_bound_is_allowed() {
    let gw = TestGateway::start().await;
    gw.put_tier("open", json!({"tokens_per_minute": 1000000}))
        .await;
    let (_, key) = gw.workspace("open").await;
    // Past 10^15, the bound of every month limit (kept exact in the Redis script), refused.
    for budget in [
        json!({"tokens_per_month": 1_000_000_000_000_001u64}),
        json!({"models": {"m": u64::MAX}}),
    ] {
        let (s, b) = put_budget(&gw, &key, budget.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{budget}: {b}");
        assert!(
            b["message"]
                .as_str()
                .unwrap()
                .contains("must be at most 1000000000000000"),
            "{b}"
        );
    }
    let (s, b) = put_budget(
        &gw,
        &key,
        json!({"tokens_per_month": 1_000_000_000_000_000u64}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = put_budget(&gw, &key, json!({"tokens_per_month": 1_000_000_000_000u64})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    // /v1/limits shows the budget as the workspace's month limit now.
    let limits = gw.limits(&key).await;
    assert_eq!(limits["limits"]["tokens_per_month"], 1_000_000_000_000u64);
}

#[tokio::test]
async fn the_console_sets_the_workspaces_budget() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "c-tier",
        json!({"tokens_per_minute": 1000000, "tokens_per_month": 100000}),
    )
    .await;
    let (_, key) = gw.workspace("c-tier").await;
    let (s, _) = put_budget(&gw, &key, json!({"models": {"mistral-large-latest": 70}})).await;
    assert_eq!(s, StatusCode::OK);
    let cookie = crate::console::signed_in(&gw, &key).await;
    let page = crate::console::get(&gw, "/console/workspace", Some(&cookie)).await;
    assert!(page.body.contains(r#"id="budget""#));
    assert!(
        !page.body.contains("budget-binds"),
        "no budget of its own yet"
    );
    assert!(
        page.body.contains("mistral-large-latest 70"),
        "{}",
        page.body
    );
    let csrf = page.csrf();
    let post = |fields: Vec<(&'static str, String)>| {
        let gw = &gw;
        let cookie = cookie.clone();
        async move {
            crate::console::Page::of(
                crate::console::browser()
                    .post(format!("{}/console/budget", gw.url))
                    .header("cookie", cookie)
                    .form(&fields)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    // Above the quota: the page again, with why; nothing set.
    let over = post(vec![
        ("csrf", csrf.clone()),
        ("tokens_per_month", "100001".into()),
    ])
    .await;
    assert_eq!(over.status, StatusCode::BAD_REQUEST);
    assert!(over.body.contains("tokens_per_month"), "{}", over.body);
    // The figure comes back as typed.
    assert!(
        over.body
            .contains(r#"name="tokens_per_month" value="100001""#),
        "{}",
        over.body
    );
    // Without the form token: refused.
    let forged = post(vec![("tokens_per_month", "5".into())]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let got: Value = gw
        .client
        .get(format!("{}/v1/budget", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["tokens_per_month"], Value::Null);

    let saved = post(vec![
        ("csrf", csrf.clone()),
        ("tokens_per_month", "40".into()),
    ])
    .await;
    assert!(
        saved.redirects_to("/console/workspace?done=budget"),
        "{} {}",
        saved.status,
        saved.body
    );
    let got: Value = gw
        .client
        .get(format!("{}/v1/budget", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        got,
        json!({"tokens_per_month": 40, "models": {"mistral-large-latest": 70}})
    );
    // The page it returns to says the budget was saved, and that it is now the month's limit.
    let page = crate::console::get(&gw, "/console/workspace?done=budget", Some(&cookie)).await;
    assert!(
        page.body.contains("Your budget was saved."),
        "{}",
        page.body
    );
    assert!(
        page.body
            .contains(r#"of 40 tokens used <span class="budget-binds">(your own budget)</span>"#),
        "{}",
        page.body
    );
    let (_, refused) = until_refused(&gw, &key, hello()).await;
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "workspace_budget", "{body}");
}

/// A budget equal to the quota does not bind: a denial names the quota (`tokens_per_month`),
/// since raising or clearing the budget would not help. It said `workspace_budget`, advising
/// just that (an outside audit).
#[tokio::test]
async fn a_budget_equal_to_the_quota_leaves_the_quota_named() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "even",
        json!({"tokens_per_minute": 1000000, "tokens_per_month": 100}),
    )
    .await;
    let (_, key) = gw.workspace("even").await;
    let (s, b) = put_budget(&gw, &key, json!({"tokens_per_month": 100})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (_, refused) = until_refused(&gw, &key, hello()).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "tokens_per_month", "{body}");
}

/// A request whose prompt alone is over the workspace's budget (or its model's) is
/// `request_too_large` under the budget's code, and counted so: `outcome="too_large"` with the
/// budget's code, never `quota_exceeded` (an outside audit: a dashboard summing `too_large`
/// missed them).
#[tokio::test]
async fn a_request_too_large_for_a_budget_is_counted_as_too_large_under_the_budget() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "roomy",
        json!({"tokens_per_minute": 1000000, "tokens_per_month": 1000000}),
    )
    .await;
    let (_, key) = gw.workspace("roomy").await;
    let long = json!({
        "model": "mistral-large-latest",
        "messages": [{"role": "user", "content": "word ".repeat(200)}],
    });
    for (budget, code) in [
        (
            json!({"models": {"mistral-large-latest": 5}}),
            "model_budget",
        ),
        (json!({"tokens_per_month": 5}), "workspace_budget"),
    ] {
        let (s, b) = put_budget(&gw, &key, budget).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let r = gw.chat(&key, long.clone(), &[]).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (body["type"].as_str(), body["code"].as_str()),
            (Some("request_too_large"), Some(code)),
            "{body}"
        );
        let text = gw.metrics().await;
        let series =
            format!("tiergate_decisions_total{{outcome=\"too_large\",limit=\"{code}\"}} 1");
        assert!(text.contains(&series), "{series}: {text}");
        assert!(
            !text.contains(&format!("outcome=\"quota_exceeded\",limit=\"{code}\"")),
            "{code} counted as quota_exceeded"
        );
    }
}

/// A workspace's changes of its own (its budget, increase requests, webhooks, keys) are a
/// burst of 60, then one every 2 s: those routes count against no limit of its tier, and each
/// change is stored and audited (an outside audit grew the database by about 2 MB a second with
/// a free tier's key). Past it, `429 rate_limited` `workspace_changes` with `Retry-After`, and
/// nothing changed.
#[tokio::test]
async fn a_workspace_s_own_changes_are_rate_limited() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_month": 1_000_000})).await;
    for i in 0..60 {
        let (status, body) = put_budget(&gw, &key, json!({"tokens_per_month": 1_000 + i})).await;
        assert_eq!(status, StatusCode::OK, "{i}: {body}");
    }
    let r = gw
        .client
        .put(format!("{}/v1/budget", gw.url))
        .bearer_auth(&key)
        .json(&json!({"tokens_per_month": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header_u64(&r, "retry-after"), 2);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "rate_limited", "{body}");
    assert_eq!(body["code"], "workspace_changes", "{body}");
    // Nor an increase request.
    let r = gw
        .post(
            &key,
            "/v1/limit-requests",
            json!({"use_case": "x", "requested_limits": {"tokens_per_month": 2_000_000}}),
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let (status, budget) = {
        let r = gw
            .client
            .get(format!("{}/v1/budget", gw.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, StatusCode::OK, "reads are not counted");
    assert_eq!(budget["tokens_per_month"], 1_059, "nothing changed");
    // Two seconds later, one more.
    gw.advance(std::time::Duration::from_secs(2));
    let (status, _) = put_budget(&gw, &key, json!({"tokens_per_month": 5})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = put_budget(&gw, &key, json!({"tokens_per_month": 6})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}
