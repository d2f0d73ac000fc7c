//! Usage over time and per key: requests and denials through the gateway, with a manual clock,
//! land in the ledger's hour, day and key, as `GET /v1/usage` answers them and as the
//! console's charts and table carry them (their `data-` attributes).

use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tiergate::clock::Clock;

use crate::harness::*;

/// `YYYY-MM-DD` and `YYYY-MM-DDTHH:00:00Z` of the hour starting at `hour` (unix seconds).
fn day_and_hour(hour: i64) -> (String, String) {
    let t = time::OffsetDateTime::from_unix_timestamp(hour).unwrap();
    let at = t
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    (at[..10].to_string(), at)
}

async fn usage(gw: &TestGateway, key: &str) -> Value {
    let r = gw
        .client
        .get(format!("{}/v1/usage", gw.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

/// A chat answered `200`: its (prompt, completion) tokens as the upstream reported them.
async fn admitted(gw: &TestGateway, key: &str) -> (u64, u64) {
    let r = gw.chat(key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let usage = &body["usage"];
    (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    )
}

async fn denied(gw: &TestGateway, key: &str) {
    let r = gw.chat(key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
}

/// The console's workspace page, signed in with `key`.
async fn console_page(gw: &TestGateway, key: &str) -> (String, String) {
    console_page_at(gw, key, "/console/workspace").await
}

/// A page of the console, signed in with `key`.
async fn console_page_at(gw: &TestGateway, key: &str, path: &str) -> (String, String) {
    let browser = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed = browser
        .post(format!("{}/console/sign-in", gw.url))
        .form(&[("key", key)])
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), StatusCode::SEE_OTHER);
    let cookie = header(&signed, "set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = browser
        .get(format!("{}{path}", gw.url))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = header(&page, "content-security-policy")
        .unwrap()
        .to_string();
    (csp, page.text().await.unwrap())
}

#[tokio::test]
async fn usage_lands_in_its_hour_day_and_key_in_the_api_and_the_console() {
    let gw = TestGateway::start().await;
    // Two hours of the same month: start before 22:00 UTC.
    let hour_of_day = (gw.clock.now_secs() / 3600) % 24;
    if hour_of_day >= 22 {
        gw.advance(Duration::from_secs((24 - hour_of_day as u64 + 1) * 3600));
    }
    gw.put_tier("one-per-second", json!({"requests_per_second": 1}))
        .await;
    let (ws, key_a) = gw.workspace("one-per-second").await;
    let key_b = gw.key(ws).await;
    let (s, keys) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/workspaces/{ws}/keys"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{keys}");
    let ids: Vec<i64> = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_i64().unwrap())
        .collect();
    let (id_a, id_b) = (ids[0], ids[1]);
    let first_hour = gw.clock.now_secs() / 3600 * 3600;

    // This hour: A is admitted, then A and B are denied (one request a second).
    let (prompt_a, completion_a) = admitted(&gw, &key_a).await;
    denied(&gw, &key_a).await;
    denied(&gw, &key_b).await;
    // The next hour: B is admitted, then denied.
    gw.advance(Duration::from_secs(3600));
    let (prompt_b, completion_b) = admitted(&gw, &key_b).await;
    denied(&gw, &key_b).await;
    let (tokens_a, tokens_b) = (prompt_a + completion_a, prompt_b + completion_b);

    // Once the ledger holds it all (the admin view writes it out first)...
    eventually(
        Duration::from_secs(5),
        "the ledger holds it all",
        || async {
            let daily = gw.exact_usage(&key_a).await["daily"].clone();
            let rows = daily.as_array().unwrap();
            let sum = |f: &str| rows.iter().map(|r| r[f].as_u64().unwrap()).sum::<u64>();
            sum("requests") == 2 && sum("denied") == 3
        },
    )
    .await;

    // ...the workspace's usage over time, from either key.
    let history = usage(&gw, &key_a).await;
    assert_eq!(history["workspace_id"], ws);
    let hours = history["hours"].as_array().unwrap();
    assert_eq!(hours.len(), 48);
    let (first_day, first_at) = day_and_hour(first_hour);
    let (second_day, second_at) = day_and_hour(first_hour + 3600);
    assert_eq!(
        hours[47]["hour"],
        second_at.as_str(),
        "the current hour last"
    );
    assert_eq!(hours[46]["hour"], first_at.as_str());
    assert_eq!(
        hours[46],
        json!({"hour": first_at, "requests": 1, "denied": 2,
               "prompt_tokens": prompt_a, "completion_tokens": completion_a})
    );
    assert_eq!(
        hours[47],
        json!({"hour": second_at, "requests": 1, "denied": 1,
               "prompt_tokens": prompt_b, "completion_tokens": completion_b})
    );
    assert!(hours[..46]
        .iter()
        .all(|h| h["requests"] == 0 && h["denied"] == 0));

    let days = history["days"].as_array().unwrap();
    assert_eq!(days[0]["day"].as_str().unwrap()[8..], *"01", "from the 1st");
    assert_eq!(days.last().unwrap()["day"], second_day.as_str(), "to today");
    let day = |d: &str| days.iter().find(|x| x["day"] == d).unwrap().clone();
    if first_day == second_day {
        assert_eq!(
            day(&first_day),
            json!({"day": first_day, "requests": 2, "tokens": tokens_a + tokens_b, "denied": 3, "shadow_denied": 0})
        );
    } else {
        assert_eq!(day(&first_day)["tokens"], tokens_a);
        assert_eq!(day(&second_day)["tokens"], tokens_b);
    }
    let others = days
        .iter()
        .filter(|d| d["day"] != first_day.as_str() && d["day"] != second_day.as_str());
    assert!(others
        .clone()
        .all(|d| d["requests"] == 0 && d["tokens"] == 0));

    let keys = history["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(
        (
            &keys[0]["key_id"],
            &keys[0]["requests"],
            &keys[0]["tokens"],
            &keys[0]["denied"]
        ),
        (&json!(id_a), &json!(1), &json!(tokens_a), &json!(1))
    );
    assert_eq!(
        (
            &keys[1]["key_id"],
            &keys[1]["requests"],
            &keys[1]["tokens"],
            &keys[1]["denied"]
        ),
        (&json!(id_b), &json!(1), &json!(tokens_b), &json!(2))
    );
    assert_eq!(
        keys[1]["prefix"].as_str().unwrap(),
        &key_b[..keys[1]["prefix"].as_str().unwrap().len()]
    );
    assert_eq!(
        usage(&gw, &key_b).await,
        history,
        "the workspace's, whichever key"
    );

    // The console draws the same figures.
    let (csp, page) = console_page(&gw, &key_a).await;
    assert!(csp.contains("default-src 'none'"), "{csp}");
    for id in [
        "<svg class=\"chart\" id=\"chart-daily\"",
        "<svg class=\"chart\" id=\"chart-hourly\"",
        "<table id=\"usage-by-key\"",
    ] {
        assert!(page.contains(id), "{id} in {page}");
    }
    assert!(
        !page.contains(" style=") && !without_own_script(&page).contains("<script"),
        "{page}"
    );
    let expect = |attrs: String| assert!(page.contains(&attrs), "{attrs} in {page}");
    expect(format!(
        "data-hour=\"{first_at}\" data-requests=\"1\" data-denied=\"2\""
    ));
    expect(format!(
        "data-hour=\"{second_at}\" data-requests=\"1\" data-denied=\"1\""
    ));
    assert_eq!(page.matches("data-hour=").count(), 48);
    if first_day == second_day {
        expect(format!(
            "data-day=\"{first_day}\" data-tokens=\"{}\" data-requests=\"2\" data-denied=\"3\"",
            tokens_a + tokens_b
        ));
    }
    assert_eq!(page.matches("data-day=").count(), days.len());
    expect(format!(
        "data-key-id=\"{id_a}\" data-requests=\"1\" data-tokens=\"{tokens_a}\" data-denied=\"1\""
    ));
    expect(format!(
        "data-key-id=\"{id_b}\" data-requests=\"1\" data-tokens=\"{tokens_b}\" data-denied=\"2\""
    ));
}

/// A past month's usage stays readable: `?month=YYYY-MM` gives each of its days and its keys'
/// figures, once the month is over (an outside audit: there was no history beyond the month).
#[tokio::test]
async fn a_past_month_is_read_with_its_days_and_keys() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    let (prompt, completion) = admitted(&gw, &key).await;
    let tokens = prompt + completion;
    // In the ledger (the workspace's reads never force a write).
    assert_eq!(gw.exact_usage(&key).await["tokens_this_month"], tokens);
    let before = usage(&gw, &key).await;
    let month = before["month"].as_str().unwrap().to_string();
    // Into the next month (at most 32 days on).
    let today = before["days"].as_array().unwrap().len() as u64;
    gw.advance(Duration::from_secs((33 - today) * 86_400));
    let now = usage(&gw, &key).await;
    assert_ne!(now["month"], month.as_str());
    let month_tokens = |v: &Value| -> u64 {
        v["days"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["tokens"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(month_tokens(&now), 0, "{now}");
    // A key made in the new month is listed in it, not in the month before (an outside audit:
    // keys made later were listed, with nothing, in earlier months).
    gw.key(ws).await;

    let get = |query: String| {
        let gw = &gw;
        let key = key.clone();
        async move {
            let r = gw
                .client
                .get(format!("{}/v1/usage?month={query}", gw.url))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, past) = get(month.clone()).await;
    assert_eq!(status, StatusCode::OK, "{past}");
    assert_eq!(past["month"], month.as_str());
    let days = past["days"].as_array().unwrap();
    assert!(
        (28..=31).contains(&days.len()),
        "every day of it: {}",
        days.len()
    );
    assert_eq!(days[0]["day"], format!("{month}-01"));
    assert!(days
        .iter()
        .all(|d| d["day"].as_str().unwrap().starts_with(&month)));
    assert_eq!(month_tokens(&past), tokens);
    assert_eq!(past["keys"][0]["tokens"], tokens, "{past}");
    assert_eq!(past["keys"].as_array().unwrap().len(), 1, "{past}");
    let (status, this) = get(now["month"].as_str().unwrap().to_string()).await;
    assert_eq!(
        (status, this["days"].as_array().unwrap().len()),
        (StatusCode::OK, now["days"].as_array().unwrap().len())
    );
    assert_eq!(this["keys"].as_array().unwrap().len(), 2, "{this}");

    // The console draws the past month on a page of its own, with its neighbours linked.
    let (_, page) = console_page_at(
        &gw,
        &key,
        &format!("/console/workspace/usage?month={month}"),
    )
    .await;
    assert!(page.contains(&format!("Per day in {month}")), "{page}");
    assert_eq!(page.matches("data-day=").count(), days.len());
    let with_tokens = format!("data-tokens=\"{tokens}\"");
    assert!(page.contains(&with_tokens), "{page}");
    let this = now["month"].as_str().unwrap();
    assert!(
        page.contains(&format!("href=\"/console/workspace/usage?month={this}\"")),
        "{page}"
    );
    let (_, page) = console_page_at(&gw, &key, "/console/workspace").await;
    assert!(page.contains("href=\"/console/workspace/usage\""), "{page}");

    for bad in ["2026-13", "26-01", "1969-12", "2026-1", "x", "9999-01"] {
        let (status, body) = get(bad.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("'month'"),
            "{bad}: {body}"
        );
    }
}
