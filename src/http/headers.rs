//! The rate-limit headers every proxied answer carries, in up to three families, each switched
//! on or off by `rate_limit_headers` ([`HeaderFamilies`]):
//! - `openai`: the OpenAI API's names and duration format (`1s`, `250ms`, `6m0s`, `412h3m0s`);
//! - `ietf`: the `RateLimit-Policy` and `RateLimit` fields of
//!   draft-ietf-httpapi-ratelimit-headers-10 (structured-field lists of policies);
//! - `mistral`: the names the Mistral API sends, where they map honestly onto our limits.

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::HeaderFamilies;
use crate::limiter::core::{month_span, MonthKey};
use crate::limiter::{Nanos, Snapshot, Window, NANOS_PER_SEC};

/// Formats a duration as the OpenAI API does (Go's `time.Duration` style): `250ms` below a
/// second, else hours, minutes and seconds with up to three decimals: `1s`, `1.5s`, `6m0s`.
pub fn duration(nanos: Nanos) -> String {
    let mut s = String::with_capacity(16);
    push_duration(nanos, &mut s);
    s
}

/// Appends `n` in decimal (every header is written on every answer: no `fmt` machinery).
fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Appends `duration(nanos)` to `out`.
pub(super) fn push_duration(nanos: Nanos, out: &mut String) {
    let ms = nanos.div_ceil(1_000_000);
    if ms == 0 {
        out.push_str("0s");
        return;
    }
    if ms < 1000 {
        push_u64(out, ms);
        out.push_str("ms");
        return;
    }
    let h = ms / 3_600_000;
    let m = (ms / 60_000) % 60;
    let s_ms = ms % 60_000;
    if h > 0 {
        push_u64(out, h);
        out.push('h');
    }
    if h > 0 || m > 0 {
        push_u64(out, m);
        out.push('m');
    }
    push_u64(out, s_ms / 1000);
    let frac = s_ms % 1000;
    if frac != 0 {
        // Three digits, trailing zeros dropped: .5, .25, .125.
        let digits = [frac / 100, frac / 10 % 10, frac % 10];
        let used = if digits[2] != 0 {
            3
        } else if digits[1] != 0 {
            2
        } else {
            1
        };
        out.push('.');
        for d in &digits[..used] {
            out.push(char::from(b'0' + *d as u8));
        }
    }
    out.push('s');
}

/// Appends a limit: an integer as such, else its shortest decimal form (`0.5`).
pub(super) fn push_number(out: &mut String, v: f64) {
    if v.fract() == 0.0 {
        push_u64(out, v as u64);
    } else {
        use std::fmt::Write as _;
        let _ = write!(out, "{v}");
    }
}

/// `[limit, remaining, reset]` header names of one window.
type Names = [HeaderName; 3];

/// The names of the requests, tokens and month windows: static, so that putting one copies no
/// bytes and counts no reference.
const NAMES: [Names; 3] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens-month"),
        HeaderName::from_static("x-ratelimit-remaining-tokens-month"),
        HeaderName::from_static("x-ratelimit-reset-tokens-month"),
    ],
];

/// The most headers `apply` sets: three per window in the OpenAI family, two for Mistral's
/// minute, two for the IETF fields.
const MOST: usize = 13;

/// The values of the headers `apply` sets, written one after the other into one text, then
/// put as slices of it: one allocation for all of them, where a value apiece would make one
/// each (they are set on every answer).
struct Values {
    text: String,
    /// Each header and the end of its value in `text` (it starts where the previous ended).
    ends: [(Option<HeaderName>, usize); MOST],
    len: usize,
}

impl Values {
    fn new() -> Self {
        Values {
            text: String::with_capacity(320),
            ends: Default::default(),
            len: 0,
        }
    }

    /// Ends the value being written in `text` and names its header.
    fn end(&mut self, name: &HeaderName) {
        self.ends[self.len] = (Some(name.clone()), self.text.len());
        self.len += 1;
    }

    fn put(self, h: &mut HeaderMap) {
        let text = Bytes::from(self.text);
        let mut start = 0;
        for (name, end) in self.ends.into_iter().take(self.len) {
            let value = HeaderValue::from_maybe_shared(text.slice(start..end))
                .expect("limits and durations are valid header values");
            if let Some(name) = name {
                h.insert(name, value);
            }
            start = end;
        }
    }

    fn window(&mut self, names: &Names, w: &Window, hours_reset: bool) {
        let [limit, remaining, reset] = names;
        push_number(&mut self.text, w.limit);
        self.end(limit);
        push_u64(&mut self.text, w.remaining);
        self.end(remaining);
        if hours_reset {
            // The month's reset reads in whole seconds: `412h3m0s`.
            push_duration(
                w.reset.div_ceil(NANOS_PER_SEC) * NANOS_PER_SEC,
                &mut self.text,
            );
        } else {
            push_duration(w.reset, &mut self.text);
        }
        self.end(reset);
    }
}

/// Sets the headers of every limit the snapshot has, in each family switched on; an absent
/// limit has no header. `now` dates the month's window for the IETF policy.
pub fn apply(families: HeaderFamilies, snapshot: &Snapshot, now: Nanos, h: &mut HeaderMap) {
    // Room for all of them and the few the answer gets after (`x-request-id`, ...) at once: the
    // map of an upstream's answer is sized to the headers it came with, and would otherwise
    // grow, and rehash, as they are put.
    h.reserve(MOST + 3);
    let mut values = Values::new();
    let [requests, tokens, month] = &NAMES;
    if families.openai {
        if let Some(w) = &snapshot.requests {
            values.window(requests, w, false);
        }
        if let Some(w) = &snapshot.tokens {
            values.window(tokens, w, false);
        }
    }
    if families.openai || families.mistral {
        // The one name the two families share (`x-ratelimit-{limit,remaining}-tokens-month`)
        // means the same in both: the month's token quota and what is left of it.
        if let Some(w) = &snapshot.month {
            values.window(month, w, true);
        }
    }
    if families.mistral {
        if let Some(w) = &snapshot.tokens {
            let [limit, remaining] = &MISTRAL_MINUTE;
            push_number(&mut values.text, w.limit);
            values.end(limit);
            push_u64(&mut values.text, w.remaining);
            values.end(remaining);
        }
    }
    if families.ietf {
        ietf(snapshot, now, &mut values);
    }
    values.put(h);
}

/// The Mistral API's `x-ratelimit-tokens-query-cost`: the tokens this request was charged, set
/// where the settled count is known before the answer leaves (JSON answers).
pub fn query_cost(families: HeaderFamilies, tokens: u64, h: &mut HeaderMap) {
    if families.mistral {
        h.insert(
            HeaderName::from_static("x-ratelimit-tokens-query-cost"),
            HeaderValue::from(tokens),
        );
    }
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

const MISTRAL_MINUTE: [HeaderName; 2] = [
    HeaderName::from_static("x-ratelimit-limit-tokens-minute"),
    HeaderName::from_static("x-ratelimit-remaining-tokens-minute"),
];

/// The longest window `rate_as_quota` gives: any rate written with up to six decimals is exact
/// within it.
const MOST_QUOTA_WINDOW: u64 = 1_000_000;

/// A rate in requests per second as an integer quota over a whole number of seconds, as the
/// draft's `q` and `w` must be, exactly and in lowest terms: 2/s is `q=2;w=1`, 0.5/s is
/// `q=1;w=2`, 1.333/s is `q=1333;w=1000`. Found by the rate's continued fraction, whose
/// convergents are the fractions nearest it for their size: the first one equal to the rate
/// (but for the last bits of a float) is it. A rate that none within `MOST_QUOTA_WINDOW`
/// equals is rounded down over that window, so the policy never promises more than the limit.
fn rate_as_quota(rate: f64) -> (u64, u64) {
    if rate >= 1.0 && rate.fract() == 0.0 && rate < 1e15 {
        return (rate as u64, 1);
    }
    let close = |q: u64, w: u64| q >= 1 && (q as f64 / w as f64 - rate).abs() <= rate * 1e-14;
    // The convergents h/k, from h(-2)/k(-2) = 0/1 and h(-1)/k(-1) = 1/0.
    let (mut h, mut h_before, mut k, mut k_before) = (1u64, 0u64, 0u64, 1u64);
    let mut x = rate;
    for _ in 0..40 {
        let a = x.floor();
        if !(0.0..1e15).contains(&a) {
            break;
        }
        let a = a as u64;
        let (Some(h_next), Some(k_next)) = (
            a.checked_mul(h).and_then(|v| v.checked_add(h_before)),
            a.checked_mul(k).and_then(|v| v.checked_add(k_before)),
        ) else {
            break;
        };
        if k_next > MOST_QUOTA_WINDOW {
            break;
        }
        (h_before, h, k_before, k) = (h, h_next, k, k_next);
        if close(h, k) {
            return (h, k);
        }
        let rest = x - a as f64;
        if rest <= 0.0 {
            break;
        }
        x = 1.0 / rest;
    }
    let w = MOST_QUOTA_WINDOW;
    (((rate * w as f64).floor() as u64).max(1), w)
}

fn secs_ceil(nanos: Nanos) -> u64 {
    nanos.div_ceil(NANOS_PER_SEC)
}

/// `RateLimit-Policy` and `RateLimit`: one policy per limit the workspace has. `q`/`w` say the
/// limit, `r` what is left now, and `t` the seconds until the window is whole again (the same
/// instant as the OpenAI family's reset). Tokens are not among the draft's registered quota
/// units; they are named `qu="tokens"` (the README says so).
fn ietf(snapshot: &Snapshot, now: Nanos, values: &mut Values) {
    let mut policies: [Option<Policy>; 3] = [None, None, None];
    if let Some(w) = &snapshot.requests {
        let (q, window) = rate_as_quota(w.limit);
        policies[0] = Some(Policy::new("requests-second", q, None, window, w));
    }
    if let Some(w) = &snapshot.tokens {
        policies[1] = Some(Policy::new("tokens-minute", w.limit as u64, TOKENS, 60, w));
    }
    if let Some(w) = &snapshot.month {
        // The window is this calendar month (UTC): 28 to 31 days.
        let (key, end) = month_span(now);
        let length = secs_ceil(end.saturating_sub(MonthKey::start(key)));
        policies[2] = Some(Policy::new(
            "tokens-month",
            w.limit as u64,
            TOKENS,
            length,
            w,
        ));
    }
    let policies = policies.iter().flatten();
    if policies.clone().next().is_none() {
        return;
    }
    list(&mut values.text, policies.clone(), |out, p| {
        out.push_str(";q=");
        push_u64(out, p.q.min(SF_INTEGER_MAX));
        if let Some(unit) = p.unit {
            out.push_str(";qu=\"");
            out.push_str(unit);
            out.push('"');
        }
        out.push_str(";w=");
        push_u64(out, p.w);
    });
    values.end(&RATELIMIT_POLICY);
    list(&mut values.text, policies, |out, p| {
        out.push_str(";r=");
        push_u64(out, p.window.remaining.min(SF_INTEGER_MAX));
        out.push_str(";t=");
        push_u64(out, secs_ceil(p.window.reset));
    });
    values.end(&RATELIMIT);
}

const TOKENS: Option<&str> = Some("tokens");

/// The largest integer a structured field may carry (RFC 8941: at most 15 digits). A month
/// limit may be 10^15, one more: it is sent as this.
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// One limit as the IETF fields name it: quota `q` of `unit` per `w` seconds, and its window.
struct Policy<'a> {
    name: &'static str,
    q: u64,
    unit: Option<&'static str>,
    w: u64,
    window: &'a Window,
}

impl<'a> Policy<'a> {
    fn new(
        name: &'static str,
        q: u64,
        unit: Option<&'static str>,
        w: u64,
        window: &'a Window,
    ) -> Self {
        Policy {
            name,
            q,
            unit,
            w,
            window,
        }
    }
}

/// Appends a structured-field list: each policy's `"name"`, then what `params` writes of it.
fn list<'a, 'w: 'a>(
    out: &mut String,
    policies: impl Iterator<Item = &'a Policy<'w>>,
    params: impl Fn(&mut String, &Policy),
) {
    for (i, p) in policies.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push('"');
        out.push_str(p.name);
        out.push('"');
        params(out, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_the_openai_api() {
        let ms = 1_000_000;
        let s = 1000 * ms;
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(1), "1ms");
        assert_eq!(duration(250 * ms), "250ms");
        assert_eq!(duration(s), "1s");
        assert_eq!(duration(1500 * ms), "1.5s");
        assert_eq!(duration(360 * s), "6m0s");
        assert_eq!(duration(61 * s + 20 * ms), "1m1.02s");
        assert_eq!(duration((412 * 3600 + 3 * 60) * s), "412h3m0s");
        assert_eq!(duration(1250 * ms), "1.25s");
        assert_eq!(duration(1050 * ms), "1.05s");
        assert_eq!(duration(1001 * ms), "1.001s");
        assert_eq!(duration(1999 * ms + 1), "2s");
        assert_eq!(duration(3600 * s), "1h0m0s");
        assert_eq!(duration(3600 * s + 500 * ms), "1h0m0.5s");
    }

    #[test]
    fn ietf_integers_stay_within_fifteen_digits() {
        let window = |n: u64| Window {
            limit: n as f64,
            remaining: n,
            reset: NANOS_PER_SEC,
        };
        let headers = |n: u64| {
            let snapshot = Snapshot {
                month: Some(window(n)),
                ..Snapshot::default()
            };
            let mut values = Values::new();
            ietf(&snapshot, 0, &mut values);
            let mut h = HeaderMap::new();
            values.put(&mut h);
            let get = |name: &HeaderName| h.get(name).unwrap().to_str().unwrap().to_owned();
            (get(&RATELIMIT_POLICY), get(&RATELIMIT))
        };
        // The largest month limit, 10^15, has 16 digits: sent as the largest that fits.
        let (policy, now) = headers(1_000_000_000_000_000);
        assert!(policy.contains(";q=999999999999999;"), "{policy}");
        assert!(now.contains(";r=999999999999999;"), "{now}");
        let (policy, now) = headers(999_999_999_999_998);
        assert!(policy.contains(";q=999999999999998;"), "{policy}");
        assert!(now.contains(";r=999999999999998;"), "{now}");
    }

    #[test]
    fn rates_become_whole_quotas_over_whole_seconds() {
        assert_eq!(rate_as_quota(2.0), (2, 1));
        assert_eq!(rate_as_quota(0.5), (1, 2));
        assert_eq!(rate_as_quota(0.1), (1, 10));
        assert_eq!(rate_as_quota(2.5), (5, 2));
        assert_eq!(rate_as_quota(1.0 / 60.0), (1, 60));
        assert_eq!(rate_as_quota(1.0 / 3.0), (1, 3));
        // Exact, where a set of windows up to an hour gave 3 per hour (0.00083/s).
        assert_eq!(rate_as_quota(0.001), (1, 1000));
        assert_eq!(rate_as_quota(1.333), (1333, 1000));
        assert_eq!(rate_as_quota(12.75), (51, 4));
        assert_eq!(rate_as_quota(0.123456), (1929, 15625));
        assert_eq!(rate_as_quota(100_000.0), (100_000, 1));
        // No fraction within the longest window equals it: rounded down over that window.
        let (q, w) = rate_as_quota(std::f64::consts::PI);
        assert_eq!(w, MOST_QUOTA_WINDOW);
        assert!((q as f64) <= std::f64::consts::PI * w as f64, "{q}");
        assert!(q as f64 > (std::f64::consts::PI - 1e-6) * w as f64, "{q}");
    }
}
