//! Bad input on the admin API, the workspace's own routes and the router: one table of cases.
//! Each gets a clear 4xx with a JSON body in the gateway's error shape, never a 5xx, a
//! framework's plain-text rejection, a panic or a hang, and a refused change records nothing.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::*;

/// Who a case calls as.
#[derive(Clone, Copy)]
enum Who {
    Nobody,
    Admin,
    /// `Authorization` exactly as given.
    Header(&'static str),
    /// The workspace's own key.
    Workspace,
}

enum Body {
    None,
    Json(Value),
    Raw(Vec<u8>),
}

struct Case {
    what: &'static str,
    method: Method,
    /// After the gateway's URL; `{ws}`, `{key}` and `{req}` are the set-up ids.
    path: &'static str,
    who: Who,
    body: Body,
    status: u16,
    /// What the error's message must name (the field), where set.
    naming: Option<&'static str>,
}

impl Case {
    fn naming(mut self, field: &'static str) -> Case {
        self.naming = Some(field);
        self
    }
}

fn case(what: &'static str, method: Method, path: &'static str, who: Who, status: u16) -> Case {
    Case {
        what,
        method,
        path,
        who,
        body: Body::None,
        status,
        naming: None,
    }
}

fn with_json(
    what: &'static str,
    method: Method,
    path: &'static str,
    who: Who,
    body: Value,
    status: u16,
) -> Case {
    Case {
        what,
        method,
        path,
        who,
        body: Body::Json(body),
        status,
        naming: None,
    }
}

fn with_raw(
    what: &'static str,
    method: Method,
    path: &'static str,
    who: Who,
    body: impl Into<Vec<u8>>,
    status: u16,
) -> Case {
    Case {
        what,
        method,
        path,
        who,
        body: Body::Raw(body.into()),
        status,
        naming: None,
    }
}

#[rustfmt::skip]
fn table() -> Vec<Case> {
    use Method as M;
    use Who::*;
    let patch = |what, limits: Value| {
        with_json(
            what,
            M::PATCH,
            "/admin/v1/workspaces/{ws}",
            Admin,
            json!({ "limits": limits }),
            400,
        )
    };
    let new_workspace =
        |what, body: Value| with_json(what, M::POST, "/admin/v1/workspaces", Admin, body, 400);
    let ask =
        |what, body: Value| with_json(what, M::POST, "/v1/limit-requests", Workspace, body, 400);
    vec![
        // Tokens.
        case("no token", M::GET, "/admin/v1/workspaces", Nobody, 401),
        case("wrong token", M::GET, "/admin/v1/workspaces", Header("Bearer wrong-token-wrong-token"), 401),
        case("empty bearer", M::GET, "/admin/v1/workspaces", Header("Bearer "), 401),
        case("basic scheme", M::GET, "/admin/v1/workspaces", Header("Basic dGVzdDp0ZXN0"), 401),
        case("token and one more character", M::GET, "/admin/v1/audit", Header("Bearer test-admin-token-0123456789x"), 401),
        case("a token cut short", M::GET, "/admin/v1/audit", Header("Bearer test-admin-token-012345678"), 401),
        case("a workspace key as the admin token", M::DELETE, "/admin/v1/keys/{key}", Workspace, 401),
        // Ids.
        case("no such workspace", M::GET, "/admin/v1/workspaces/999999", Admin, 404),
        // Ids are whole numbers above 0: `-1` and `0` are refused as `abc` is (an outside
        // audit: they were looked for, `404`).
        case("negative id", M::GET, "/admin/v1/workspaces/-1", Admin, 400).naming("above 0"),
        case("id zero", M::GET, "/admin/v1/workspaces/0", Admin, 400),
        case("negative request id", M::GET, "/admin/v1/limit-requests/-1", Admin, 400),
        case("negative webhook id", M::GET, "/admin/v1/webhooks/-1/deliveries", Admin, 400),
        case("negative id of the workspace's request", M::GET, "/v1/limit-requests/-1", Workspace, 400),
        case("id not a number", M::GET, "/admin/v1/workspaces/abc", Admin, 400),
        case("id a fraction", M::GET, "/admin/v1/workspaces/1.5", Admin, 400),
        case("id past 64 bits", M::GET, "/admin/v1/workspaces/99999999999999999999", Admin, 400),
        case("id ../ percent-encoded", M::GET, "/admin/v1/workspaces/..%2F..%2Fetc%2Fpasswd", Admin, 400),
        case("id with a quote", M::GET, "/admin/v1/workspaces/1'%20OR%20'1'='1", Admin, 400),
        case("id with a brace", M::GET, "/admin/v1/workspaces/%7Bid%7D", Admin, 400),
        case("id with a colon", M::GET, "/admin/v1/workspaces/1:2", Admin, 400),
        case("id with a NUL", M::GET, "/admin/v1/workspaces/1%00", Admin, 400),
        case("id as invalid UTF-8", M::GET, "/admin/v1/workspaces/%FF%FE", Admin, 400),
        case("keys of no such workspace", M::GET, "/admin/v1/workspaces/999999/keys", Admin, 404),
        case("usage of an id not a number", M::GET, "/admin/v1/workspaces/x/usage", Admin, 400),
        case("revoke an id not a number", M::DELETE, "/admin/v1/keys/abc", Admin, 400),
        case("revoke no such key", M::DELETE, "/admin/v1/keys/424242", Admin, 404),
        case("approve an id not a number", M::POST, "/admin/v1/limit-requests/abc/approve", Admin, 400),
        case("approve no such request", M::POST, "/admin/v1/limit-requests/999999/approve", Admin, 404),
        with_json("deny no such request", M::POST, "/admin/v1/limit-requests/999999/deny", Admin, json!({"reason": "x"}), 404),
        with_json("a key for no such workspace", M::POST, "/admin/v1/workspaces/999999/keys", Admin, json!({}), 404),
        // Tier names in the path.
        with_json("tier name ../", M::PUT, "/admin/v1/tiers/..%2Fadmin", Admin, json!({}), 400),
        with_json("tier name SQL", M::PUT, "/admin/v1/tiers/x';DROP%20TABLE%20tiers;--", Admin, json!({}), 400),
        with_json("tier name with braces", M::PUT, "/admin/v1/tiers/%7Bname%7D", Admin, json!({}), 400),
        with_json("tier name with a colon", M::PUT, "/admin/v1/tiers/a:b", Admin, json!({}), 400),
        with_json("tier name of 65 characters", M::PUT, "/admin/v1/tiers/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", Admin, json!({}), 400),
        // Limits.
        patch("requests_per_second negative", json!({"requests_per_second": -1})),
        patch("requests_per_second zero", json!({"requests_per_second": 0})),
        patch("requests_per_second absurd", json!({"requests_per_second": 1e300})),
        patch("requests_per_second with four decimals", json!({"requests_per_second": 0.0001})),
        patch("requests_per_second a string", json!({"requests_per_second": "5"})),
        patch("tokens_per_minute negative", json!({"tokens_per_minute": -5})),
        patch("tokens_per_minute past 64 bits", json!({"tokens_per_minute": 1e30})),
        patch("tokens_per_month above the maximum", json!({"tokens_per_month": 10_000_000_000_000_000u64})),
        patch("concurrent_requests zero", json!({"concurrent_requests": 0})),
        patch("burst zero", json!({"burst": 0})),
        patch("burst past 32 bits", json!({"burst": 5_000_000_000u64})),
        patch("a limit that does not exist", json!({"speed": 1})),
        with_json("limits not an object", M::PATCH, "/admin/v1/workspaces/{ws}", Admin, json!({"limits": [1]}), 400),
        with_json("limits null", M::PATCH, "/admin/v1/workspaces/{ws}", Admin, json!({"limits": null, "pinned": true}), 400).naming("limits"),
        // A body that is not an object: serde read a struct from an array, by position (an
        // outside audit, with Schemathesis: `[7000]` set a budget, `[null, null]` made a key).
        with_json("a workspace as an array", M::POST, "/admin/v1/workspaces", Admin, json!(["arr", "free"]), 400).naming("must be a JSON object"),
        with_json("a key as an array", M::POST, "/admin/v1/workspaces/{ws}/keys", Admin, json!([null, null]), 400).naming("must be a JSON object"),
        with_json("a patch as an array", M::PATCH, "/admin/v1/workspaces/{ws}", Admin, json!([null, null, {"tokens_per_minute": 777}]), 400),
        with_json("a denial as an array", M::POST, "/admin/v1/limit-requests/{req}/deny", Admin, json!(["no"]), 400),
        with_json("an approval as an array", M::POST, "/admin/v1/limit-requests/{req}/approve", Admin, json!([null, "x"]), 400),
        with_json("a budget as an array", M::PUT, "/v1/budget", Workspace, json!([7000]), 400),
        with_json("a budget as a number", M::PUT, "/v1/budget", Workspace, json!(7000), 400),
        with_json("a webhook as an array", M::POST, "/v1/webhooks", Workspace, json!(["http://127.0.0.1:9/x", ["quota.threshold"]]), 400),
        with_json("an increase as an array", M::POST, "/v1/limit-requests", Workspace, json!(["more", null, {"tokens_per_month": 2_000_000_000u64}]), 400),
        with_json("nothing to change", M::PATCH, "/admin/v1/workspaces/{ws}", Admin, json!({}), 400),
        with_json("an unknown status", M::PATCH, "/admin/v1/workspaces/{ws}", Admin, json!({"status": "deleted"}), 400),
        with_json("a tier path in a tier field", M::PATCH, "/admin/v1/workspaces/{ws}", Admin, json!({"tier": "../free"}), 400),
        with_json("no such tier", M::PATCH, "/admin/v1/workspaces/{ws}", Admin, json!({"tier": "gold"}), 400),
        with_json("a tier's negative rate", M::PUT, "/admin/v1/tiers/t", Admin, json!({"requests_per_second": -1}), 400),
        with_raw("a tier's tokens past 64 bits", M::PUT, "/admin/v1/tiers/t", Admin, "{\"tokens_per_minute\": 18446744073709551616}", 400),
        with_json("a tier's empty model name", M::PUT, "/admin/v1/tiers/t", Admin, json!({"models": {"": {"tokens_per_minute": 5}}}), 400),
        with_json("a tier's unknown field", M::PUT, "/admin/v1/tiers/t", Admin, json!({"rps": 5}), 400).naming("promotion"),
        with_json("a grant of zero", M::POST, "/admin/v1/limit-requests/{req}/approve", Admin, json!({"limits": {"requests_per_second": 0}}), 400),
        with_json("a grant of nothing", M::POST, "/admin/v1/limit-requests/{req}/approve", Admin, json!({"limits": {}}), 400),
        // An approval grants figures: a null named no change and answered 200 (an outside audit).
        with_json("a grant of null", M::POST, "/admin/v1/limit-requests/{req}/approve", Admin, json!({"limits": {"concurrent_requests": 80, "tokens_per_minute": null}}), 400).naming("tokens_per_minute"),
        with_json("a grant of a string", M::POST, "/admin/v1/limit-requests/{req}/approve", Admin, json!({"limits": {"tokens_per_minute": "5"}}), 400).naming("tokens_per_minute"),
        // Names and texts.
        new_workspace("an empty name", json!({"name": ""})),
        new_workspace("a blank name", json!({"name": " "})),
        new_workspace("a name of 129 characters", json!({"name": "n".repeat(129)})),
        new_workspace("a NUL in a name", json!({"name": "a\u{0}b"})),
        new_workspace("a line break in a name", json!({"name": "a\nb"})),
        new_workspace("terminal escapes in a name", json!({"name": "\u{1b}[31mred"})),
        // Shown in another order than written (an outside audit took one in a use case).
        new_workspace("a right-to-left override in a name", json!({"name": "abc\u{202e}fdp.exe"})),
        new_workspace("a line separator in a name", json!({"name": "a\u{2028}b"})),
        ask("a bidirectional isolate in a use case", json!({"use_case": "pay \u{2067}001\u{2069} usd", "requested_limits": {"tokens_per_minute": 999999}})),
        new_workspace("a name not a string", json!({"name": 5})),
        new_workspace("no name", json!({"tier": "free"})),
        new_workspace("an unknown field", json!({"name": "x", "owner": "y"})),
        with_raw("not JSON", M::POST, "/admin/v1/workspaces", Admin, "name=x", 400),
        with_raw("truncated JSON", M::POST, "/admin/v1/workspaces", Admin, "{\"name\": \"x", 400),
        with_raw("invalid UTF-8", M::POST, "/admin/v1/workspaces", Admin, &b"{\"name\": \"\xff\xfe\"}"[..], 400),
        with_raw("a lone surrogate", M::POST, "/admin/v1/workspaces", Admin, "{\"name\": \"\\udc00\"}", 400),
        case("no body where one is needed", M::POST, "/admin/v1/workspaces", Admin, 400),
        with_raw("a body over 1 MiB", M::POST, "/admin/v1/workspaces", Admin, format!("{{\"name\": \"{}\"}}", "x".repeat(1 << 20)), 413),
        with_json("a key name of 200 characters", M::POST, "/admin/v1/workspaces/{ws}/keys", Admin, json!({"name": "k".repeat(200)}), 400),
        with_json("a key name with a tab", M::POST, "/admin/v1/workspaces/{ws}/keys", Admin, json!({"name": "a\tb"}), 400),
        with_json("an expiry that is no instant", M::POST, "/admin/v1/workspaces/{ws}/keys", Admin, json!({"expires_at": "tomorrow"}), 400),
        with_json("a key that has already expired", M::POST, "/admin/v1/workspaces/{ws}/keys", Admin, json!({"expires_at": "2020-01-01T00:00:00Z"}), 400).naming("expires_at"),
        with_json("a tier's burst without a rate", M::PUT, "/admin/v1/tiers/t", Admin, json!({"burst": 5, "tokens_per_minute": 1000}), 400).naming("burst"),
        with_json("an empty reason", M::POST, "/admin/v1/limit-requests/{req}/deny", Admin, json!({"reason": " "}), 400),
        with_json("a reason over 4 KiB", M::POST, "/admin/v1/limit-requests/{req}/deny", Admin, json!({"reason": "r".repeat(4097)}), 400),
        // The workspace's increase requests.
        ask("an empty use case", json!({"use_case": "", "requested_limits": {"burst": 2}})),
        ask("a use case over 4 KiB", json!({"use_case": "u".repeat(4097), "requested_limits": {"burst": 2}})),
        ask("a use case of 1 MB", json!({"use_case": "u".repeat(1_000_000), "requested_limits": {"burst": 2}})),
        ask("a use case with a bell", json!({"use_case": "ring\u{7}", "requested_limits": {"burst": 2}})),
        ask("no limit asked for", json!({"use_case": "more", "requested_limits": {}})),
        ask("a negative limit asked for", json!({"use_case": "more", "requested_limits": {"tokens_per_minute": -1}})),
        ask("an unknown limit asked for", json!({"use_case": "more", "requested_limits": {"speed": 1}})),
        with_json("an increase without a key", M::POST, "/v1/limit-requests", Nobody, json!({"use_case": "x", "requested_limits": {"burst": 2}}), 401),
        // A value of the wrong type is refused naming its field.
        ask("a limit asked for as a string", json!({"use_case": "more", "requested_limits": {"tokens_per_minute": "5"}})).naming("requested_limits.tokens_per_minute"),
        ask("a use case not a string", json!({"use_case": 5, "requested_limits": {"burst": 2}})).naming("use_case"),
        with_json("a tier's tokens as a float", M::PUT, "/admin/v1/tiers/t", Admin, json!({"tokens_per_minute": 1e3}), 400).naming("tokens_per_minute"),
        with_raw("a tier's rate out of range", M::PUT, "/admin/v1/tiers/t", Admin, "{\"requests_per_second\": 1e400}", 400).naming("requests_per_second"),
        with_json("an attribute as a string", M::PUT, "/admin/v1/workspaces/{ws}/attributes", Admin, json!({"paid_usd": "50"}), 400).naming("paid_usd"),
        with_json("a budget not a number", M::PUT, "/v1/budget", Workspace, json!({"tokens_per_month": "x"}), 400).naming("tokens_per_month"),
        with_json("events not a list", M::POST, "/admin/v1/webhooks", Admin, json!({"url": "http://127.0.0.1:9/h", "events": "quota.threshold"}), 400).naming("events"),
        // Query strings.
        case("audit limit zero", M::GET, "/admin/v1/audit?limit=0", Admin, 400),
        case("audit limit negative", M::GET, "/admin/v1/audit?limit=-1", Admin, 400),
        case("audit limit absurd", M::GET, "/admin/v1/audit?limit=100000", Admin, 400),
        case("audit limit past 64 bits", M::GET, "/admin/v1/audit?limit=99999999999999999999", Admin, 400),
        case("audit limit not a number", M::GET, "/admin/v1/audit?limit=ten", Admin, 400),
        case("audit action unknown", M::GET, "/admin/v1/audit?action=key.delete", Admin, 400),
        case("audit from not an instant", M::GET, "/admin/v1/audit?from=yesterday", Admin, 400),
        case("audit range backwards", M::GET, "/admin/v1/audit?from=2030-01-01T00:00:00Z&to=2020-01-01T00:00:00Z", Admin, 400),
        case("audit workspace not a number", M::GET, "/admin/v1/audit?workspace_id=1%20OR%201=1", Admin, 400),
        case("audit after not a number", M::GET, "/admin/v1/audit?after=%27", Admin, 400),
        // Ids in a query are whole numbers above 0, as in a path (an outside audit: `0` and `-1`
        // answered `200` with an empty list).
        case("audit workspace zero", M::GET, "/admin/v1/audit?workspace_id=0", Admin, 400).naming("workspace_id"),
        case("audit workspace negative", M::GET, "/admin/v1/audit?workspace_id=-1", Admin, 400).naming("workspace_id"),
        case("audit after zero", M::GET, "/admin/v1/audit?after=0", Admin, 400).naming("after"),
        case("audit after negative", M::GET, "/admin/v1/audit?after=-5", Admin, 400).naming("after"),
        case("requests workspace zero", M::GET, "/admin/v1/limit-requests?workspace_id=0", Admin, 400).naming("workspace_id"),
        case("requests workspace negative", M::GET, "/admin/v1/limit-requests?workspace_id=-3", Admin, 400).naming("workspace_id"),
        case("audit filter unknown", M::GET, "/admin/v1/audit?colour=red", Admin, 400),
        case("requests by an unknown status", M::GET, "/admin/v1/limit-requests?status=maybe", Admin, 400),
        case("usage from not a day", M::GET, "/admin/v1/workspaces/{ws}/usage?from=yesterday", Admin, 400),
        case("usage with an unknown parameter", M::GET, "/admin/v1/workspaces/{ws}/usage?days=7", Admin, 400),
        case("usage range backwards", M::GET, "/admin/v1/workspaces/{ws}/usage?from=2026-12-06&to=2026-12-01", Admin, 400).naming("from"),
        // `to` left out is today (the manual clock starts now, in this century).
        case("usage from after today", M::GET, "/admin/v1/workspaces/{ws}/usage?from=2999-01-01", Admin, 400).naming("from"),
        // Every route of the two APIs refuses a parameter it does not take, even one that takes
        // none, and changes nothing (the key stays).
        case("revoke with a stray parameter", M::DELETE, "/admin/v1/keys/{key}?dry_run=1", Admin, 400).naming("dry_run"),
        with_json("revoke with a field in the body", M::DELETE, "/admin/v1/keys/{key}", Admin, json!({"dry_run": true}), 400).naming("dry_run"),
        case("workspaces with a parameter", M::GET, "/admin/v1/workspaces?x=1", Admin, 400).naming("'x'"),
        case("a workspace with a parameter", M::GET, "/admin/v1/workspaces/{ws}?x=1", Admin, 400),
        case("tiers with a parameter", M::GET, "/admin/v1/tiers?x=1", Admin, 400),
        case("deliveries with a limit they do not take", M::GET, "/admin/v1/webhooks/1/deliveries?limit=5", Admin, 400),
        case("the limits with a parameter", M::GET, "/v1/limits?x=1", Workspace, 400),
        case("the usage with a parameter", M::GET, "/v1/usage?x=1", Workspace, 400),
        case("the budget with a parameter", M::GET, "/v1/budget?x=1", Workspace, 400),
        case("own requests with a parameter", M::GET, "/v1/limit-requests?x=1", Workspace, 400),
        case("own webhooks with a parameter", M::GET, "/v1/webhooks?x=1", Workspace, 400),
        // Routes and methods.
        case("unknown admin route", M::GET, "/admin/v1/nope", Admin, 404),
        case("unknown admin route, no token", M::GET, "/admin/v1/nope", Nobody, 404),
        case("the admin root", M::GET, "/admin/v1", Admin, 404),
        case("another admin version", M::GET, "/admin/v2/workspaces", Admin, 404),
        case("a route outside /v1", M::GET, "/nope", Nobody, 404),
        case("another API version", M::GET, "/v2/chat/completions", Nobody, 404),
        case("delete every workspace", M::DELETE, "/admin/v1/workspaces", Admin, 405),
        case("put a workspace", M::PUT, "/admin/v1/workspaces/{ws}", Admin, 405),
        case("get an approval", M::GET, "/admin/v1/limit-requests/{req}/approve", Admin, 405),
        case("post the audit", M::POST, "/admin/v1/audit", Admin, 405),
        case("post to the health check", M::POST, "/healthz", Nobody, 405),
        case("delete the limits", M::DELETE, "/v1/limits", Workspace, 405),
    ]
}

#[tokio::test]
async fn bad_admin_and_route_input_gets_a_json_4xx_and_changes_nothing() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    let (_, keys) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}/keys"), None)
        .await;
    let key_id = keys["data"][0]["id"].as_i64().unwrap();
    let r = gw
        .post(
            &key,
            "/v1/limit-requests",
            json!({"use_case": "more", "requested_limits": {"requests_per_second": 2}}),
            &[],
        )
        .await;
    let req: Value = r.json().await.unwrap();
    let req = req["id"].as_i64().unwrap();
    let (_, before) = gw.admin(Method::GET, "/audit", None).await;
    let (_, workspace_before) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}"), None)
        .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let cases = table();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let path = c
            .path
            .replace("{ws}", &ws.to_string())
            .replace("{key}", &key_id.to_string())
            .replace("{req}", &req.to_string());
        let mut request = client.request(c.method.clone(), format!("{}{path}", gw.url));
        request = match c.who {
            Who::Nobody => request,
            Who::Admin => request.bearer_auth(ADMIN),
            Who::Header(h) => request.header("authorization", h),
            Who::Workspace => request.bearer_auth(&key),
        };
        request = match &c.body {
            Body::None => request,
            Body::Json(v) => request.json(v),
            Body::Raw(bytes) => request
                .header("content-type", "application/json")
                .body(bytes.clone()),
        };
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: no answer: {e}", c.what));
                continue;
            }
        };
        let status = response.status();
        let json_type = response
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("application/json"));
        let text = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let shaped = is_error_shaped(&body);
        let named = c
            .naming
            .is_none_or(|field| body["message"].as_str().is_some_and(|m| m.contains(field)));
        if status.as_u16() != c.status || !json_type || !shaped || !named {
            failures.push(format!(
                "{}: {} {path} -> {status} (want {}), body: {}",
                c.what,
                c.method,
                c.status,
                text.chars().take(300).collect::<String>()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Nothing was changed or recorded, and the gateway still serves.
    let (_, after) = gw.admin(Method::GET, "/audit", None).await;
    assert_eq!(after, before);
    let (_, workspace_after) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}"), None)
        .await;
    assert_eq!(workspace_after, workspace_before);
    let (s, tiers) = gw.admin(Method::GET, "/tiers", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        tiers["data"].as_array().unwrap().len(),
        6,
        "no tier was made"
    );
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
}

/// Routes under `/v1` that the gateway does not know are still the upstream's: passed through,
/// whatever the method, and answered by the upstream.
#[tokio::test]
async fn unknown_v1_routes_are_still_passed_to_the_upstream() {
    // With `upstream.unmetered = all`: by default only the routes that keep nothing at the
    // upstream are (`routes::by_default_only_the_routes_that_keep_nothing_upstream_are_passed_on`).
    let mut options = Options::default();
    options.raw.upstream.unmetered = Some("all".into());
    let gw = TestGateway::start_with(options).await;
    let (_, key) = gw.workspace("free").await;
    let before = gw.upstream_count().await;
    let r = gw
        .client
        .delete(format!("{}/v1/assistants/asst_123", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "the mock's own answer");
    assert!(r.headers().contains_key("x-ratelimit-limit-requests"));
    assert_eq!(gw.upstream_count().await, before + 1, "forwarded");
    // Without a key it is refused before it reaches the upstream.
    let r = gw
        .client
        .get(format!("{}/v1/nope", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(gw.upstream_count().await, before + 1);
}

/// A caller without credentials gets `401` whatever its query or path id: the credentials are
/// checked before the input (an outside audit: `GET /v1/limits?x=1` and `DELETE
/// /v1/webhooks/abc` without a key, and the admin API's lists with a query and no token, were
/// answered `400`, telling anyone the operations' parameters). With them, the input's `400`.
#[tokio::test]
async fn credentials_are_checked_before_the_query_and_the_path() {
    let (gw, key) = TestGateway::on_tier(json!({"requests_per_second": 100})).await;
    let call = |method: Method, path: &str, token: Option<&str>, body: Option<Value>| {
        let mut req = gw.client.request(method, format!("{}{path}", gw.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let workspace = [
        (Method::GET, "/v1/limits?x=1"),
        (Method::GET, "/v1/usage?month=x"),
        (Method::DELETE, "/v1/webhooks/abc"),
        (Method::GET, "/v1/webhooks/abc/deliveries"),
    ];
    for (method, path) in workspace {
        for token in [None, Some("tg_wrong")] {
            let (status, body) = call(method.clone(), path, token, None).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {token:?}: {body}"
            );
        }
        let (status, body) = call(method.clone(), path, Some(&key), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {body}");
    }
    for path in [
        "/admin/v1/workspaces?x=1",
        "/admin/v1/audit?x=1",
        "/admin/v1/tiers?x=1",
    ] {
        for token in [None, Some("wrong-token-0123456789"), Some(key.as_str())] {
            let (status, body) = call(Method::GET, path, token, None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {token:?}: {body}");
        }
        let (status, body) = call(Method::GET, path, Some(ADMIN), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
    }
    // A field in a workspace's DELETE is refused, as in the admin API's.
    let (status, body) = call(
        Method::DELETE,
        "/v1/webhooks/999999",
        Some(&key),
        Some(json!({"x": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(Method::DELETE, "/v1/webhooks/999999", Some(&key), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}
