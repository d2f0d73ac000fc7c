//! The console's operator side (`/console/operator/…`): sign-in with an admin token, each page,
//! the workspaces' search, sort and pages, every change form taking effect on the next proxied
//! request and audited as the token's name, the form checks (CSRF, `Origin`), workspace
//! sessions refused, the admin listener, a removed or rotated token ending its sessions, and
//! escaping. Real HTTP to a real gateway, with the workspace console's client (`console`),
//! which follows no redirect, so every `Location` and `Set-Cookie` is checked.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tiergate::clock::Clock;
use tiergate::config::{RawAdminToken, RawSettings};

use crate::console::{browser, Page};
use crate::harness::*;

const ALICE: &str = "alice-console-token-0123456789";
const BOB: &str = "bob-console-token-0123456789";
const HOME: &str = "/console/operator/workspaces";

fn tokens(list: &[(&str, &str)]) -> RawSettings {
    RawSettings {
        admin_tokens: Some(
            list.iter()
                .map(|(name, token)| RawAdminToken {
                    name: name.to_string(),
                    token: token.to_string(),
                })
                .collect(),
        ),
        ..RawSettings::default()
    }
}

/// A gateway with the admin tokens `admin` (the harness's), `alice` and `bob`.
async fn gateway(admin_listener: bool) -> TestGateway {
    TestGateway::start_with(Options {
        raw: tokens(&[("alice", ALICE), ("bob", BOB)]),
        admin_listener,
        ..Options::default()
    })
    .await
}

async fn sign_in_at(base: &str, secret: &str, headers: &[(&str, &str)]) -> Page {
    let mut req = browser()
        .post(format!("{base}/console/sign-in"))
        .form(&[("key", secret)]);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Page::of(req.send().await.unwrap()).await
}

async fn get_at(base: &str, path: &str, cookie: Option<&str>) -> Page {
    let mut req = browser().get(format!("{base}{path}"));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    Page::of(req.send().await.unwrap()).await
}

/// A form sent as a browser would, with exactly these fields and headers.
async fn post_at(
    base: &str,
    path: &str,
    cookie: Option<&str>,
    fields: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> Page {
    let mut req = browser().post(format!("{base}{path}")).form(fields);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Page::of(req.send().await.unwrap()).await
}

/// A signed-in operator's browser.
pub(crate) struct Operator {
    base: String,
    cookie: String,
    csrf: String,
}

impl Operator {
    pub(crate) async fn sign_in(base: &str, token: &str) -> Operator {
        let page = sign_in_at(base, token, &[]).await;
        assert!(page.redirects_to(HOME), "{}: {}", page.status, page.body);
        let cookie = page.session().expect("a session cookie");
        let home = get_at(base, HOME, Some(&cookie)).await;
        assert_eq!(home.status, StatusCode::OK, "{}", home.body);
        Operator {
            base: base.to_string(),
            cookie,
            csrf: home.csrf(),
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Page {
        get_at(&self.base, path, Some(&self.cookie)).await
    }

    /// The session's cookie (`tiergate_console=…`).
    pub(crate) fn cookie(&self) -> &str {
        &self.cookie
    }

    /// A form of the console's, with the session's token.
    pub(crate) async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        let mut all = vec![("csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        post_at(&self.base, path, Some(&self.cookie), &all, &[]).await
    }

    /// Follows a key's creation as a browser does (`303` to the key's page, its secret in a
    /// cookie for that path alone), and returns the secret that page shows once.
    pub(crate) async fn new_key(&self, made: &Page) -> String {
        assert_eq!(made.status, StatusCode::SEE_OTHER, "{}", made.body);
        let to = made.location.clone().expect("a redirect");
        assert!(
            to.starts_with("/console/operator/keys/") && to.ends_with("/created"),
            "{to}"
        );
        let set = made
            .set_cookie
            .iter()
            .find(|c| c.starts_with("tiergate_new_key="))
            .expect("the secret's cookie");
        for flag in [
            "HttpOnly",
            "SameSite=Strict",
            "Max-Age=300",
            &format!("Path={to};"),
        ] {
            assert!(set.contains(flag), "{flag} in {set}");
        }
        let carried = set.split(';').next().unwrap();
        let cookies = format!("{}; {carried}", self.cookie);
        let page = get_at(&self.base, &to, Some(&cookies)).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        assert!(
            page.set_cookie
                .iter()
                .any(|c| c.starts_with("tiergate_new_key=;") && c.contains("Max-Age=0")),
            "the cookie is cleared: {:?}",
            page.set_cookie
        );
        let secret = text_of(&page.body, "new-key");
        assert_eq!(format!("tiergate_new_key={secret}"), carried);
        // The site's cookies change as the secret is shown, and again on the next page, so
        // that a browser's back/forward cache drops the pages from before (see the console).
        let id = to
            .trim_start_matches("/console/operator/keys/")
            .trim_end_matches("/created");
        let shown = format!("tiergate_key_shown={id};");
        assert!(
            page.set_cookie
                .last()
                .is_some_and(|c| c.starts_with(&shown)),
            "{:?}",
            page.set_cookie
        );
        let next = get_at(
            &self.base,
            HOME,
            Some(&format!("{}; tiergate_key_shown={id}", self.cookie)),
        )
        .await;
        assert_eq!(next.status, StatusCode::OK);
        let since = format!("tiergate_key_shown={id}-done;");
        assert!(
            next.set_cookie.iter().any(|c| c.starts_with(&since)),
            "{:?}",
            next.set_cookie
        );
        let after = get_at(
            &self.base,
            HOME,
            Some(&format!("{}; tiergate_key_shown={id}-done", self.cookie)),
        )
        .await;
        assert!(after.set_cookie.is_empty(), "{:?}", after.set_cookie);
        // Once: the page again (a reload, the cookie gone) shows no secret.
        let again = get_at(&self.base, &to, Some(&self.cookie)).await;
        assert_eq!(again.status, StatusCode::GONE, "{}", again.body);
        assert!(!again.body.contains(&secret));
        // Nor does another key's page with this secret.
        let other = to.replace("/keys/", "/keys/9").to_string();
        let stray = get_at(&self.base, &other, Some(&cookies)).await;
        assert_eq!(stray.status, StatusCode::GONE, "{}", stray.body);
        assert!(!stray.body.contains(&secret));
        secret
    }
}

/// The ids of the `data-ATTR="N"` rows of a page, in order.
fn ids(body: &str, attr: &str) -> Vec<i64> {
    body.split(&format!("{attr}=\""))
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().parse().unwrap())
        .collect()
}

/// The text of the element with `id="ID"` (no markup inside it).
fn text_of(body: &str, id: &str) -> String {
    let at = body
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {body}"));
    let rest = &body[at..];
    let start = rest.find('>').unwrap() + 1;
    rest[start..].split('<').next().unwrap().to_string()
}

/// `x-ratelimit-limit-tokens` (tokens per minute) on the next proxied request of `key`.
async fn tokens_limit(gw: &TestGateway, key: &str) -> u64 {
    let r = gw.chat(key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let limit = header_u64(&r, "x-ratelimit-limit-tokens");
    r.text().await.unwrap();
    limit
}

/// The audit log's `(actor, action)` pairs, newest first, through the admin API.
async fn audit(gw: &TestGateway, query: &str) -> Vec<(String, String)> {
    let (s, v) = gw.admin(Method::GET, &format!("/audit{query}"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn create_workspace(gw: &TestGateway, name: &str, tier: &str) -> i64 {
    let (s, ws) = gw
        .admin(
            Method::POST,
            "/workspaces",
            Some(json!({"name": name, "tier": tier})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ws}");
    ws["id"].as_i64().unwrap()
}

async fn ask(gw: &TestGateway, key: &str, use_case: &str, limits: Value) -> i64 {
    let r = gw
        .post(
            key,
            "/v1/limit-requests",
            json!({"use_case": use_case, "requested_limits": limits}),
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
}

async fn put_tiers(gw: &TestGateway) {
    gw.put_tier(
        "small",
        json!({"requests_per_second": 100, "tokens_per_minute": 100000}),
    )
    .await;
    gw.put_tier(
        "big",
        json!({"requests_per_second": 100, "tokens_per_minute": 200000}),
    )
    .await;
}

#[tokio::test]
async fn operator_signs_in_with_an_admin_token_and_sees_each_page() {
    let gw = gateway(false).await;
    let ws = create_workspace(&gw, "acme", "free").await;

    let form = get_at(&gw.url, "/console", None).await;
    assert!(form.body.contains(r#"<form id="sign-in" method="post""#));
    assert!(form.body.contains("Workspace API key or admin token"));

    let signed = sign_in_at(&gw.url, ALICE, &[]).await;
    assert!(signed.redirects_to(HOME), "{}", signed.body);
    let set = &signed.set_cookie[0];
    for flag in ["HttpOnly", "SameSite=Lax", "Path=/console", "Max-Age=43200"] {
        assert!(set.contains(flag), "{flag} in {set}");
    }
    assert!(
        set.starts_with("tiergate_console=op."),
        "an operator's cookie: {set}"
    );
    assert!(!set.contains(ALICE) && !set.contains("alice"), "{set}");
    let op = Operator::sign_in(&gw.url, ALICE).await;

    // Signed in, /console leads to the operator's pages; the workspace page is not theirs
    // (sent back to /console, the cookie kept).
    assert!(op.get("/console").await.redirects_to(HOME));
    assert!(op.get("/console/operator").await.redirects_to(HOME));
    let page = op.get("/console/workspace").await;
    assert!(page.redirects_to("/console"), "{}", page.status);
    assert!(page.set_cookie.is_empty());

    for (path, shows) in [
        (HOME.to_string(), format!("data-workspace-id=\"{ws}\"")),
        (format!("{HOME}/{ws}"), "<h1>acme</h1>".to_string()),
        (
            "/console/operator/requests".into(),
            "No request here.".into(),
        ),
        (
            "/console/operator/tiers".into(),
            "data-tier=\"free\"".into(),
        ),
        (
            "/console/operator/audit".into(),
            "workspace.create".to_string(),
        ),
    ] {
        let page = op.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
        assert!(
            page.body.contains(&shows),
            "{path}: {shows} in {}",
            page.body
        );
        let nav = page.body.split("<nav").nth(1).expect("a nav");
        let nav = nav.split("</nav>").next().unwrap();
        for link in [
            ">Workspaces</a>",
            ">Requests</a>",
            ">Tiers</a>",
            "id=\"sign-out\"",
            ">Sign out</button>",
        ] {
            assert!(nav.contains(link), "{path}: {link} in {nav}");
        }
        assert!(nav.contains("<strong>alice</strong>"), "{nav}");
        // Ids are what the browser tests select by: each once.
        let mut seen = std::collections::BTreeSet::new();
        for id in page.body.split(" id=\"").skip(1) {
            let id = id.split('"').next().unwrap();
            assert!(seen.insert(id.to_string()), "{path}: id {id} twice");
        }
    }
    for missing in ["999999", "abc", "0"] {
        let page = op.get(&format!("{HOME}/{missing}")).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{missing}");
        // Titled by what happened, with a way back.
        assert!(page.body.contains("<h1>Not Found</h1>"), "{}", page.body);
        assert!(page.body.contains("<title>Not Found"), "{}", page.body);
    }

    // Sessions expire as a workspace's do; sign-out clears the cookie.
    let page = post_at(
        &gw.url,
        "/console/sign-out",
        Some(&op.cookie),
        &[("csrf", &op.csrf)],
        &[],
    )
    .await;
    assert!(page.redirects_to("/console"));
    assert!(page.clears_session());
    let op = Operator::sign_in(&gw.url, BOB).await;
    gw.advance(Duration::from_secs(12 * 3600));
    let page = op.get(HOME).await;
    assert!(page.redirects_to("/console"), "{}", page.status);
    assert!(page.clears_session());
}

#[tokio::test]
async fn the_workspaces_are_searched_sorted_and_paged() {
    let gw = gateway(false).await;
    let mut made = Vec::new();
    for i in 0..117 {
        let name = match i % 3 {
            0 => format!("alpha-{i:03}"),
            1 => format!("Beta {i:03}"),
            _ => format!("gamma_{i:03}"),
        };
        made.push((create_workspace(&gw, &name, "free").await, name));
    }
    // Three with usage this month, through the gateway.
    let mut used = Vec::new();
    for (name, tokens) in [
        ("used-small", "300,0"),
        ("used-big", "5000,0"),
        ("used-mid", "1000,0"),
    ] {
        let id = create_workspace(&gw, name, "free").await;
        let key = gw.key(id).await;
        let r = gw.chat(&key, hello(), &[("x-mock-usage", tokens)]).await;
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.unwrap();
        made.push((id, name.to_string()));
        used.push(id);
    }
    let op = Operator::sign_in(&gw.url, ALICE).await;
    let all: Vec<i64> = made.iter().map(|(id, _)| *id).collect();

    // Pages of 50 by id, with links to the next and the previous.
    let mut walked = Vec::new();
    for page in 1..=3 {
        let p = op.get(&format!("{HOME}?page={page}")).await;
        assert_eq!(p.status, StatusCode::OK);
        assert_eq!(text_of(&p.body, "total"), "120");
        assert_eq!(text_of(&p.body, "page"), page.to_string());
        let rows = ids(&p.body, "data-workspace-id");
        assert_eq!(rows.len(), if page < 3 { 50 } else { 20 }, "page {page}");
        assert_eq!(p.body.contains("rel=\"next\""), page < 3);
        assert_eq!(p.body.contains("rel=\"prev\""), page > 1);
        walked.extend(rows);
    }
    assert_eq!(walked, all);
    let past = op.get(&format!("{HOME}?page=4")).await;
    assert!(ids(&past.body, "data-workspace-id").is_empty());
    // Said so, with the way back (it read "page 4 of 3" over an empty table: an outside audit).
    assert!(
        text_of(&past.body, "no-workspaces").contains("There is no page 4"),
        "{}",
        past.body
    );
    assert!(
        past.body.contains("page=3\">Go to the last page"),
        "{}",
        past.body
    );
    assert!(
        !past.body.contains("id=\"page\""),
        "no \"page 4 of 3\": {}",
        past.body
    );
    let none = op.get(&format!("{HOME}?q=zzz-nothing")).await;
    assert!(text_of(&none.body, "no-workspaces").contains("No workspace matches"));

    // By usage, most first (once the settlements are in the ledger).
    let expected = [used[1], used[2], used[0]];
    eventually(Duration::from_secs(5), "usage in the listing", || async {
        let p = op.get(&format!("{HOME}?sort=usage&dir=desc")).await;
        ids(&p.body, "data-workspace-id")[..3] == expected
    })
    .await;
    let p = op.get(&format!("{HOME}?sort=usage&dir=desc")).await;
    assert!(p.body.contains("data-tokens=\"5000\""), "{}", p.body);
    // The column's header now sorts the other way.
    assert!(p.body.contains("sort=usage&amp;dir=asc&amp;page=1"));

    // By name, each way, as sorted here (either case alike); ties never.
    let mut by_name = made.clone();
    by_name.sort_by_key(|(id, name)| (name.to_ascii_lowercase(), *id));
    let names: Vec<i64> = by_name.iter().map(|(id, _)| *id).collect();
    let p = op.get(&format!("{HOME}?sort=name")).await;
    assert_eq!(ids(&p.body, "data-workspace-id"), names[..50]);
    let p = op.get(&format!("{HOME}?sort=name&dir=desc&page=3")).await;
    let mut reversed = names.clone();
    reversed.reverse();
    assert_eq!(ids(&p.body, "data-workspace-id"), reversed[100..]);

    // A search by a part of the name in any case, kept across the sort links and pages.
    let p = op.get(&format!("{HOME}?q=BETA&sort=name&dir=desc")).await;
    assert_eq!(text_of(&p.body, "total"), "39");
    let mut betas: Vec<&(i64, String)> =
        made.iter().filter(|(_, n)| n.starts_with("Beta")).collect();
    betas.sort_by_key(|(_, n)| std::cmp::Reverse(n.clone()));
    assert_eq!(
        ids(&p.body, "data-workspace-id"),
        betas.iter().map(|(id, _)| *id).collect::<Vec<_>>()
    );
    assert!(p.body.contains("q=BETA&amp;sort=name"));
    assert!(p.body.contains(r#"name="q" value="BETA""#));
    // And by id.
    let target = made[42].0;
    let p = op.get(&format!("{HOME}?q={target}")).await;
    assert!(ids(&p.body, "data-workspace-id").contains(&target));

    // What is not a listing's parameter is refused, saying which.
    for bad in ["sort=password", "dir=sideways", "page=0", "page=x"] {
        let p = op.get(&format!("{HOME}?{bad}")).await;
        assert_eq!(p.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(p.body.contains("class=\"error\""), "{bad}");
    }
}

#[tokio::test]
async fn workspace_changes_hold_on_the_next_request_and_are_audited_as_the_token() {
    let gw = gateway(false).await;
    put_tiers(&gw).await;
    let (ws, key) = gw.workspace("small").await;
    let op = Operator::sign_in(&gw.url, ALICE).await;
    let at = |what: &str| format!("{HOME}/{ws}/{what}");
    let back = |done: &str| format!("{HOME}/{ws}?done={done}");
    assert_eq!(tokens_limit(&gw, &key).await, 100000);

    // The tier.
    let page = op.post(&at("tier"), &[("tier", "big")]).await;
    assert!(page.redirects_to(&back("tier")), "{}", page.body);
    assert_eq!(tokens_limit(&gw, &key).await, 200000);
    let page = op.get(&back("tier")).await;
    assert!(page.body.contains("Tier changed."));
    assert!(page.body.contains(r#"<strong id="tier">big</strong>"#));
    let page = op.post(&at("tier"), &[("tier", "platinum")]).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("unknown tier"), "{}", page.body);
    assert!(
        page.body.contains(r#"<form id="overrides""#),
        "the page again"
    );

    // An override set, then cleared; only the fields edited count.
    let page = op
        .post(
            &at("overrides"),
            &[
                ("tokens_per_minute", "777"),
                ("was_tokens_per_minute", ""),
                ("burst", ""),
                ("was_burst", ""),
            ],
        )
        .await;
    assert!(page.redirects_to(&back("overrides")), "{}", page.body);
    assert_eq!(tokens_limit(&gw, &key).await, 777);
    let page = op.get(&format!("{HOME}/{ws}")).await;
    assert!(page
        .body
        .contains(r#"name="tokens_per_minute" value="777""#));
    let page = op
        .post(
            &at("overrides"),
            &[("tokens_per_minute", ""), ("was_tokens_per_minute", "777")],
        )
        .await;
    assert!(page.redirects_to(&back("overrides")));
    assert_eq!(tokens_limit(&gw, &key).await, 200000);
    let page = op
        .post(&at("overrides"), &[("burst", "0"), ("was_burst", "")])
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("burst must be from 1"), "{}", page.body);
    let page = op
        .post(&at("overrides"), &[("burst", "lots"), ("was_burst", "")])
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(
        page.body.contains("'burst' must be a number"),
        "{}",
        page.body
    );
    let page = op
        .post(&at("overrides"), &[("burst", ""), ("was_burst", "")])
        .await;
    assert!(page.redirects_to(&back("unchanged")));

    // Suspended: the proxy refuses it; reactivated: it serves it again.
    let page = op.post(&at("status"), &[("status", "suspended")]).await;
    assert!(page.redirects_to(&back("suspended")));
    assert_eq!(
        gw.chat(&key, hello(), &[]).await.status(),
        StatusCode::FORBIDDEN
    );
    let page = op.post(&at("status"), &[("status", "active")]).await;
    assert!(page.redirects_to(&back("reactivated")));
    assert_eq!(tokens_limit(&gw, &key).await, 200000);

    // A key made: its secret shown once, never in a URL, and it works at once; then revoked.
    let keys_path = format!("/workspaces/{ws}/keys");
    let keys_now = || async {
        let (_, keys) = gw.admin(Method::GET, &keys_path, None).await;
        keys["data"].as_array().unwrap().len()
    };
    let before = keys_now().await;
    let page = op
        .post(&at("keys"), &[("name", "ci"), ("expires_at", "")])
        .await;
    let secret = op.new_key(&page).await;
    assert!(secret.starts_with("tg_"), "{secret}");
    assert!(!page.location.as_deref().unwrap().contains(&secret));
    assert_eq!(
        keys_now().await,
        before + 1,
        "one key, however often its page is read"
    );
    assert_eq!(tokens_limit(&gw, &secret).await, 200000);
    let page = op.get(&format!("{HOME}/{ws}")).await;
    assert!(!page.body.contains(&secret));
    assert!(page.body.contains(&secret[..8]), "its prefix is listed");
    let page = op
        .post(&at("keys"), &[("expires_at", "next tuesday")])
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("RFC 3339"), "{}", page.body);
    let (_, keys) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}/keys"), None)
        .await;
    let ci = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "ci")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let page = op
        .post(&format!("/console/operator/keys/{ci}/revoke"), &[])
        .await;
    assert!(page.redirects_to(&back("revoked")), "{}", page.body);
    assert_eq!(
        gw.chat(&secret, hello(), &[]).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let page = op.post("/console/operator/keys/999999/revoke", &[]).await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);

    // A key past its expiry is refused by the proxy, and listed as such, not as active.
    let soon = tiergate::http::views::Timestamp(gw.clock.now_secs() + 60).rfc3339();
    let page = op
        .post(&at("keys"), &[("name", "brief"), ("expires_at", &soon)])
        .await;
    let brief = op.new_key(&page).await;
    let status_of = |body: &str, prefix: &str| {
        let row = body.split("<tr data-key-id=").find(|r| r.contains(prefix));
        row.unwrap_or_else(|| panic!("no key {prefix}… in {body}"))
            .split("<td class=\"status\">")
            .nth(1)
            .unwrap()
            .split('<')
            .next()
            .unwrap()
            .to_string()
    };
    let page = op.get(&format!("{HOME}/{ws}")).await;
    assert_eq!(status_of(&page.body, &brief[..8]), "active");
    gw.clock.advance(Duration::from_secs(61));
    assert_eq!(
        gw.chat(&brief, hello(), &[]).await.status(),
        StatusCode::FORBIDDEN
    );
    let page = op.get(&format!("{HOME}/{ws}")).await;
    assert_eq!(status_of(&page.body, &brief[..8]), "expired");
    assert_eq!(status_of(&page.body, &secret[..8]), "revoked");

    // Each change audited once as alice (the admin API's actor for her token); the refused
    // ones not at all.
    let entries = audit(&gw, "?actor=alice").await;
    let actions: Vec<&str> = entries.iter().map(|(_, a)| a.as_str()).collect();
    assert_eq!(
        actions,
        [
            "key.create",
            "key.revoke",
            "key.create",
            "workspace.update",
            "workspace.update",
            "workspace.update",
            "workspace.update",
            "workspace.update",
        ]
    );
    let page = op.get("/console/operator/audit").await;
    assert!(page.body.contains("key.revoke"));
    assert!(page.body.contains(r#"<td class="actor">alice</td>"#));
    // Filtered as the admin API's audit is: by workspace, who and what.
    let actions_of = |body: &str| -> Vec<String> {
        body.split(r#"<td class="action">"#)
            .skip(1)
            .map(|s| s.split('<').next().unwrap().to_string())
            .collect()
    };
    let page = op
        .get(&format!(
            "/console/operator/audit?workspace={ws}&actor=alice&action=key.create"
        ))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(actions_of(&page.body), ["key.create", "key.create"]);
    assert!(
        page.body
            .contains(r#"<option value="key.create" selected>"#),
        "{}",
        page.body
    );
    let page = op
        .get("/console/operator/audit?action=workspace.update")
        .await;
    let updates = actions_of(&page.body);
    assert!(
        updates.len() >= 5 && updates.iter().all(|a| a == "workspace.update"),
        "{updates:?}"
    );
    let page = op.get("/console/operator/audit?actor=nobody").await;
    assert!(actions_of(&page.body).is_empty());
    assert!(page.body.contains("No entry matches."));
    for bad in [
        "?action=tier.burn",
        "?workspace=abc",
        "?after=0",
        "?after=-5",
        "?after=x",
    ] {
        let page = op.get(&format!("/console/operator/audit{bad}")).await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // The next page keeps the filters: 52 tier changes, 50 a page, then the other 2.
    for n in 0..52 {
        gw.put_tier(&format!("t{n}"), json!({"tokens_per_minute": 1000}))
            .await;
    }
    let page = op.get("/console/operator/audit?action=tier.put").await;
    assert_eq!(actions_of(&page.body).len(), 50);
    let next = page
        .body
        .split(r#"<a rel="next" href=""#)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a next page")
        .replace("&amp;", "&");
    assert!(
        next.starts_with("/console/operator/audit?action=tier.put&after="),
        "{next}"
    );
    let rest = actions_of(&op.get(&next).await.body);
    assert!(
        rest.len() >= 2 && rest.iter().all(|a| a == "tier.put"),
        "{rest:?}"
    );
}

#[tokio::test]
async fn increase_requests_are_approved_with_other_limits_or_denied_with_a_reason() {
    let gw = gateway(false).await;
    put_tiers(&gw).await;
    let (ws, key) = gw.workspace("small").await;
    let first = ask(&gw, &key, "launch", json!({"tokens_per_minute": 150000})).await;
    let second = ask(&gw, &key, "more", json!({"requests_per_second": 200})).await;
    let third = ask(&gw, &key, "again", json!({"requests_per_second": 300})).await;
    let op = Operator::sign_in(&gw.url, BOB).await;

    let page = op.get("/console/operator/requests").await;
    assert_eq!(ids(&page.body, "data-request-id"), [first, second, third]);
    let row = page
        .body
        .split(&format!("data-request-id=\"{first}\""))
        .nth(1)
        .unwrap();
    let row = row.split("</tr>").next().unwrap();
    assert!(row.contains(r#"class="approve""#) && row.contains(r#"class="deny""#));
    assert!(
        row.contains(r#"name="tokens_per_minute" value="150000""#),
        "prefilled with what was asked: {row}"
    );
    assert!(row.contains(r#"name="reason""#));
    // Beside what it asks, the limit it would raise as it is now.
    assert!(
        row.contains("In force now: tokens_per_minute 100000<"),
        "{row}"
    );

    // Approved with less than asked, and a note: the gateway's headers say so on the next
    // request.
    let approve = format!("/console/operator/requests/{first}/approve");
    let granted = [
        ("tokens_per_minute", "120000"),
        ("reason", "120k until March"),
    ];
    let page = op.post(&approve, &granted).await;
    assert!(
        page.redirects_to("/console/operator/requests?done=approved"),
        "{}",
        page.body
    );
    assert_eq!(tokens_limit(&gw, &key).await, 120000);
    let page = op.get("/console/operator/requests").await;
    let row = page
        .body
        .split(&format!("data-request-id=\"{second}\""))
        .nth(1)
        .unwrap()
        .split("</tr>")
        .next()
        .unwrap();
    assert!(
        row.contains("In force now: requests_per_second 100<"),
        "{row}"
    );
    let page = op.post(&approve, &[("tokens_per_minute", "130000")]).await;
    assert_eq!(page.status, StatusCode::CONFLICT);
    assert!(page.body.contains("already approved"), "{}", page.body);
    assert_eq!(tokens_limit(&gw, &key).await, 120000);

    // Nothing granted, or a limit out of bounds: refused, still pending.
    let approve_third = format!("/console/operator/requests/{third}/approve");
    let page = op
        .post(&approve_third, &[("concurrent_requests", "")])
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("at least one"), "{}", page.body);
    // In a form's words, not the API's.
    assert!(!page.body.contains("left out"), "{}", page.body);
    let page = op
        .post(
            &approve_third,
            &[("concurrent_requests", "0"), ("reason", "a trial week")],
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("concurrent_requests"), "{}", page.body);
    // Its form comes back as it was sent: the figure and the note, not what was asked (a second
    // click then granted what was asked, without the note: an outside audit).
    let row = page
        .body
        .split(&format!(r#"data-request-id="{third}""#))
        .nth(1)
        .unwrap()
        .split("</tr>")
        .next()
        .unwrap();
    assert!(
        row.contains(r#"name="concurrent_requests" value="0""#),
        "{row}"
    );
    assert!(row.contains(">a trial week</textarea>"), "{row}");

    // Denied: a reason is required.
    let deny = format!("/console/operator/requests/{second}/deny");
    let page = op.post(&deny, &[("reason", "  ")]).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("reason"), "{}", page.body);
    let page = op.post(&deny, &[("reason", "not this month")]).await;
    assert!(page.redirects_to("/console/operator/requests?done=denied"));

    // The workspace reads both answers.
    let r = gw
        .client
        .get(format!("{}/v1/limit-requests", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let mine: Value = r.json().await.unwrap();
    let by_id = |id: i64| {
        mine["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(by_id(first)["status"], "approved");
    assert_eq!(
        by_id(first)["granted_limits"],
        json!({"tokens_per_minute": 120000})
    );
    assert_eq!(by_id(first)["reason"], "120k until March");
    assert_eq!(by_id(second)["status"], "denied");
    assert_eq!(by_id(second)["reason"], "not this month");
    assert_eq!(by_id(third)["status"], "pending");

    // Pending first, then the answered ones; the workspace's page lists them too.
    let page = op.get("/console/operator/requests").await;
    assert_eq!(ids(&page.body, "data-request-id"), [third]);
    let page = op.get("/console/operator/requests?status=all").await;
    assert_eq!(ids(&page.body, "data-request-id"), [third, second, first]);
    assert!(page.body.contains("not this month"));
    let page = op.get("/console/operator/requests?status=denied").await;
    assert_eq!(ids(&page.body, "data-request-id"), [second]);
    let page = op.get(&format!("{HOME}/{ws}")).await;
    assert_eq!(ids(&page.body, "data-request-id"), [third, second, first]);

    let entries = audit(&gw, "?actor=bob").await;
    assert_eq!(
        entries,
        [
            ("bob".to_string(), "limit_request.deny".to_string()),
            ("bob".to_string(), "limit_request.approve".to_string()),
        ]
    );
}

/// The requests are listed 50 a page (an outside audit: 150 requests made one page 250,000 px
/// tall), a long use case opens on a click, and a refused answer shows the page of its request.
#[tokio::test]
async fn increase_requests_are_paged_and_long_use_cases_fold() {
    let gw = gateway(false).await;
    put_tiers(&gw).await;
    let long = "long words ".repeat(300);
    let mut asked = Vec::new();
    for _ in 0..6 {
        let (_, key) = gw.workspace("small").await;
        for i in 0..10 {
            let use_case = if asked.is_empty() {
                long.clone()
            } else {
                format!("case {i}")
            };
            let limits = json!({"tokens_per_minute": 150000 + i});
            asked.push(ask(&gw, &key, &use_case, limits).await);
        }
    }
    let op = Operator::sign_in(&gw.url, BOB).await;

    let page = op.get("/console/operator/requests").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(ids(&page.body, "data-request-id"), asked[..50]);
    assert_eq!(text_of(&page.body, "total"), "60");
    assert_eq!(text_of(&page.body, "page"), "1");
    assert!(
        page.body
            .contains(r#"rel="next" href="/console/operator/requests?status=pending&amp;page=2""#),
        "{}",
        page.body
    );
    assert!(!page.body.contains(r#"rel="prev""#));
    // The long use case folds: its start is the summary, the whole of it inside.
    let row = page
        .body
        .split("</tr>")
        .find(|r| r.contains(&format!("data-request-id=\"{}\"", asked[0])))
        .unwrap();
    assert!(row.contains("<details><summary>long words"), "{row}");
    assert!(
        row.contains(long.trim_end()),
        "the whole use case is on the page"
    );
    assert!(
        !page.body.contains("<summary>case"),
        "a short use case is shown whole"
    );

    let page = op
        .get("/console/operator/requests?status=pending&page=2")
        .await;
    assert_eq!(ids(&page.body, "data-request-id"), asked[50..]);
    assert!(page.body.contains(r#"rel="prev""#) && !page.body.contains(r#"rel="next""#));
    let page = op.get("/console/operator/requests?page=3").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(ids(&page.body, "data-request-id").is_empty());
    assert!(page.body.contains("There is no page 3"), "{}", page.body);
    for bad in ["0", "-1", "x"] {
        let page = op
            .get(&format!("/console/operator/requests?page={bad}"))
            .await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "page={bad}");
        assert!(
            page.body
                .contains(r#"<a href="/console/operator/requests">Back to the requests</a>"#),
            "{}",
            page.body
        );
        assert!(
            page.body.contains("&#39;page&#39;") || page.body.contains("'page'"),
            "{}",
            page.body
        );
    }

    // An approval refused (nothing granted) comes back on the page of its request, the 55th.
    let late = asked[54];
    let page = op
        .post(
            &format!("/console/operator/requests/{late}/approve"),
            &[("tokens_per_minute", "")],
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
    assert_eq!(ids(&page.body, "data-request-id"), asked[50..]);
}

#[tokio::test]
async fn tiers_are_edited_and_created_as_through_the_admin_api() {
    let gw = gateway(false).await;
    put_tiers(&gw).await;
    let (_, key) = gw.workspace("small").await;
    let op = Operator::sign_in(&gw.url, ALICE).await;

    let page = op.get("/console/operator/tiers").await;
    for tier in ["free", "scale", "small", "big"] {
        assert!(
            page.body.contains(&format!("<tr data-tier=\"{tier}\"")),
            "{tier}"
        );
    }
    assert!(page
        .body
        .contains(r#"action="/console/operator/tiers/small""#));
    assert!(page.body.contains(r#"<form id="create-tier""#));

    // A tier's promotion and the limits it keeps in shadow are shown (an operator could not see
    // them here, yet a rank change was refused for a promotion: an outside audit).
    gw.put_tier(
        "ladder-high",
        json!({"rank": 51, "tokens_per_minute": 5000}),
    )
    .await;
    gw.put_tier(
        "ladder-low",
        json!({"rank": 50, "tokens_per_minute": 1000, "shadow": ["tokens_per_minute"],
            "promotion": {"to": "ladder-high", "min_days": 7,
                "min_attributes": {"paid_usd": 50, "verified": true}}}),
    )
    .await;
    let page = op.get("/console/operator/tiers").await;
    let row = page
        .body
        .split(r#"<tr data-tier="ladder-low">"#)
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row: {}", page.body));
    assert!(
        row.contains("→ ladder-high when min_days ≥ 7, paid_usd ≥ 50, verified = true"),
        "{row}"
    );
    assert!(
        row.contains("enforce; in shadow: tokens_per_minute"),
        "{row}"
    );

    // Edited: the tier's workspaces get it on their next request.
    let page = op
        .post(
            "/console/operator/tiers/small",
            &[
                ("requests_per_second", "100"),
                ("tokens_per_minute", "123456"),
                ("models", "mistral-large-latest tokens_per_minute=500"),
            ],
        )
        .await;
    assert!(
        page.redirects_to("/console/operator/tiers?done=tier-saved"),
        "{}",
        page.body
    );
    assert_eq!(tokens_limit(&gw, &key).await, 123456);
    let (_, tiers) = gw.admin(Method::GET, "/tiers", None).await;
    let small = tiers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "small")
        .unwrap()
        .clone();
    assert_eq!(
        small,
        json!({"name": "small", "requests_per_second": 100.0, "tokens_per_minute": 123456,
               "models": {"mistral-large-latest": {"tokens_per_minute": 500}}})
    );

    // Model names the first word of a line cannot be (a space, a quote first, markup) are
    // written as JSON strings, and the form sent back as shown keeps the tier as it was (an
    // outside audit: such a tier, set through the API, could no longer be saved here).
    let odd = json!({"tokens_per_minute": 9000, "models": {
        "my model": {"tokens_per_minute": 5},
        "\"quoted": {"tokens_per_month": 6},
        "<svg onload=alert(1)>": {"tokens_per_minute": 7, "tokens_per_month": 8},
    }});
    gw.put_tier("odd-models", odd.clone()).await;
    let page = op.get("/console/operator/tiers").await;
    let form = page
        .body
        .split(r#"<section class="tier" data-tier="odd-models">"#)
        .nth(1)
        .and_then(|rest| rest.split("</section>").next())
        .unwrap_or_else(|| panic!("no form of odd-models: {}", page.body));
    let shown = form
        .split(r#"name="models""#)
        .nth(1)
        .and_then(|rest| rest.split_once('>'))
        .and_then(|(_, rest)| rest.split("</textarea>").next())
        .unwrap_or_else(|| panic!("no models field: {form}"));
    let lines = shown
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&");
    assert!(
        lines.contains(r#""my model" tokens_per_minute=5"#),
        "{lines}"
    );
    let page = op
        .post(
            "/console/operator/tiers/odd-models",
            &[("tokens_per_minute", "9000"), ("models", lines.as_str())],
        )
        .await;
    assert!(
        page.redirects_to("/console/operator/tiers?done=tier-saved"),
        "{}",
        page.body
    );
    let (_, tiers) = gw.admin(Method::GET, "/tiers", None).await;
    let saved = tiers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "odd-models")
        .unwrap()
        .clone();
    assert_eq!(saved["models"], odd["models"], "{saved}");

    // The admin API's validation.
    let page = op
        .post(
            "/console/operator/tiers/small",
            &[("tokens_per_minute", "0")],
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(
        page.body.contains("tokens_per_minute must be at least 1"),
        "{}",
        page.body
    );
    assert_eq!(tokens_limit(&gw, &key).await, 123456);
    // Refused, the form comes back as it was typed, not with the stored figures (an outside
    // audit: what was typed was lost); the other tiers' forms keep theirs.
    let page = op
        .post(
            "/console/operator/tiers/small",
            &[
                ("requests_per_second", "abc"),
                ("tokens_per_minute", "1234"),
                ("models", "big tpm=5"),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    let form = page
        .body
        .split(r#"<section class="tier" data-tier="small">"#)
        .nth(1)
        .and_then(|rest| rest.split("</section>").next())
        .unwrap_or_else(|| panic!("no form of small: {}", page.body));
    for typed in [
        r#"name="requests_per_second" value="abc""#,
        r#"name="tokens_per_minute" value="1234""#,
        ">big tpm=5</textarea>",
    ] {
        assert!(form.contains(typed), "{typed}: {form}");
    }
    let page = op
        .post(
            "/console/operator/tiers",
            &[("name", "no spaces"), ("burst", "7")],
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    let form = page
        .body
        .split(r#"<form id="create-tier""#)
        .nth(1)
        .unwrap_or_else(|| panic!("no new tier's form: {}", page.body));
    assert!(form.contains(r#"value="no spaces""#), "{form}");
    assert!(form.contains(r#"name="burst" value="7""#), "{form}");

    // Created; a name that exists is refused rather than replaced.
    let page = op
        .post(
            "/console/operator/tiers",
            &[("name", "gold"), ("tokens_per_month", "5000000")],
        )
        .await;
    assert!(page.redirects_to("/console/operator/tiers?done=tier-created"));
    let page = op.get("/console/operator/tiers?done=tier-created").await;
    assert!(page.body.contains("Tier created."));
    assert!(page.body.contains("<tr data-tier=\"gold\""));
    for (name, status, says) in [
        ("gold", StatusCode::CONFLICT, "exists already"),
        ("no spaces", StatusCode::BAD_REQUEST, "name"),
    ] {
        let page = op
            .post("/console/operator/tiers", &[("name", name), ("burst", "3")])
            .await;
        assert_eq!(page.status, status, "{name}");
        assert!(page.body.contains(says), "{name}: {}", page.body);
    }
    // `small` edited and `gold` created; `odd-models` saved as shown changed nothing, and is no
    // entry (as the admin API's put of a tier as it is).
    let entries = audit(&gw, "?actor=alice&action=tier.put").await;
    assert_eq!(entries.len(), 2, "{entries:?}");
}

#[tokio::test]
async fn operator_forms_need_the_session_token_and_this_origin() {
    let gw = gateway(false).await;
    put_tiers(&gw).await;
    let (ws, key) = gw.workspace("small").await;
    let alice = Operator::sign_in(&gw.url, ALICE).await;
    let bob = Operator::sign_in(&gw.url, BOB).await;
    assert_ne!(alice.csrf, bob.csrf);
    let workspace = sign_in_at(&gw.url, &key, &[]).await.session().unwrap();
    let workspace_csrf = get_at(&gw.url, "/console/workspace", Some(&workspace))
        .await
        .csrf();
    let path = format!("{HOME}/{ws}/tier");

    for token in [
        None,
        Some(""),
        Some("00"),
        Some(bob.csrf.as_str()),
        Some(workspace_csrf.as_str()),
    ] {
        let mut fields = vec![("tier", "big")];
        if let Some(t) = token {
            fields.push(("csrf", t));
        }
        let page = post_at(&gw.url, &path, Some(&alice.cookie), &fields, &[]).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{token:?}");
        assert!(page.body.contains("not valid for your session"));
    }
    // The right token, from another site's page.
    let page = post_at(
        &gw.url,
        &path,
        Some(&alice.cookie),
        &[("tier", "big"), ("csrf", &alice.csrf)],
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    // No session at all: to sign in.
    let page = post_at(&gw.url, &path, None, &[("tier", "big")], &[]).await;
    assert!(page.redirects_to("/console"));

    assert_eq!(tokens_limit(&gw, &key).await, 100000, "nothing changed");
    assert!(audit(&gw, "?action=workspace.update").await.is_empty());
    // This host's own origin is fine.
    let host = gw.url.trim_start_matches("http://").to_string();
    let page = post_at(
        &gw.url,
        &path,
        Some(&alice.cookie),
        &[("tier", "big"), ("csrf", &alice.csrf)],
        &[("origin", &format!("http://{host}"))],
    )
    .await;
    assert!(page.redirects_to(&format!("{HOME}/{ws}?done=tier")));
}

#[tokio::test]
async fn a_workspace_session_is_refused_on_every_operator_page() {
    let gw = gateway(false).await;
    let (ws, key) = gw.workspace("free").await;
    let other = create_workspace(&gw, "someone-else", "free").await;
    let request = ask(&gw, &key, "please", json!({"tokens_per_minute": 600000})).await;
    let cookie = sign_in_at(&gw.url, &key, &[]).await.session().unwrap();
    let csrf = get_at(&gw.url, "/console/workspace", Some(&cookie))
        .await
        .csrf();

    for path in [
        HOME.to_string(),
        format!("{HOME}?q=someone"),
        format!("{HOME}/{ws}"),
        format!("{HOME}/{other}"),
        "/console/operator/requests".into(),
        "/console/operator/tiers".into(),
        "/console/operator/audit".into(),
        "/console/operator/webhooks".into(),
        "/console/operator/webhooks/1".into(),
    ] {
        let page = get_at(&gw.url, &path, Some(&cookie)).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{path}");
        assert!(page.body.contains("Operators only"));
        for secret in [
            "someone-else",
            "data-workspace-id",
            "data-request-id",
            "data-tier",
            "please",
        ] {
            assert!(!page.body.contains(secret), "{path} shows {secret}");
        }
        assert!(page.set_cookie.is_empty(), "its own session is kept");
    }
    // A new key's page, even with a key's secret in its cookie.
    let with_secret = format!("{cookie}; tiergate_new_key={key}");
    for id in 1..=3 {
        let path = format!("/console/operator/keys/{id}/created");
        let page = get_at(&gw.url, &path, Some(&with_secret)).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{path}");
        assert!(!page.body.contains(&key), "{path}");
    }
    for (path, fields) in [
        (
            format!("{HOME}/{other}/status"),
            vec![("status", "suspended")],
        ),
        (
            format!("{HOME}/{ws}/overrides"),
            vec![("tokens_per_minute", "9"), ("was_tokens_per_minute", "")],
        ),
        (
            format!("/console/operator/requests/{request}/approve"),
            vec![("tokens_per_minute", "600000")],
        ),
        (format!("{HOME}/{ws}/keys"), vec![("name", "mine")]),
        (
            format!("{HOME}/{ws}/attributes"),
            vec![("attributes", "paid_usd=1000")],
        ),
        (
            format!("{HOME}/{ws}/enforcement"),
            vec![("enforcement", "shadow")],
        ),
        (
            "/console/operator/webhooks".to_string(),
            vec![
                ("url", "http://127.0.0.1:9/x"),
                ("events", "quota.threshold"),
            ],
        ),
    ] {
        let mut fields = fields;
        fields.push(("csrf", &csrf));
        let page = post_at(&gw.url, &path, Some(&cookie), &fields, &[]).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert!(audit(&gw, "?action=workspace.update").await.is_empty());
    assert!(audit(&gw, "?action=webhook.create").await.is_empty());
    assert!(audit(&gw, "?action=limit_request.approve").await.is_empty());
    assert_eq!(
        audit(&gw, "?action=key.create").await.len(),
        1,
        "the harness's key only"
    );
    // Without any session: to sign in, nothing to clear.
    let page = get_at(&gw.url, HOME, None).await;
    assert!(page.redirects_to("/console"));
    assert!(page.set_cookie.is_empty());
    // A cookie that is no valid session is cleared.
    let page = get_at(
        &gw.url,
        HOME,
        Some("tiergate_console=op.6f70.00.9999999999.00.00"),
    )
    .await;
    assert!(page.redirects_to("/console"));
    assert!(page.clears_session());
}

#[tokio::test]
async fn with_an_admin_listener_the_operator_pages_are_served_only_there() {
    let gw = gateway(true).await;
    let main = gw.url.clone();
    let admin = gw.admin_url.clone().unwrap();
    let (ws, key) = gw.workspace("free").await;

    // The main listener: no operator pages, and an admin token signs in nobody, refused as
    // any wrong key is (the same status and message: nothing says it was valid).
    for path in [
        HOME.to_string(),
        format!("{HOME}/{ws}"),
        "/console/operator".into(),
        "/console/operator/requests".into(),
        "/console/operator/webhooks".into(),
    ] {
        assert_eq!(
            get_at(&main, &path, None).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    let form = get_at(&main, "/console", None).await;
    assert!(
        form.body.contains(">Workspace API key</label>"),
        "{}",
        form.body
    );
    let with_token = sign_in_at(&main, ALICE, &[]).await;
    let with_nonsense = sign_in_at(&main, "not-a-token-0123456789abcdef", &[]).await;
    assert_eq!(with_token.status, StatusCode::UNAUTHORIZED);
    assert!(with_token.session().is_none());
    assert_eq!(with_token.status, with_nonsense.status);
    assert_eq!(with_token.body, with_nonsense.body);
    assert!(with_token.body.contains("Invalid or revoked API key."));
    let workspace = sign_in_at(&main, &key, &[]).await;
    assert!(workspace.redirects_to("/console/workspace"));

    // The admin listener: admin tokens sign in there, workspace keys do not; no workspace page.
    let form = get_at(&admin, "/console", None).await;
    assert!(form.body.contains(">Admin token</label>"), "{}", form.body);
    let page = sign_in_at(&admin, &key, &[]).await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    assert!(page.body.contains("Invalid admin token."));
    assert!(page.session().is_none());
    assert_eq!(
        get_at(&admin, "/console/workspace", None).await.status,
        StatusCode::NOT_FOUND
    );
    let op = Operator::sign_in(&admin, ALICE).await;
    assert!(op.get("/console").await.redirects_to(HOME));
    let page = op.get(&format!("{HOME}/{ws}")).await;
    assert_eq!(page.status, StatusCode::OK);
    // The button that suspends is behind a first click.
    assert!(
        page.body.contains(
            r#"<details class="suspend"><summary>Suspend…</summary><form id="change-status""#
        ),
        "{}",
        page.body
    );
    let page = op
        .post(&format!("{HOME}/{ws}/status"), &[("status", "suspended")])
        .await;
    assert!(page.redirects_to(&format!("{HOME}/{ws}?done=suspended")));
    assert_eq!(
        gw.chat(&key, hello(), &[]).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        audit(&gw, "?actor=alice").await,
        [("alice".to_string(), "workspace.update".to_string())]
    );

    // The operator's cookie on the main listener (one host: browsers send it to both ports)
    // opens nothing there, and is left alone.
    let page = get_at(&main, "/console", Some(&op.cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("id=\"sign-in\""));
    assert!(page.set_cookie.is_empty());
    assert!(get_at(&main, "/console/workspace", Some(&op.cookie))
        .await
        .redirects_to("/console"));
    assert_eq!(
        get_at(&main, HOME, Some(&op.cookie)).await.status,
        StatusCode::NOT_FOUND
    );

    // Sign-out on the admin listener.
    let page = post_at(
        &admin,
        "/console/sign-out",
        Some(&op.cookie),
        &[("csrf", &op.csrf)],
        &[],
    )
    .await;
    assert!(page.redirects_to("/console"));
    assert!(page.clears_session());
}

#[tokio::test]
async fn a_removed_or_changed_admin_token_ends_its_sessions() {
    let gw = gateway(false).await;
    let alice = Operator::sign_in(&gw.url, ALICE).await;
    let bob = Operator::sign_in(&gw.url, BOB).await;

    // Restarted with alice's token changed (same name) and bob's kept.
    const ALICE_NEW: &str = "alice-rotated-token-9876543210";
    let gw = gw
        .restart_with(Options {
            raw: tokens(&[("alice", ALICE_NEW), ("bob", BOB)]),
            ..Options::default()
        })
        .await;
    let page = get_at(&gw.url, HOME, Some(&alice.cookie)).await;
    assert!(page.redirects_to("/console"), "{}", page.status);
    assert!(page.clears_session());
    let page = get_at(&gw.url, &format!("{HOME}/1"), Some(&alice.cookie)).await;
    assert!(page.redirects_to("/console"));
    assert_eq!(
        get_at(&gw.url, HOME, Some(&bob.cookie)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        sign_in_at(&gw.url, ALICE, &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let alice = Operator::sign_in(&gw.url, ALICE_NEW).await;

    // Restarted with bob's token removed.
    let gw = gw
        .restart_with(Options {
            raw: tokens(&[("alice", ALICE_NEW)]),
            ..Options::default()
        })
        .await;
    let page = get_at(&gw.url, HOME, Some(&bob.cookie)).await;
    assert!(page.redirects_to("/console"));
    assert!(page.clears_session());
    let page = post_at(
        &gw.url,
        "/console/operator/tiers",
        Some(&bob.cookie),
        &[("csrf", &bob.csrf), ("name", "sneaky")],
        &[],
    )
    .await;
    assert!(page.redirects_to("/console"));
    assert_eq!(
        get_at(&gw.url, HOME, Some(&alice.cookie)).await.status,
        StatusCode::OK
    );
    assert!(audit(&gw, "?action=tier.put&actor=bob").await.is_empty());
}

#[tokio::test]
async fn operator_pages_escape_what_they_show() {
    let gw = gateway(false).await;
    let ws = create_workspace(&gw, "<script>alert(1)</script>", "free").await;
    let (s, _) = gw
        .admin(
            Method::POST,
            &format!("/workspaces/{ws}/keys"),
            Some(json!({"name": "\"><img src=x onerror=alert(2)>"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let key = gw.key(ws).await;
    ask(
        &gw,
        &key,
        "<b onmouseover=alert(3)>more</b>",
        json!({"burst": 5}),
    )
    .await;
    let op = Operator::sign_in(&gw.url, ALICE).await;

    for path in [
        HOME.to_string(),
        format!("{HOME}?q=%3Cscript%3E"),
        format!("{HOME}?q=%22%3E%3Cimg%20src%3Dx%3E"),
        format!("{HOME}/{ws}"),
        "/console/operator/requests".into(),
        "/console/operator/audit".into(),
    ] {
        let page = op.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        let body = without_own_script(&page.body);
        for raw in ["<script", "<img", "<b "] {
            assert!(!body.contains(raw), "{path}: {raw} in {}", page.body);
        }
    }
    let page = op.get(&format!("{HOME}/{ws}")).await;
    assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page
        .body
        .contains("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
    let page = op.get("/console/operator/requests").await;
    assert!(page
        .body
        .contains("&lt;b onmouseover=alert(3)&gt;more&lt;/b&gt;"));
    let page = op.get(&format!("{HOME}?q=%3Cscript%3E")).await;
    assert!(
        page.body.contains(r#"value="&lt;script&gt;""#),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn the_operator_creates_a_workspace_from_the_console() {
    let gw = gateway(false).await;
    let op = Operator::sign_in(&gw.url, ALICE).await;
    let page = op.get(HOME).await;
    assert!(page.body.contains(r#"<form id="create-workspace""#));
    let made = op
        .post(HOME, &[("name", "Globex <research>"), ("tier", "tier-1")])
        .await;
    assert_eq!(made.status, StatusCode::SEE_OTHER, "{}", made.body);
    let to = made.location.clone().unwrap();
    let id: i64 = to
        .trim_start_matches(&format!("{HOME}/"))
        .split('?')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (_, ws) = gw
        .admin(reqwest::Method::GET, &format!("/workspaces/{id}"), None)
        .await;
    assert_eq!(
        (ws["name"].as_str(), ws["tier"].as_str()),
        (Some("Globex <research>"), Some("tier-1"))
    );
    let page = op.get(&to).await;
    assert!(page.body.contains("Workspace created."), "{}", page.body);
    assert!(page.body.contains("Globex &lt;research&gt;"));
    assert_eq!(audit(&gw, "?action=workspace.create").await.len(), 1);
    // Refused: an empty name, an unknown tier; nothing made.
    let empty = op.post(HOME, &[("name", " "), ("tier", "free")]).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST, "{}", empty.body);
    // The page again with why, not the message alone (an outside audit).
    assert!(
        empty.body.contains(r#"<form id="create-workspace""#),
        "{}",
        empty.body
    );
    assert!(empty.body.contains("name"), "{}", empty.body);
    let unknown = op.post(HOME, &[("name", "x"), ("tier", "nope")]).await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST, "{}", unknown.body);
    // Without the form token: refused.
    let forged = post_at(&gw.url, HOME, Some(&op.cookie), &[("name", "y")], &[]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(audit(&gw, "?action=workspace.create").await.len(), 1);
}

/// A key's own limits from the workspace's page: shown with each key, set and cleared with its
/// form as `PATCH /admin/v1/keys/{id}` would (refused above the workspace's, naming the field),
/// audited as the token; the form needs the session's token; the workspace's own page lists
/// them too, as enforced.
#[tokio::test]
async fn a_key_s_limits_are_set_and_cleared_from_the_workspace_page() {
    let gw = gateway(false).await;
    put_tiers(&gw).await;
    let (ws, key) = gw.workspace("small").await;
    let (_, keys) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}/keys"), None)
        .await;
    let id = keys["data"][0]["id"].as_i64().unwrap();
    let op = Operator::sign_in(&gw.url, ALICE).await;
    let path = format!("/console/operator/keys/{id}/limits");
    let back = format!("{HOME}/{ws}?done=key-limits");
    let listed = || async {
        let (_, keys) = gw
            .admin(Method::GET, &format!("/workspaces/{ws}/keys"), None)
            .await;
        keys["data"][0]["limits"].clone()
    };

    let page = op.get(&format!("{HOME}/{ws}")).await;
    assert!(
        page.body.contains(&format!(r#"action="{path}""#)),
        "{}",
        page.body
    );
    assert!(
        page.body.contains(r#"<td class="key-limits">none"#),
        "{}",
        page.body
    );

    let fields = [
        ("requests_per_second", "5"),
        ("burst", ""),
        ("tokens_per_minute", "50000"),
        ("tokens_per_month", ""),
    ];
    let page = op.post(&path, &fields).await;
    assert!(page.redirects_to(&back), "{}: {}", page.status, page.body);
    assert_eq!(
        listed().await,
        json!({"requests_per_second": 5.0, "tokens_per_minute": 50000})
    );
    let page = op.get(&back).await;
    assert!(page.body.contains("Key limits saved."));
    assert!(
        page.body
            .contains("requests_per_second 5, tokens_per_minute 50000"),
        "{}",
        page.body
    );
    assert!(page
        .body
        .contains(r#"name="tokens_per_minute" value="50000""#));
    // The workspace's own page lists them, within its limits.
    let session = sign_in_at(&gw.url, &key, &[]).await.session().unwrap();
    let own = get_at(&gw.url, "/console/workspace", Some(&session)).await;
    assert!(
        own.body.contains(
            r#"<td class="key-limits">requests_per_second 5, tokens_per_minute 50000</td>"#
        ),
        "{}",
        own.body
    );

    // Above the workspace's, or not a number: refused naming the field, nothing changed.
    for (field, value, says) in [
        (
            "tokens_per_minute",
            "100001",
            "tokens_per_minute must be at most",
        ),
        ("burst", "lots", "'burst' must be a number"),
    ] {
        // Refused on the key's workspace's page, the form there again (it was the message
        // alone: an outside audit).
        let page = op.post(&path, &[(field, value)]).await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
        assert!(page.body.contains(says), "{}", page.body);
        assert!(
            page.body.contains(&format!(r#"action="{path}""#)),
            "{}",
            page.body
        );
    }
    assert_eq!(listed().await["tokens_per_minute"], 50000);
    // Without the session's token: refused.
    let page = post_at(
        &gw.url,
        &path,
        Some(&op.cookie),
        &[("tokens_per_minute", "10")],
        &[],
    )
    .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);

    // All fields empty: cleared.
    let empty = [
        ("requests_per_second", ""),
        ("burst", ""),
        ("tokens_per_minute", ""),
        ("tokens_per_month", ""),
    ];
    let page = op.post(&path, &empty).await;
    assert!(page.redirects_to(&back), "{}", page.body);
    assert_eq!(listed().await, json!({}));
    let page = op
        .post("/console/operator/keys/999999/limits", &empty)
        .await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);

    let entries = audit(&gw, "?action=key.limits").await;
    assert_eq!(
        entries,
        [
            ("alice".to_string(), "key.limits".to_string()),
            ("alice".to_string(), "key.limits".to_string()),
        ]
    );
}

/// The tier as the admin API shows it.
async fn tier_as_stored(gw: &TestGateway, name: &str) -> Value {
    let (_, tiers) = gw.admin(Method::GET, "/tiers", None).await;
    tiers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no tier {name}: {tiers}"))
        .clone()
}

#[tokio::test]
async fn the_ladder_attributes_and_shadow_mode_are_steered_from_the_console() {
    let gw = gateway(false).await;
    gw.put_tier(
        "ladder-high",
        json!({"rank": 51, "requests_per_second": 100}),
    )
    .await;
    gw.put_tier(
        "ladder-low",
        json!({"rank": 50, "requests_per_second": 1, "burst": 1}),
    )
    .await;
    let (ws, key) = gw.workspace("ladder-low").await;
    let op = Operator::sign_in(&gw.url, ALICE).await;
    let tier_form = |extra: &[(&'static str, &'static str)]| {
        let mut fields = vec![
            ("rank", "50"),
            ("requests_per_second", "1"),
            ("burst", "1"),
            ("enforcement", "enforce"),
        ];
        fields.extend_from_slice(extra);
        fields
    };

    // The tier's form shows the promotion and shadow fields, filled with what the tier has.
    let page = op.get("/console/operator/tiers").await;
    let section = page
        .body
        .split(r#"<section class="tier" data-tier="ladder-low">"#)
        .nth(1)
        .and_then(|rest| rest.split("</section>").next())
        .unwrap_or_else(|| panic!("{}", page.body));
    for field in [
        r#"name="promotion_to""#,
        r#"name="min_days""#,
        r#"name="min_tokens_30d""#,
        r#"name="min_attributes""#,
        r#"name="enforcement""#,
        r#"name="shadow" value="tokens_per_month""#,
        r#"<option value="ladder-high">"#,
    ] {
        assert!(section.contains(field), "{field}: {section}");
    }
    assert!(
        !section.contains(r#"<option value="ladder-low""#),
        "not itself"
    );

    // A promotion set from the form, as PUT /admin/v1/tiers would set it.
    let page = op
        .post(
            "/console/operator/tiers/ladder-low",
            &tier_form(&[
                ("promotion_to", "ladder-high"),
                ("min_days", ""),
                ("min_tokens_30d", ""),
                ("min_attributes", "paid_usd=50\r\nverified = true\r\n"),
                ("shadow", "tokens_per_month"),
            ]),
        )
        .await;
    assert!(
        page.redirects_to("/console/operator/tiers?done=tier-saved"),
        "{}",
        page.body
    );
    assert_eq!(
        tier_as_stored(&gw, "ladder-low").await,
        json!({"name": "ladder-low", "rank": 50, "requests_per_second": 1.0, "burst": 1,
               "promotion": {"to": "ladder-high",
                             "min_attributes": {"paid_usd": 50.0, "verified": true}},
               "shadow": ["tokens_per_month"]})
    );
    let page = op.get("/console/operator/tiers").await;
    assert!(
        page.body.contains("paid_usd=50\nverified=true\n"),
        "refilled"
    );
    // A form without the new fields (one from before) keeps them.
    let page = op
        .post(
            "/console/operator/tiers/ladder-low",
            &[("rank", "50"), ("requests_per_second", "1"), ("burst", "1")],
        )
        .await;
    assert!(page.redirects_to("/console/operator/tiers?done=tier-saved"));
    assert_eq!(
        tier_as_stored(&gw, "ladder-low").await["promotion"]["to"],
        "ladder-high"
    );
    // Refused, naming what is wrong; the tier unchanged.
    for (extra, says) in [
        (vec![("min_days", "7")], "promotion_to"),
        (
            vec![
                ("promotion_to", "ladder-high"),
                ("min_attributes", "paid_usd"),
            ],
            "min_attributes",
        ),
        (
            vec![("promotion_to", "ladder-high"), ("min_days", "soon")],
            "min_days",
        ),
        (vec![("promotion_to", "free")], "promotion.to"),
        (
            vec![
                ("promotion_to", "ladder-high"),
                ("min_attributes", "verified=false"),
            ],
            "false would ask nothing",
        ),
        (vec![("shadow", "everything")], "shadow"),
    ] {
        let page = op
            .post("/console/operator/tiers/ladder-low", &tier_form(&extra))
            .await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{extra:?}");
        assert!(page.body.contains(says), "{says}: {}", page.body);
    }
    assert_eq!(
        tier_as_stored(&gw, "ladder-low").await["shadow"],
        json!(["tokens_per_month"])
    );

    // Attributes: short of the condition, the workspace stays; meeting it, it is promoted at
    // once and gets the new tier's limits on its next request.
    let at = |what: &str| format!("{HOME}/{ws}/{what}");
    let page = op
        .post(
            &at("attributes"),
            &[("attributes", "paid_usd=49\nverified=true")],
        )
        .await;
    assert!(
        page.redirects_to(&format!("{HOME}/{ws}?done=attributes")),
        "{}",
        page.body
    );
    let page = op.get(&format!("{HOME}/{ws}")).await;
    assert!(page
        .body
        .contains(r#"<strong id="tier">ladder-low</strong>"#));
    assert!(page.body.contains(r#"<tr data-attribute="paid_usd">"#));
    assert!(
        page.body.contains("paid_usd=49\nverified=true\n"),
        "refilled"
    );
    for (bad, says) in [("paid_usd=lots", "paid_usd"), ("bad name=1", "bad name")] {
        let page = op.post(&at("attributes"), &[("attributes", bad)]).await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(page.body.contains(says), "{says}: {}", page.body);
    }

    // Shadow mode for the workspace alone: over its rate, admitted and marked.
    let send = || gw.chat(&key, hello(), &[]);
    assert_eq!(send().await.status(), StatusCode::OK);
    expect_429(send().await, "rate_limited", "requests_per_second").await;
    let page = op
        .post(&at("enforcement"), &[("enforcement", "shadow")])
        .await;
    assert!(
        page.redirects_to(&format!("{HOME}/{ws}?done=enforcement")),
        "{}",
        page.body
    );
    // The shadow keeps a state of its own: its first request fits, the next would not.
    for shadow_denied in [None, Some("requests_per_second")] {
        let r = send().await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "x-ratelimit-shadow-denied"), shadow_denied);
    }
    // The workspace's own page says the limit is in shadow, beside the next tier's, rather
    // than that it has none (an outside check in Chromium).
    let session = crate::console::signed_in(&gw, &key).await;
    let page = crate::console::get(&gw, "/console/workspace", Some(&session)).await;
    let row = page
        .body
        .split(r#"<tr data-limit="requests_per_second"><th scope="row">Requests per second</th><td class="now">"#)
        .nth(1)
        .unwrap_or_else(|| panic!("{}", page.body));
    assert!(row.starts_with("in shadow: 1</td>"), "{row}");
    // One limit in shadow, the workspace's enforcement the tier's again.
    let page = op
        .post(
            &at("enforcement"),
            &[("enforcement", "tier"), ("shadow", "requests_per_second")],
        )
        .await;
    assert!(page.redirects_to(&format!("{HOME}/{ws}?done=enforcement")));
    let (_, shown) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}"), None)
        .await;
    assert_eq!(shown["shadow"], json!(["requests_per_second"]), "{shown}");
    assert!(
        shown.get("enforcement").is_none_or(Value::is_null),
        "{shown}"
    );
    let r = send().await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "x-ratelimit-shadow-denied"),
        Some("requests_per_second"),
        "the shadow's state is the workspace's, whichever setting put the limit there"
    );
    // None ticked, the tier's enforcement: denied again.
    let page = op
        .post(&at("enforcement"), &[("enforcement", "tier")])
        .await;
    assert!(page.redirects_to(&format!("{HOME}/{ws}?done=enforcement")));
    expect_429(send().await, "rate_limited", "requests_per_second").await;
    let page = op
        .post(&at("enforcement"), &[("enforcement", "sometimes")])
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("enforcement"), "{}", page.body);

    let page = op
        .post(
            &at("attributes"),
            &[("attributes", "paid_usd=50\nverified=true")],
        )
        .await;
    assert!(
        page.redirects_to(&format!("{HOME}/{ws}?done=attributes-promoted")),
        "{:?}",
        page.location
    );
    let page = op.get(&format!("{HOME}/{ws}")).await;
    assert!(
        page.body
            .contains(r#"<strong id="tier">ladder-high</strong>"#),
        "promoted at once: {}",
        page.body
    );
    assert_eq!(send().await.status(), StatusCode::OK, "the new tier's rate");
    assert_eq!(send().await.status(), StatusCode::OK);

    // Audited as the token's name.
    let entries = audit(&gw, "?actor=alice&action=workspace.update").await;
    assert_eq!(entries.len(), 5, "{entries:?}");
    assert_eq!(audit(&gw, "?action=workspace.promote").await.len(), 1);
}
