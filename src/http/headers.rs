//! The rate-limit headers every proxied answer carries, in the OpenAI API's names and duration
//! format (`1s`, `250ms`, `6m0s`, `412h3m0s`).

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::limiter::{Nanos, Snapshot, Window, NANOS_PER_SEC};

/// Formats a duration as the OpenAI API does (Go's `time.Duration` style): `250ms` below a
/// second, else hours, minutes and seconds with up to three decimals: `1s`, `1.5s`, `6m0s`.
pub fn duration(nanos: Nanos) -> String {
    let ms = nanos.div_ceil(1_000_000);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let h = ms / 3_600_000;
    let m = (ms / 60_000) % 60;
    let s_ms = ms % 60_000;
    let secs = if s_ms.is_multiple_of(1000) {
        format!("{}s", s_ms / 1000)
    } else {
        let frac = format!("{:03}", s_ms % 1000);
        format!("{}.{}s", s_ms / 1000, frac.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}")
    } else if m > 0 {
        format!("{m}m{secs}")
    } else {
        secs
    }
}

fn number(v: f64) -> HeaderValue {
    if v.fract() == 0.0 {
        HeaderValue::from(v as u64)
    } else {
        HeaderValue::from_str(&format!("{v}")).expect("a number is a valid header")
    }
}

/// `[limit, remaining, reset]` header names of one window.
type Names = [HeaderName; 3];

fn names(suffix: &'static str) -> Names {
    let name = |kind: &str| {
        HeaderName::try_from(format!("x-ratelimit-{kind}-{suffix}")).expect("valid header name")
    };
    [name("limit"), name("remaining"), name("reset")]
}

static NAMES: std::sync::LazyLock<[Names; 3]> =
    std::sync::LazyLock::new(|| [names("requests"), names("tokens"), names("tokens-month")]);

fn put(h: &mut HeaderMap, names: &Names, w: &Window, hours_reset: bool) {
    let [limit, remaining, reset_name] = names;
    h.insert(limit.clone(), number(w.limit));
    h.insert(remaining.clone(), HeaderValue::from(w.remaining));
    let reset = if hours_reset {
        // The month's reset reads in whole seconds: `412h3m0s`.
        duration(w.reset.div_ceil(NANOS_PER_SEC) * NANOS_PER_SEC)
    } else {
        duration(w.reset)
    };
    h.insert(
        reset_name.clone(),
        HeaderValue::from_str(&reset).expect("a duration is a valid header"),
    );
}

/// Sets the headers of every limit the snapshot has; an absent limit has no header.
pub fn apply(snapshot: &Snapshot, h: &mut HeaderMap) {
    let [requests, tokens, month] = &*NAMES;
    if let Some(w) = &snapshot.requests {
        put(h, requests, w, false);
    }
    if let Some(w) = &snapshot.tokens {
        put(h, tokens, w, false);
    }
    if let Some(w) = &snapshot.month {
        put(h, month, w, true);
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
    }
}
