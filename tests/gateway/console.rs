//! The console (`/console`): sign-in for a session cookie, the workspace page, sign-out, and
//! what ends or refuses a session. Real HTTP to a real gateway; a client that follows no
//! redirect and keeps the cookie by hand, so every `Set-Cookie` and `Location` is checked.
//!
//! A session sees only its own workspace: this slice takes no workspace id from a URL, so the
//! only way to name another one is to change the id in the cookie, which breaks its signature
//! (`a_session_sees_only_its_own_workspace`).

use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};

use crate::harness::*;

pub(crate) fn browser() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// What a page answered (also read by the operator's tests, `console_operator`).
pub(crate) struct Page {
    pub(crate) status: StatusCode,
    pub(crate) location: Option<String>,
    pub(crate) set_cookie: Vec<String>,
    pub(crate) body: String,
}

impl Page {
    pub(crate) async fn of(r: Response) -> Page {
        let status = r.status();
        let location = header(&r, "location").map(str::to_string);
        let set_cookie = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        Page {
            status,
            location,
            set_cookie,
            body: r.text().await.unwrap(),
        }
    }

    /// `tiergate_console=VALUE` from the `Set-Cookie` that sets the session.
    pub(crate) fn session(&self) -> Option<String> {
        self.set_cookie
            .iter()
            .find(|c| c.starts_with("tiergate_console=") && !c.starts_with("tiergate_console=;"))
            .map(|c| c.split(';').next().unwrap().to_string())
    }

    pub(crate) fn clears_session(&self) -> bool {
        self.set_cookie
            .iter()
            .any(|c| c.starts_with("tiergate_console=;") && c.contains("Max-Age=0"))
    }

    pub(crate) fn redirects_to(&self, to: &str) -> bool {
        self.status == StatusCode::SEE_OTHER && self.location.as_deref() == Some(to)
    }

    /// The number in the `<span class="CLASS">` of the limit row `limit`.
    fn figure(&self, limit: &str, class: &str) -> u64 {
        let row = self
            .body
            .split(&format!("data-limit=\"{limit}\""))
            .nth(1)
            .unwrap_or_else(|| panic!("no row {limit} in {}", self.body));
        let row = row.split("</tr>").next().unwrap();
        let start = row
            .find(&format!("<span class=\"{class}\">"))
            .unwrap_or_else(|| panic!("no {class} in row {limit}: {row}"))
            + class.len()
            + 15;
        row[start..].split('<').next().unwrap().parse().unwrap()
    }

    /// The sign-out form's token.
    pub(crate) fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .expect("a csrf field")
            + 19;
        self.body[at..].split('"').next().unwrap().to_string()
    }
}

async fn sign_in(gw: &TestGateway, key: &str, headers: &[(&str, &str)]) -> Page {
    let mut req = browser()
        .post(format!("{}/console/sign-in", gw.url))
        .form(&[("key", key)]);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Page::of(req.send().await.unwrap()).await
}

pub(crate) async fn get(gw: &TestGateway, path: &str, cookie: Option<&str>) -> Page {
    let mut req = browser().get(format!("{}{path}", gw.url));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    Page::of(req.send().await.unwrap()).await
}

async fn sign_out(gw: &TestGateway, cookie: &str, csrf: Option<&str>) -> Page {
    let form: Vec<(&str, &str)> = csrf.map(|t| vec![("csrf", t)]).unwrap_or_default();
    Page::of(
        browser()
            .post(format!("{}/console/sign-out", gw.url))
            .header("cookie", cookie)
            .form(&form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// A session on a fresh workspace of `gw`: its cookie.
pub(crate) async fn signed_in(gw: &TestGateway, key: &str) -> String {
    let page = sign_in(gw, key, &[]).await;
    assert!(page.redirects_to("/console/workspace"), "{}", page.body);
    page.session().expect("a session cookie")
}

async fn key_ids(gw: &TestGateway, ws: i64) -> Vec<i64> {
    let (s, keys) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/workspaces/{ws}/keys"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{keys}");
    keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_i64().unwrap())
        .collect()
}

const TIER: &str = "console-tier";

fn tier_limits() -> Value {
    json!({
        "requests_per_second": 10,
        "tokens_per_minute": 100000,
        "tokens_per_month": 5000000,
        "concurrent_requests": 4,
        "models": {"mistral-large-latest": {"tokens_per_minute": 2000}}
    })
}

#[tokio::test]
async fn console_sign_in_shows_the_workspace_and_its_usage_moves_with_real_requests() {
    let gw = TestGateway::start().await;
    gw.put_tier(TIER, tier_limits()).await;
    let (_, key) = gw.workspace(TIER).await;

    let form = get(&gw, "/console", None).await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(form.body.contains(r#"method="post""#), "{}", form.body);
    assert!(form.body.contains(r#"action="/console/sign-in""#));

    let signed = sign_in(&gw, &key, &[]).await;
    assert!(signed.redirects_to("/console/workspace"), "{}", signed.body);
    let set = &signed.set_cookie[0];
    for flag in ["HttpOnly", "SameSite=Lax", "Path=/console", "Max-Age=43200"] {
        assert!(set.contains(flag), "{flag} in {set}");
    }
    assert!(!set.contains("Secure"), "{set}");
    assert!(!set.contains(&key), "the key is not in the cookie");
    let cookie = signed.session().unwrap();

    // Signed in, /console leads to the workspace.
    assert!(get(&gw, "/console", Some(&cookie))
        .await
        .redirects_to("/console/workspace"));

    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page
        .body
        .contains(&format!("<strong id=\"tier\">{TIER}</strong>")));
    assert_eq!(page.figure("tokens_per_month", "used"), 0);
    assert_eq!(page.figure("tokens_per_minute", "remaining"), 100000);
    assert_eq!(page.figure("concurrent_requests", "used"), 0);
    assert!(page.body.contains("<meter"));
    assert!(page.body.contains("data-model=\"mistral-large-latest\""));
    // Its key is listed by prefix, never whole.
    assert!(page.body.contains(&key[..8]));
    assert!(!page.body.contains(&key));

    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap();
    // The same figures as /v1/limits (read on both sides of the page, until a settlement in
    // flight has landed).
    let started = std::time::Instant::now();
    let page = loop {
        let before = gw.limits(&key).await["usage"].clone();
        let page = get(&gw, "/console/workspace", Some(&cookie)).await;
        let after = gw.limits(&key).await["usage"].clone();
        if before == after
            && page.figure("tokens_per_month", "used")
                == after["tokens_per_month"]["used"].as_u64().unwrap()
            && page.figure("tokens_per_minute", "remaining")
                == after["tokens_per_minute"]["remaining"].as_u64().unwrap()
        {
            break page;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the page and /v1/limits disagree"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(page.figure("tokens_per_month", "used") > 0);
    assert!(page.figure("tokens_per_minute", "remaining") < 100000);
}

#[tokio::test]
async fn console_cookie_is_secure_over_https() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;
    let signed = sign_in(&gw, &key, &[("x-forwarded-proto", "https")]).await;
    assert!(signed.redirects_to("/console/workspace"));
    assert!(
        signed.set_cookie[0].contains("; Secure"),
        "{:?}",
        signed.set_cookie
    );
    // Cleared the same way, so that the browser replaces it.
    let page = Page::of(
        browser()
            .get(format!("{}/console/workspace", gw.url))
            .header("cookie", "tiergate_console=forged")
            .header("x-forwarded-proto", "https")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(page.clears_session());
    assert!(
        page.set_cookie[0].contains("; Secure"),
        "{:?}",
        page.set_cookie
    );
}

#[tokio::test]
async fn console_refuses_a_wrong_key_and_a_tampered_cookie() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;

    for wrong in [
        "",
        "nonsense",
        "tg_0000000000000000000000000000000000000000",
    ] {
        let page = sign_in(&gw, wrong, &[]).await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{wrong}");
        assert!(page.set_cookie.is_empty(), "{:?}", page.set_cookie);
        assert!(page.body.contains("Invalid or revoked API key."));
        assert!(page.body.contains(r#"method="post""#));
    }

    let cookie = signed_in(&gw, &key).await;
    // Any change to the cookie breaks its signature: back to sign-in, the cookie cleared.
    let mut tampered = cookie.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
    let tampered = String::from_utf8(tampered).unwrap();
    let later_expiry = {
        let mut parts: Vec<String> = cookie.split('.').map(str::to_string).collect();
        parts[2] = (parts[2].parse::<i64>().unwrap() + 1_000_000).to_string();
        parts.join(".")
    };
    for bad in [tampered, later_expiry, "tiergate_console=garbage".into()] {
        let page = get(&gw, "/console/workspace", Some(&bad)).await;
        assert!(page.redirects_to("/console"), "{bad}: {}", page.status);
        assert!(page.clears_session());
    }
    // Without a cookie: to sign-in, nothing to clear.
    let page = get(&gw, "/console/workspace", None).await;
    assert!(page.redirects_to("/console"));
    assert!(page.set_cookie.is_empty());
}

#[tokio::test]
async fn console_sessions_expire_after_twelve_hours() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;
    let cookie = signed_in(&gw, &key).await;
    gw.advance(Duration::from_secs(12 * 3600 - 1));
    assert_eq!(
        get(&gw, "/console/workspace", Some(&cookie)).await.status,
        StatusCode::OK
    );
    gw.advance(Duration::from_secs(1));
    assert!(get(&gw, "/console/workspace", Some(&cookie))
        .await
        .redirects_to("/console"));
}

#[tokio::test]
async fn console_revoking_the_key_or_suspending_the_workspace_ends_its_sessions() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    let other_key = gw.key(ws).await;
    let cookie = signed_in(&gw, &key).await;
    let other_cookie = signed_in(&gw, &other_key).await;

    let ids = key_ids(&gw, ws).await;
    let (s, _) = gw
        .admin(reqwest::Method::DELETE, &format!("/keys/{}", ids[0]), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    assert!(page.redirects_to("/console"), "{}", page.status);
    assert!(page.clears_session());
    // The revoked key cannot sign in again; the workspace's other key's session goes on.
    assert_eq!(
        sign_in(&gw, &key, &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&gw, "/console/workspace", Some(&other_cookie))
            .await
            .status,
        StatusCode::OK
    );

    let (s, _) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"status": "suspended"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(get(&gw, "/console/workspace", Some(&other_cookie))
        .await
        .redirects_to("/console"));
    let page = sign_in(&gw, &other_key, &[]).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(page.body.contains("suspended"));
    assert!(page.session().is_none());
}

#[tokio::test]
async fn console_sign_out_needs_the_session_form_token() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    let other = gw.key(ws).await;
    let cookie = signed_in(&gw, &key).await;
    let other_cookie = signed_in(&gw, &other).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    let token = page.csrf();
    let other_token = get(&gw, "/console/workspace", Some(&other_cookie))
        .await
        .csrf();
    assert_ne!(token, other_token);

    for wrong in [None, Some(""), Some("00"), Some(other_token.as_str())] {
        let page = sign_out(&gw, &cookie, wrong).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{wrong:?}");
        assert!(!page.clears_session());
    }
    // The right token from another site's page is refused too.
    let page = Page::of(
        browser()
            .post(format!("{}/console/sign-out", gw.url))
            .header("cookie", &cookie)
            .header("origin", "https://evil.example")
            .form(&[("csrf", token.as_str())])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);

    let page = sign_out(&gw, &cookie, Some(&token)).await;
    assert!(page.redirects_to("/console"), "{}", page.status);
    assert!(page.clears_session());
    assert!(page.set_cookie[0].contains("Path=/console"));
}

#[tokio::test]
async fn console_sign_in_from_another_site_is_refused() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;
    let page = sign_in(&gw, &key, &[("origin", "https://evil.example")]).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(page.session().is_none());
    // The console's own origin is fine.
    let host = gw.url.trim_start_matches("http://").to_string();
    let page = sign_in(&gw, &key, &[("origin", &format!("http://{host}"))]).await;
    assert!(page.redirects_to("/console/workspace"));
    // Behind a proxy that rewrites Host and says the original in X-Forwarded-Host.
    let page = sign_in(
        &gw,
        &key,
        &[
            ("origin", "https://console.example"),
            ("x-forwarded-host", "console.example"),
        ],
    )
    .await;
    assert!(page.redirects_to("/console/workspace"));
    // `Origin: null` (a sandboxed page, a redirect from another site) is refused.
    let page = sign_in(&gw, &key, &[("origin", "null")]).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn console_session_sees_only_its_own_workspace() {
    let gw = TestGateway::start().await;
    let (ws_a, key_a) = gw.workspace("free").await;
    let (s, ws_b) = gw
        .admin(
            reqwest::Method::POST,
            "/workspaces",
            Some(json!({"name": "the other one", "tier": "free"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let ws_b = ws_b["id"].as_i64().unwrap();
    gw.key(ws_b).await;

    let cookie = signed_in(&gw, &key_a).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("the other one"));
    // There is no id in the console's URLs to change; a query string is ignored.
    let page = get(
        &gw,
        &format!("/console/workspace?workspace={ws_b}&id={ws_b}"),
        Some(&cookie),
    )
    .await;
    assert!(!page.body.contains("the other one"));
    // The workspace id in the cookie, changed to B's: refused.
    let value = cookie.trim_start_matches("tiergate_console=");
    let forged = format!(
        "tiergate_console={ws_b}{}",
        value.strip_prefix(&ws_a.to_string()).unwrap()
    );
    assert!(get(&gw, "/console/workspace", Some(&forged))
        .await
        .redirects_to("/console"));
}

#[tokio::test]
async fn console_sign_in_attempts_are_rate_limited_per_client() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;
    for _ in 0..10 {
        assert_eq!(
            sign_in(&gw, "wrong", &[]).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    // The eleventh, even with the right key.
    let page = sign_in(&gw, &key, &[]).await;
    assert_eq!(page.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(page.session().is_none());
    assert!(page.body.contains("Too many sign-in attempts"));
    // One attempt comes back every 6 s.
    gw.advance(Duration::from_secs(6));
    assert!(sign_in(&gw, &key, &[])
        .await
        .redirects_to("/console/workspace"));
    assert_eq!(
        sign_in(&gw, &key, &[]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let metrics = gw.metrics().await;
    let count = |outcome: &str| -> String {
        let series = format!("tiergate_console_sign_ins_total{{outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("{series} in {metrics}"))
            .to_string()
    };
    assert_eq!(count("refused"), "10");
    assert_eq!(count("too_many_attempts"), "2");
    assert_eq!(count("signed_in"), "1");
}

#[tokio::test]
async fn console_escapes_what_it_shows() {
    let gw = TestGateway::start().await;
    let (s, ws) = gw
        .admin(
            reqwest::Method::POST,
            "/workspaces",
            Some(json!({"name": "<script>alert(1)</script>", "tier": "free"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ws}");
    let ws = ws["id"].as_i64().unwrap();
    let (s, _) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/workspaces/{ws}/keys"),
            Some(json!({"name": "\"><img src=x onerror=alert(2)>"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, created) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/workspaces/{ws}/keys"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let cookie = signed_in(&gw, created["key"].as_str().unwrap()).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(
        !without_own_script(&page.body).contains("<script"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<img"));
    assert!(page
        .body
        .contains("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
    let csp = browser()
        .get(format!("{}/console", gw.url))
        .send()
        .await
        .unwrap();
    assert!(header(&csp, "content-security-policy")
        .unwrap()
        .contains("default-src 'none'"));
}

#[tokio::test]
async fn console_sessions_survive_a_restart() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;
    let cookie = signed_in(&gw, &key).await;
    let gw = gw.restart().await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    assert_eq!(
        page.status,
        StatusCode::OK,
        "the secret was kept in the store"
    );
}

/// Instances on one database sign with the same secret: a session made on one is good on the
/// others, and revoking its key through one ends it on the others within the catalogue's
/// refresh (1 s; allowed 3 s on a busy machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_hold_across_instances_and_end_on_all() {
    let Some(redis) = crate::support::redis::shared_redis() else {
        return;
    };
    let fleet = TestGateway::fleet(2, &redis, |_| {}).await;
    let (one, two) = (&fleet[0], &fleet[1]);
    let (ws, key) = one.workspace("free").await;
    let cookie = signed_in(one, &key).await;
    eventually(
        Duration::from_secs(3),
        "the session on the other instance",
        || async { get(two, "/console/workspace", Some(&cookie)).await.status == StatusCode::OK },
    )
    .await;
    let ids = key_ids(one, ws).await;
    let (s, _) = one
        .admin(reqwest::Method::DELETE, &format!("/keys/{}", ids[0]), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(get(one, "/console/workspace", Some(&cookie))
        .await
        .redirects_to("/console"));
    eventually(
        Duration::from_secs(3),
        "the session ended on the other instance",
        || async {
            get(two, "/console/workspace", Some(&cookie))
                .await
                .redirects_to("/console")
        },
    )
    .await;
}

/// Sends a form of the workspace page with the session's cookie (and its token unless
/// `csrf` is `None`).
async fn post_form(
    gw: &TestGateway,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
    fields: &[(&str, &str)],
) -> Page {
    let mut form: Vec<(&str, &str)> = fields.to_vec();
    if let Some(t) = csrf {
        form.push(("csrf", t));
    }
    Page::of(
        browser()
            .post(format!("{}{path}", gw.url))
            .header("cookie", cookie)
            .form(&form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// The text of the cell of class `class` in the `tr` whose attribute `attr` is `value`.
fn cell(body: &str, attr: &str, value: &str, class: &str) -> String {
    let row = body
        .split(&format!("{attr}=\"{value}\""))
        .nth(1)
        .unwrap_or_else(|| panic!("no row {attr}={value} in {body}"));
    let row = row.split("</tr>").next().unwrap();
    let at = row
        .find(&format!("class=\"{class}\""))
        .unwrap_or_else(|| panic!("no {class} in {row}"));
    let text = &row[at..];
    text[text.find('>').unwrap() + 1..]
        .split("</td>")
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn console_shows_the_next_tier_up_the_ladder_beside_the_workspaces_limits() {
    let gw = TestGateway::start().await;
    // The shipped ladder: free (rank 0) leads to tier-1 (rank 1).
    let (ws, key) = gw.workspace("free").await;
    let (s, _) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"limits": {"tokens_per_minute": 750000}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let cookie = signed_in(&gw, &key).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    assert!(
        page.body.contains(r#"data-next-tier="tier-1""#),
        "{}",
        page.body
    );
    // Yours: the effective limits (the override, else the tier's); next: the next tier's.
    let ladder = page.body.split("id=\"ladder\"").nth(1).unwrap();
    assert_eq!(
        cell(ladder, "data-limit", "tokens_per_minute", "now"),
        "750000"
    );
    assert_eq!(
        cell(ladder, "data-limit", "tokens_per_minute", "next"),
        "2000000"
    );
    assert_eq!(
        cell(ladder, "data-limit", "requests_per_second", "next"),
        "5"
    );
    assert_eq!(
        cell(ladder, "data-limit", "concurrent_requests", "now"),
        "no limit"
    );
    assert_eq!(
        cell(ladder, "data-limit", "concurrent_requests", "next"),
        "50"
    );

    // A rank given through the admin API places a tier: `gold` above `scale` (rank 5).
    let (s, gold) = gw
        .admin(
            reqwest::Method::PUT,
            "/tiers/gold",
            Some(json!({"rank": 9, "tokens_per_minute": 900000000})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{gold}");
    assert_eq!(gold["rank"], 9);
    let (_, tiers) = gw.admin(reqwest::Method::GET, "/tiers", None).await;
    let listed = tiers["data"].as_array().unwrap();
    let rank_of = |name: &str| listed.iter().find(|t| t["name"] == name).unwrap()["rank"].clone();
    assert_eq!(rank_of("gold"), 9);
    assert_eq!(rank_of("scale"), 5);
    assert_eq!(rank_of("free"), 0);
    let (_, scale_key) = gw.workspace("scale").await;
    let scale_cookie = signed_in(&gw, &scale_key).await;
    let page = get(&gw, "/console/workspace", Some(&scale_cookie)).await;
    assert!(
        page.body.contains(r#"data-next-tier="gold""#),
        "{}",
        page.body
    );
    let ladder = page.body.split("id=\"ladder\"").nth(1).unwrap();
    assert_eq!(
        cell(ladder, "data-limit", "tokens_per_minute", "next"),
        "900000000"
    );

    // A tier without a rank is off the ladder: no next tier. The top of the ladder has none
    // either.
    gw.put_tier(TIER, tier_limits()).await;
    let (_, custom_key) = gw.workspace(TIER).await;
    let page = get(
        &gw,
        "/console/workspace",
        Some(&signed_in(&gw, &custom_key).await),
    )
    .await;
    assert!(!page.body.contains("data-next-tier"), "{}", page.body);
    assert!(page.body.contains("apart from the ladder"));
    let (_, top_key) = gw.workspace("gold").await;
    let page = get(
        &gw,
        "/console/workspace",
        Some(&signed_in(&gw, &top_key).await),
    )
    .await;
    assert!(!page.body.contains("data-next-tier"));
    assert!(page.body.contains("the top of the ladder"));

    // A rank that is not a whole number from 0 is refused, naming it.
    let (s, e) = gw
        .admin(
            reqwest::Method::PUT,
            "/tiers/bad",
            Some(json!({"rank": -1, "tokens_per_minute": 5})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().unwrap().contains("rank"), "{e}");
    let (s, e) = gw
        .admin(
            reqwest::Method::PUT,
            "/tiers/bad",
            Some(json!({"rank": 1, "tokens_per_minutes": 5})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("tokens_per_minutes"),
        "{e}"
    );
}

#[tokio::test]
async fn console_files_an_increase_request_and_shows_the_operators_answer() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    let cookie = signed_in(&gw, &key).await;
    // Signing in is not a use of the key: it was never used (it used to show as used now).
    let (_, keys) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/workspaces/{ws}/keys"),
            None,
        )
        .await;
    assert_eq!(keys["data"][0]["last_used_at"], Value::Null, "{keys}");
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    assert!(page.body.contains(r#"id="increase""#));
    assert!(page.body.contains(r#"id="no-requests""#));
    let csrf = page.csrf();

    // Refused forms: shown again as sent, with why; nothing filed.
    let no_use_case = post_form(
        &gw,
        "/console/limit-requests",
        &cookie,
        Some(&csrf),
        &[("use_case", " "), ("tokens_per_minute", "123456")],
    )
    .await;
    assert_eq!(no_use_case.status, StatusCode::BAD_REQUEST);
    assert!(
        no_use_case.body.contains("use_case"),
        "{}",
        no_use_case.body
    );
    assert!(
        no_use_case.body.contains(r#"value="123456""#),
        "the form is kept"
    );
    let not_a_number = post_form(
        &gw,
        "/console/limit-requests",
        &cookie,
        Some(&csrf),
        &[("use_case", "chat bot"), ("tokens_per_minute", "lots")],
    )
    .await;
    assert_eq!(not_a_number.status, StatusCode::BAD_REQUEST);
    assert!(
        not_a_number
            .body
            .contains("&#39;tokens_per_minute&#39; must be a whole number")
            || not_a_number
                .body
                .contains("'tokens_per_minute' must be a whole number"),
        "{}",
        not_a_number.body
    );
    let too_large = post_form(
        &gw,
        "/console/limit-requests",
        &cookie,
        Some(&csrf),
        &[
            ("use_case", "chat bot"),
            ("tokens_per_month", "99999999999999999999"),
        ],
    )
    .await;
    assert_eq!(too_large.status, StatusCode::BAD_REQUEST);
    assert!(
        too_large
            .body
            .contains("tokens_per_month&#39; is too large")
            || too_large.body.contains("tokens_per_month' is too large"),
        "{}",
        too_large.body
    );
    let nothing_asked = post_form(
        &gw,
        "/console/limit-requests",
        &cookie,
        Some(&csrf),
        &[("use_case", "chat bot"), ("tokens_per_minute", "")],
    )
    .await;
    assert_eq!(nothing_asked.status, StatusCode::BAD_REQUEST);
    let forged = post_form(
        &gw,
        "/console/limit-requests",
        &cookie,
        None,
        &[("use_case", "forged"), ("tokens_per_minute", "9")],
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let other_site = Page::of(
        browser()
            .post(format!("{}/console/limit-requests", gw.url))
            .header("cookie", &cookie)
            .header("origin", "https://evil.example")
            .form(&[
                ("csrf", csrf.as_str()),
                ("use_case", "x"),
                ("tokens_per_minute", "9"),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(other_site.status, StatusCode::FORBIDDEN);
    assert!(
        other_site.body.contains("sent from another site"),
        "{}",
        other_site.body
    );
    let (_, listed) = gw
        .admin(reqwest::Method::GET, "/limit-requests", None)
        .await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "{listed}");

    // Filed: the workspace's own request, with its expected volume, as the API shows it. Its
    // use case is long, and in French: within the 4096 bytes allowed, but more than 4096 once
    // URL-encoded (such a form used to be refused as invalid, the text lost).
    let use_case = format!("Support bot <for> 3 teams{}", " équipe".repeat(400));
    assert!(use_case.len() <= 4096);
    let sent = post_form(
        &gw,
        "/console/limit-requests",
        &cookie,
        Some(&csrf),
        &[
            ("use_case", use_case.as_str()),
            ("tokens_per_minute", "1,000,000"),
            ("tokens_per_month", "2,000,000,000"),
            ("requests_per_second", ""),
            ("expected_volume", "2M tokens a day"),
        ],
    )
    .await;
    assert!(
        sent.redirects_to("/console/workspace?done=requested"),
        "{} {}",
        sent.status,
        sent.body
    );
    let (s, mine) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/limit-requests?workspace_id={ws}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let request = &mine["data"][0];
    assert_eq!(request["use_case"], use_case.as_str());
    assert_eq!(request["expected_volume"], "2M tokens a day");
    assert_eq!(
        request["requested_limits"],
        json!({"tokens_per_minute": 1000000, "tokens_per_month": 2000000000u64})
    );
    let id = request["id"].as_i64().unwrap();
    let (_, audit) = gw
        .admin(
            reqwest::Method::GET,
            "/audit?action=limit_request.create",
            None,
        )
        .await;
    assert_eq!(
        audit["data"][0]["actor"],
        format!("workspace:{ws}"),
        "{audit}"
    );

    let page = get(&gw, "/console/workspace?done=requested", Some(&cookie)).await;
    assert!(page.body.contains("Your request was sent"));
    assert!(page.body.contains("Support bot &lt;for&gt; 3 teams"));
    assert!(page.body.contains("Expected volume: 2M tokens a day"));
    assert_eq!(
        cell(&page.body, "data-request-id", &id.to_string(), "status"),
        "pending"
    );
    // A notice is only ever one of the page's own texts.
    let page = get(&gw, "/console/workspace?done=%3Cscript%3E", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        !page.body.contains("script&gt;") && !without_own_script(&page.body).contains("<script")
    );

    // The operator grants other limits than asked: the page says so, and the gateway enforces
    // them on the next request.
    let (s, _) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/limit-requests/{id}/approve"),
            Some(json!({"limits": {"tokens_per_minute": 600000}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    assert_eq!(
        cell(&page.body, "data-request-id", &id.to_string(), "status"),
        "approved"
    );
    assert!(
        cell(&page.body, "data-request-id", &id.to_string(), "answer")
            .starts_with("Granted: tokens_per_minute 600000")
    );
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("600000"));

    // A denial shows its reason, escaped.
    let sent = post_form(
        &gw,
        "/console/limit-requests",
        &cookie,
        Some(&csrf),
        &[("use_case", "more"), ("tokens_per_month", "5000000000")],
    )
    .await;
    assert_eq!(sent.status, StatusCode::SEE_OTHER);
    let (_, pending) = gw
        .admin(reqwest::Method::GET, "/limit-requests?status=pending", None)
        .await;
    let second = pending["data"][0]["id"].as_i64().unwrap();
    assert!(pending["data"][0]["expected_volume"].is_null());
    let (s, _) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/limit-requests/{second}/deny"),
            Some(json!({"reason": "Not before <b>January</b>"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    assert_eq!(
        cell(&page.body, "data-request-id", &second.to_string(), "status"),
        "denied"
    );
    assert!(
        cell(&page.body, "data-request-id", &second.to_string(), "answer")
            .starts_with("Denied: Not before &lt;b&gt;January&lt;/b&gt;")
    );

    // A pending request can be withdrawn from the page; an answered one cannot.
    let sent = post_form(
        &gw,
        "/console/limit-requests",
        &cookie,
        Some(&csrf),
        &[("use_case", "again"), ("tokens_per_month", "6000000000")],
    )
    .await;
    assert_eq!(sent.status, StatusCode::SEE_OTHER);
    let (_, pending) = gw
        .admin(reqwest::Method::GET, "/limit-requests?status=pending", None)
        .await;
    let third = pending["data"][0]["id"].as_i64().unwrap();
    let withdraw = |id: i64| format!("/console/limit-requests/{id}/withdraw");
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    let form = |id: i64| format!(r#"action="{}""#, withdraw(id));
    assert!(page.body.contains(&form(third)), "{}", page.body);
    assert!(!page.body.contains(&form(second)) && !page.body.contains(&form(id)));
    // Behind a first click, saying what it does.
    assert!(
        page.body.contains(&format!(
            r#"<details class="withdraw"><summary>Withdraw…</summary><form class="withdraw" method="post" {}"#,
            form(third)
        )),
        "{}",
        page.body
    );
    assert!(page.body.contains(&format!(
        "Withdraw request {third} now: it cannot be undone"
    )));
    let forged = post_form(&gw, &withdraw(third), &cookie, None, &[]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let (_, other_key) = gw.workspace("free").await;
    let theirs = gw
        .post(
            &other_key,
            "/v1/limit-requests",
            json!({"use_case": "theirs", "requested_limits": {"tokens_per_month": 6000000000u64}}),
            &[],
        )
        .await;
    let theirs = theirs.json::<Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    let refused = post_form(&gw, &withdraw(theirs), &cookie, Some(&csrf), &[]).await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    let done = post_form(&gw, &withdraw(third), &cookie, Some(&csrf), &[]).await;
    assert!(
        done.redirects_to("/console/workspace?done=withdrawn"),
        "{} {}",
        done.status,
        done.body
    );
    let page = get(&gw, "/console/workspace?done=withdrawn", Some(&cookie)).await;
    assert!(page.body.contains("Your request was withdrawn"));
    assert_eq!(
        cell(&page.body, "data-request-id", &third.to_string(), "status"),
        "withdrawn"
    );
    let again = post_form(&gw, &withdraw(third), &cookie, Some(&csrf), &[]).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(again.body.contains("already withdrawn"), "{}", again.body);
    let (_, theirs) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/limit-requests/{theirs}"),
            None,
        )
        .await;
    assert_eq!(
        theirs["status"], "pending",
        "another workspace's is left alone"
    );
}

#[tokio::test]
async fn limit_requests_take_an_optional_expected_volume() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;
    let ask = |body: Value| {
        let gw = &gw;
        let key = key.clone();
        async move {
            let r = gw.post(&key, "/v1/limit-requests", body, &[]).await;
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (s, made) = ask(json!({"use_case": "x", "requested_limits": {"tokens_per_minute": 1_000_000}, "expected_volume": "  10k a day "})).await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    assert_eq!(made["expected_volume"], "10k a day");
    let (s, made) =
        ask(json!({"use_case": "x", "requested_limits": {"tokens_per_minute": 1_000_000}})).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(made["expected_volume"].is_null());
    for bad in [json!(""), json!("x".repeat(4097)), json!("a\u{1}b")] {
        let (s, e) = ask(json!({"use_case": "x", "requested_limits": {"tokens_per_minute": 1_000_000}, "expected_volume": bad})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains("expected_volume"),
            "{e}"
        );
    }
    let (s, _) = ask(json!({"use_case": "x", "requested_limits": {"tokens_per_minute": 1_000_000}, "expected_volume": 5})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn console_revokes_the_workspaces_own_keys_and_no_other() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    let spare = gw.key(ws).await;
    let (other_ws, other_key) = gw.workspace("free").await;
    let cookie = signed_in(&gw, &key).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    let csrf = page.csrf();
    let ids = key_ids(&gw, ws).await;
    let other_ids = key_ids(&gw, other_ws).await;
    assert!(page
        .body
        .contains(&format!("action=\"/console/keys/{}/revoke\"", ids[1])));
    // The button that revokes is behind a first click, and says what it does.
    let opened = page
        .body
        .find(r#"<details class="revoke"><summary>Revoke…</summary><form class="revoke""#);
    assert!(opened.is_some(), "{}", page.body);
    assert!(page
        .body
        .contains("now: it cannot be undone (signs you out)"));

    // Another workspace's key, a key that does not exist, an id that is not one: 404, and the
    // other workspace's key still works.
    for id in [other_ids[0].to_string(), "999999".into(), "x".into()] {
        let r = post_form(
            &gw,
            &format!("/console/keys/{id}/revoke"),
            &cookie,
            Some(&csrf),
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{id}");
    }
    assert_eq!(
        gw.chat(&other_key, hello(), &[]).await.status(),
        StatusCode::OK
    );
    // Without the form token: refused, the key still works.
    let r = post_form(
        &gw,
        &format!("/console/keys/{}/revoke", ids[1]),
        &cookie,
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(gw.chat(&spare, hello(), &[]).await.status(), StatusCode::OK);

    gw.advance(Duration::from_secs(2));
    let r = post_form(
        &gw,
        &format!("/console/keys/{}/revoke", ids[1]),
        &cookie,
        Some(&csrf),
        &[],
    )
    .await;
    assert!(
        r.redirects_to("/console/workspace?done=revoked"),
        "{} {}",
        r.status,
        r.body
    );
    assert_eq!(
        gw.chat(&spare, hello(), &[]).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (_, audit) = gw
        .admin(reqwest::Method::GET, "/audit?action=key.revoke", None)
        .await;
    assert_eq!(
        audit["data"][0]["actor"],
        format!("workspace:{ws}"),
        "{audit}"
    );
    let page = get(&gw, "/console/workspace?done=revoked", Some(&cookie)).await;
    assert!(page.body.contains("The key was revoked"));
    assert!(!page
        .body
        .contains(&format!("action=\"/console/keys/{}/revoke\"", ids[1])));

    // Revoking the session's own key ends the session.
    let r = post_form(
        &gw,
        &format!("/console/keys/{}/revoke", ids[0]),
        &cookie,
        Some(&csrf),
        &[],
    )
    .await;
    assert!(r.redirects_to("/console"), "{}", r.status);
    assert!(get(&gw, "/console/workspace", Some(&cookie))
        .await
        .redirects_to("/console"));
    assert_eq!(
        gw.chat(&key, hello(), &[]).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn the_old_limits_page_redirects_to_the_console() {
    let gw = TestGateway::start().await;
    let page = get(&gw, "/limits", None).await;
    assert_eq!(page.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(page.location.as_deref(), Some("/console/workspace"));
    // Without a session, the console asks to sign in first.
    assert!(get(&gw, "/console/workspace", None)
        .await
        .redirects_to("/console"));
}

#[tokio::test]
async fn console_and_limits_show_each_models_own_limits_with_their_usage() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        TIER,
        json!({
            "tokens_per_minute": 100000,
            "models": {
                "mistral-large-latest": {"tokens_per_minute": 2000, "tokens_per_month": 50000},
                "mistral-small-latest": {"tokens_per_month": 9000}
            }
        }),
    )
    .await;
    let (_, key) = gw.workspace(TIER).await;
    let mut large = hello();
    large["model"] = json!("mistral-large-latest");
    let r = gw.chat(&key, large, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let used = r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
        .as_u64()
        .unwrap();
    assert!(used > 0);

    // The API: each model with limits of its own, what it used of them.
    let usage = eventually_settled(&gw, &key).await;
    let models = usage["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{usage}");
    let of = |name: &str| models.iter().find(|m| m["model"] == name).unwrap().clone();
    let l = of("mistral-large-latest");
    assert_eq!(l["tokens_per_minute"]["remaining"], 2000 - used);
    assert_eq!(l["tokens_per_month"]["used"], used);
    assert_eq!(l["tokens_per_month"]["remaining"], 50000 - used);
    let s = of("mistral-small-latest");
    assert!(s["tokens_per_minute"].is_null());
    assert_eq!(s["tokens_per_month"]["used"], 0);

    // The page: a bar per model limit, with the same figures.
    let cookie = signed_in(&gw, &key).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    let row = |model: &str, limit: &str| {
        let at = page
            .body
            .find(&format!(r#"data-model="{model}" data-limit="{limit}""#))
            .unwrap_or_else(|| panic!("no row {model} {limit}: {}", page.body));
        page.body[at..].split("</tr>").next().unwrap().to_string()
    };
    let minute = row("mistral-large-latest", "tokens_per_minute");
    assert!(minute.contains("<meter"), "{minute}");
    assert!(
        minute.contains(&format!(
            "<span class=\"remaining\">{}</span> of 2000",
            2000 - used
        )),
        "{minute}"
    );
    let month = row("mistral-large-latest", "tokens_per_month");
    assert!(
        month.contains(&format!("<span class=\"used\">{used}</span> of 50000")),
        "{month}"
    );
    assert!(row("mistral-small-latest", "tokens_per_month")
        .contains("<span class=\"used\">0</span> of 9000"));
    assert!(!page
        .body
        .contains(r#"data-model="mistral-small-latest" data-limit="tokens_per_minute""#));
}

/// `usage` of `/v1/limits` once nothing is reserved any more (the settlement has landed).
async fn eventually_settled(gw: &TestGateway, key: &str) -> Value {
    let started = std::time::Instant::now();
    loop {
        let usage = gw.limits(key).await["usage"].clone();
        if usage["tokens_reserved"] == 0 {
            return usage;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{usage}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A console path that is no page gets the console's own `404` page, not the API's JSON (a
/// browser showed raw JSON for `/console/` and a mistyped link).
#[tokio::test]
async fn a_console_path_that_is_no_page_gets_a_page() {
    let gw = TestGateway::start().await;
    for path in [
        "/console/",
        "/console/nope",
        "/console/operator/nope/deeper",
    ] {
        let r = browser()
            .get(format!("{}{path}", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        let kind = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(kind.starts_with("text/html"), "{path}: {kind}");
        let body = r.text().await.unwrap();
        assert!(body.contains(r#"href="/console""#), "{path}: {body}");
    }
    // The API's own unknown paths keep their JSON.
    let r = browser()
        .get(format!("{}/admin/v1/nope", gw.url))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
}

/// The requests/s bar is of what may be sent at once (the burst), not of the rate: with a burst
/// of 3 under a rate of 5, an idle workspace's bar is empty (it showed 2 of 5 in use).
#[tokio::test]
async fn the_requests_bar_is_of_the_burst() {
    let gw = TestGateway::start().await;
    gw.put_tier("bursty", json!({"requests_per_second": 5, "burst": 3}))
        .await;
    let (_, key) = gw.workspace("bursty").await;
    let cookie = signed_in(&gw, &key).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    let row = page
        .body
        .split(r#"<tr data-limit="requests_per_second">"#)
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no requests row: {}", page.body));
    assert!(
        row.contains(r#"<meter min="0" max="3" value="0" aria-label="Requests per second: used of the limit">"#),
        "{row}"
    );
    assert!(row.contains("3</span> of 3 at once left"), "{row}");
    assert!(row.contains("5 per second"), "{row}");
}

/// A limit in shadow is shown as such, with its figure: it read "no limit", as if none were set
/// (an outside audit).
#[tokio::test]
async fn a_limit_in_shadow_is_shown_with_its_figure() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "watched",
        json!({"requests_per_second": 5, "tokens_per_minute": 5000, "shadow": ["tokens_per_minute"]}),
    )
    .await;
    let (ws, key) = gw.workspace("watched").await;
    let cookie = signed_in(&gw, &key).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    let row = page
        .body
        .split(r#"<tr data-limit="tokens_per_minute">"#)
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no tokens row: {}", page.body));
    assert!(row.contains("in shadow"), "{row}");
    assert!(row.contains("5000 tokens"), "{row}");
    assert!(!row.contains("no limit"), "{row}");

    // The operator's page of the workspace: its effective figure, not "—" (no limit).
    let op = crate::console_operator::Operator::sign_in(&gw.url, ADMIN).await;
    let page = op.get(&format!("/console/operator/workspaces/{ws}")).await;
    let row = page
        .body
        .split(r#"<tr data-limit="tokens_per_minute">"#)
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no tokens row: {}", page.body));
    assert!(
        row.contains(r#"<td class="effective">in shadow: 5000</td>"#),
        "{row}"
    );
}

/// A month limit in shadow is shown under the budget the workspace set and that is enforced
/// (an outside audit: it appeared nowhere on the page).
#[tokio::test]
async fn a_month_limit_in_shadow_is_shown_beside_an_enforced_budget() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "watched-month",
        json!({"requests_per_second": 5, "tokens_per_month": 600, "shadow": ["tokens_per_month"]}),
    )
    .await;
    let (_, key) = gw.workspace("watched-month").await;
    let r = gw
        .client
        .put(format!("{}/v1/budget", gw.url))
        .bearer_auth(&key)
        .json(&json!({"tokens_per_month": 590}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = signed_in(&gw, &key).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    let row = page
        .body
        .split(r#"<tr data-limit="tokens_per_month">"#)
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no month row: {}", page.body));
    assert!(row.contains("of 590 tokens used"), "{row}");
    assert!(row.contains("(your own budget)"), "{row}");
    assert!(
        row.contains(r#"in shadow: <span class="shadow">600 tokens</span>"#),
        "{row}"
    );

    // On a tier of the ladder, its own shadow set by the operator: the ladder's "Yours now"
    // and the operator's "Effective" say both, the budget as the workspace's (an outside
    // audit: the budget alone, unmarked, read as the tier's quota).
    let (ws, key) = gw.workspace("tier-2").await;
    let (s, v) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"shadow": ["tokens_per_month"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = gw
        .client
        .put(format!("{}/v1/budget", gw.url))
        .bearer_auth(&key)
        .json(&json!({"tokens_per_month": 777777}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = signed_in(&gw, &key).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    let ladder = page
        .body
        .split(r#"id="ladder""#)
        .nth(1)
        .unwrap_or_else(|| panic!("no ladder: {}", page.body));
    let now = cell(ladder, "data-limit", "tokens_per_month", "now");
    assert!(now.starts_with("in shadow: "), "{now}");
    assert!(now.ends_with("; your own budget: 777777"), "{now}");
    let op = crate::console_operator::Operator::sign_in(&gw.url, ADMIN).await;
    let page = op.get(&format!("/console/operator/workspaces/{ws}")).await;
    let effective = cell(&page.body, "data-limit", "tokens_per_month", "effective");
    assert!(effective.starts_with("in shadow: "), "{effective}");
    assert!(
        effective.ends_with("; its own budget: 777777"),
        "{effective}"
    );
}

/// A model's limits in shadow are shown too, on the workspace's page and on the operator's: they
/// appeared nowhere, or as "—" beside the model's enforced month (an outside audit).
#[tokio::test]
async fn a_models_limits_in_shadow_are_shown_with_their_figures() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "watched-models",
        json!({
            "requests_per_second": 5,
            "models": {
                "m": {"tokens_per_minute": 100, "tokens_per_month": 100000},
                "q": {"tokens_per_minute": 5000, "tokens_per_month": 1000},
            },
            "shadow": ["model_tokens_per_minute", "model_tokens_per_month"],
        }),
    )
    .await;
    let (ws, key) = gw.workspace("watched-models").await;
    let cookie = signed_in(&gw, &key).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    let row = |body: &str, start: &str| -> String {
        body.split(start)
            .nth(1)
            .and_then(|rest| rest.split("</tr>").next())
            .unwrap_or_else(|| panic!("no row {start}: {body}"))
            .to_owned()
    };
    for (model, limit, figure) in [
        ("m", "tokens_per_minute", "100 tokens"),
        ("m", "tokens_per_month", "100000 tokens"),
        ("q", "tokens_per_minute", "5000 tokens"),
        ("q", "tokens_per_month", "1000 tokens"),
    ] {
        let r = row(
            &page.body,
            &format!(r#"<tr data-model="{model}" data-limit="{limit}">"#),
        );
        assert!(r.contains("in shadow"), "{model} {limit}: {r}");
        assert!(r.contains(figure), "{model} {limit}: {r}");
    }
    let op = crate::console_operator::Operator::sign_in(&gw.url, ADMIN).await;
    let page = op.get(&format!("/console/operator/workspaces/{ws}")).await;
    let r = row(&page.body, r#"<tr data-model="m">"#);
    assert!(
        r.contains("<td>in shadow: 100</td><td>in shadow: 100000</td>"),
        "{r}"
    );
    let r = row(&page.body, r#"<tr data-model="q">"#);
    assert!(
        r.contains("<td>in shadow: 5000</td><td>in shadow: 1000</td>"),
        "{r}"
    );
}

/// A key with a month limit of its own shows, beside it, what the key used of it this month.
#[tokio::test]
async fn a_keys_own_month_limit_shows_what_it_used() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    let id = key_ids(&gw, ws).await[0];
    let (s, body) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/keys/{id}"),
            Some(json!({"limits": {"tokens_per_month": 1000}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let r = gw.chat(&key, hello(), &[("x-mock-usage", "3,4")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(gw.exact_usage(&key).await["tokens_this_month"], 7);
    let cookie = signed_in(&gw, &key).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    assert!(
        page.body.contains(
            r#"<span class="note key-month-used" data-tokens="7">7 used this month</span>"#
        ),
        "{}",
        page.body
    );
}

/// A workspace's changes in the console share its change budget with the API (60, then one
/// every 2 s): past it, the page again with when to try, `429` as the API's (an outside audit:
/// a `503` page saying the console could not read the workspace's usage). Nothing changed.
#[tokio::test]
async fn console_changes_past_the_workspace_s_budget_of_changes_are_a_429() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_month": 1_000_000})).await;
    let cookie = signed_in(&gw, &key).await;
    let page = get(&gw, "/console/workspace", Some(&cookie)).await;
    let csrf = page.csrf();
    for i in 0..60 {
        let r = gw
            .client
            .put(format!("{}/v1/budget", gw.url))
            .bearer_auth(&key)
            .json(&json!({"tokens_per_month": 1_000 + i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{i}");
    }
    let refused = post_form(
        &gw,
        "/console/budget",
        &cookie,
        Some(&csrf),
        &[("tokens_per_month", "5")],
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.body
    );
    assert!(
        refused.body.contains("Too many changes"),
        "{}",
        refused.body
    );
    let asked = post_form(
        &gw,
        "/console/limit-requests",
        &cookie,
        Some(&csrf),
        &[("use_case", "x"), ("tokens_per_month", "6000000")],
    )
    .await;
    assert_eq!(asked.status, StatusCode::TOO_MANY_REQUESTS);
    let (_, budget) = gw.admin(reqwest::Method::GET, "/workspaces/1", None).await;
    assert_eq!(budget["budget"]["tokens_per_month"], 1_059, "{budget}");
}
