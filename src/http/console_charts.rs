//! The console's usage charts and the table of usage per key: pure functions from the figures
//! of `GET /v1/usage` (`UsageHistoryView`) to markup, so they are tested without a server.
//!
//! The charts are SVG drawn on the server (no script): each bar is a group carrying the exact
//! figures in `data-` attributes (what the tests read) and a `<title>` (what a browser shows on
//! hover); the axes are labelled with rounded figures (`1.5k`, `2M`). Colours come from classes
//! in `console.css`, not from `style` attributes. A chart with no usage at all still draws its
//! axes, with a line saying so.

use maud::{html, Markup};

use super::views::{DayUsageView, HourUsageView, KeyUsageView, UsageHistoryView};

/// The drawing's size in SVG units (it scales to the page's width) and its margins.
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 240.0;
const TOP: f64 = 24.0;
const BOTTOM: f64 = 32.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 56.0;
const PLOT_H: f64 = HEIGHT - TOP - BOTTOM;
const PLOT_W: f64 = WIDTH - LEFT - RIGHT;

/// The usage section of the workspace page: the two charts and the table per key.
pub fn usage_section(history: &UsageHistoryView, this_month: bool) -> Markup {
    html! {
        h2 { "Usage over time" }
        p.note { "From the ledger, across every instance, in UTC; up to about a second behind." }
        @if this_month {
            h3 { "Per day this month (" (history.month) ")" }
        } @else {
            h3 { "Per day in " (history.month) }
        }
        (daily_chart(&history.days))
        (daily_figures(&history.days))
        h3 { "Per hour, the last 48 hours" }
        (hourly_chart(&history.hours))
        (hourly_figures(&history.hours))
        @if this_month {
            h2 { "Usage per key this month" }
        } @else {
            h2 { "Usage per key in " (history.month) }
        }
        (keys_table(&history.keys))
    }
}

/// Tokens (bars, left axis) and requests (dots and a line, right axis) per day.
pub fn daily_chart(days: &[DayUsageView]) -> Markup {
    let token_max = nice_max(days.iter().map(|d| d.tokens).max().unwrap_or(0));
    let request_max = nice_max(days.iter().map(|d| d.requests).max().unwrap_or(0));
    let empty = days.iter().all(|d| d.tokens == 0 && d.requests == 0);
    let slot = PLOT_W / days.len().max(1) as f64;
    let x_of = |i: usize| LEFT + slot * i as f64;
    let request_y = |r: u64| y_of(r, request_max);
    let points: Vec<String> = days
        .iter()
        .enumerate()
        .map(|(i, d)| {
            format!(
                "{},{}",
                num(x_of(i) + slot / 2.0),
                num(request_y(d.requests))
            )
        })
        .collect();
    html! {
        svg #chart-daily .chart viewBox=(view_box()) role="img" aria-labelledby="chart-daily-title" {
            title #chart-daily-title { "Tokens and requests per day" }
            (y_axis(token_max, LEFT - 6.0, "end", "tokens"))
            (y_axis(request_max, WIDTH - RIGHT + 6.0, "start", "requests"))
            (legend(&[("tokens", "tokens"), ("requests", "requests")]))
            @for (i, d) in days.iter().enumerate() {
                g.day data-day=(d.day) data-tokens=(d.tokens) data-requests=(d.requests) data-denied=(d.denied) data-shadow-denied=(d.shadow_denied) {
                    title {
                        (d.day) ": " (grouped(d.tokens)) (plural(d.tokens, " token", " tokens")) ", " (grouped(d.requests)) (plural(d.requests, " request", " requests")) ", " (grouped(d.denied)) " denied (429)"
                        @if d.shadow_denied > 0 {
                            ", " (grouped(d.shadow_denied)) " a limit in shadow would have denied"
                        }
                    }
                    rect.tokens x=(num(x_of(i) + slot * 0.15)) y=(num(y_of(d.tokens, token_max))) width=(num(slot * 0.7)) height=(num(height_of(d.tokens, token_max))) {}
                    circle.requests cx=(num(x_of(i) + slot / 2.0)) cy=(num(request_y(d.requests))) r="2.5" {}
                    @if show_label(i, days.len(), 16) {
                        text.label x=(num(x_of(i) + slot / 2.0)) y=(num(HEIGHT - BOTTOM + 14.0)) text-anchor="middle" {
                            (d.day.get(8..).unwrap_or(&d.day).trim_start_matches('0'))
                        }
                    }
                }
            }
            @if points.len() > 1 {
                polyline.requests-line points=(points.join(" ")) {}
            }
            @if empty { (nothing_yet("No usage this month yet.")) }
        }
    }
}

/// Requests (bars) with the 429s stacked on top, per hour.
pub fn hourly_chart(hours: &[HourUsageView]) -> Markup {
    let max = nice_max(
        hours
            .iter()
            .map(|h| h.requests + h.denied)
            .max()
            .unwrap_or(0),
    );
    let empty = hours.iter().all(|h| h.requests == 0 && h.denied == 0);
    let slot = PLOT_W / hours.len().max(1) as f64;
    let x_of = |i: usize| LEFT + slot * i as f64 + slot * 0.1;
    let width = num(slot * 0.8);
    html! {
        svg #chart-hourly .chart viewBox=(view_box()) role="img" aria-labelledby="chart-hourly-title" {
            title #chart-hourly-title { "Requests and 429s per hour" }
            (y_axis(max, LEFT - 6.0, "end", "requests"))
            (legend(&[("requests", "requests"), ("denied", "denied (429)")]))
            @for (i, h) in hours.iter().enumerate() {
                @let at = h.hour.rfc3339();
                g.hour data-hour=(at) data-requests=(h.requests) data-denied=(h.denied) {
                    title { (at.get(..13).unwrap_or(&at)) ":00 UTC: " (grouped(h.requests)) (plural(h.requests, " request", " requests")) ", " (grouped(h.denied)) " denied (429), " (grouped(h.prompt_tokens)) " prompt and " (grouped(h.completion_tokens)) " completion tokens" }
                    rect.requests x=(num(x_of(i))) y=(num(y_of(h.requests, max))) width=(width) height=(num(height_of(h.requests, max))) {}
                    rect.denied x=(num(x_of(i))) y=(num(y_of(h.requests + h.denied, max))) width=(width) height=(num(height_of(h.denied, max))) {}
                    // Every sixth hour: the time, and the date at midnight.
                    @if at.get(11..13).and_then(|h| h.parse::<u32>().ok()).is_some_and(|h| h.is_multiple_of(6)) {
                        text.label x=(num(x_of(i))) y=(num(HEIGHT - BOTTOM + 14.0)) text-anchor="middle" {
                            @if at.get(11..13) == Some("00") { (at.get(5..10).unwrap_or("")) } @else { (at.get(11..16).unwrap_or("")) }
                        }
                    }
                }
            }
            @if empty { (nothing_yet("No requests in the last 48 hours.")) }
        }
    }
}

/// Each key's requests, tokens and 429s this month.
/// The daily chart's figures as a table, folded under the chart: what its bars' titles show on
/// hover, for a touch screen, a keyboard or a screen reader, which reach no hover (an outside
/// audit: on a phone they were nowhere else on the page). Days with usage only.
pub fn daily_figures(days: &[DayUsageView]) -> Markup {
    let used: Vec<&DayUsageView> = days
        .iter()
        .filter(|d| d.tokens > 0 || d.requests > 0 || d.denied > 0 || d.shadow_denied > 0)
        .collect();
    let shadow = used.iter().any(|d| d.shadow_denied > 0);
    html! {
        @if !used.is_empty() {
            details.figures #figures-daily {
                summary { "Figures per day" }
                table {
                    thead { tr {
                        th { "Day (UTC)" } th.num { "Tokens" } th.num { "Requests" } th.num { "429s" }
                        @if shadow { th.num { "Shadow denials" } }
                    } }
                    tbody {
                        @for d in &used {
                            tr {
                                td { (d.day) }
                                td.num { (grouped(d.tokens)) }
                                td.num { (grouped(d.requests)) }
                                td.num { (grouped(d.denied)) }
                                @if shadow { td.num { (grouped(d.shadow_denied)) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The hourly chart's figures as a table, as `daily_figures`: hours with requests only.
pub fn hourly_figures(hours: &[HourUsageView]) -> Markup {
    let used: Vec<&HourUsageView> = hours
        .iter()
        .filter(|h| h.requests > 0 || h.denied > 0)
        .collect();
    html! {
        @if !used.is_empty() {
            details.figures #figures-hourly {
                summary { "Figures per hour" }
                table {
                    thead { tr {
                        th { "Hour (UTC)" } th.num { "Requests" } th.num { "429s" } th.num { "Prompt tokens" } th.num { "Completion tokens" }
                    } }
                    tbody {
                        @for h in &used {
                            @let at = h.hour.rfc3339();
                            tr {
                                td { (at.get(..10).unwrap_or(&at)) " " (at.get(11..13).unwrap_or("")) ":00" }
                                td.num { (grouped(h.requests)) }
                                td.num { (grouped(h.denied)) }
                                td.num { (grouped(h.prompt_tokens)) }
                                td.num { (grouped(h.completion_tokens)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn keys_table(keys: &[KeyUsageView]) -> Markup {
    html! {
        table #usage-by-key {
            thead { tr { th { "Key" } th { "Name" } th.num { "Requests" } th.num { "Tokens" } th.num { "429s" } } }
            tbody {
                @for k in keys {
                    tr data-key-id=(k.key_id) data-requests=(k.requests) data-tokens=(k.tokens) data-denied=(k.denied) {
                        td { code { (k.prefix) "…" } @if k.revoked { " (revoked)" } }
                        td { (k.name.as_deref().unwrap_or("")) }
                        td.num { (grouped(k.requests)) }
                        td.num { (grouped(k.tokens)) }
                        td.num { (grouped(k.denied)) }
                    }
                }
                @if keys.is_empty() {
                    tr { td colspan="5" { "No keys." } }
                }
            }
        }
    }
}

fn view_box() -> String {
    format!("0 0 {WIDTH} {HEIGHT}")
}

/// The y of the top of a bar of `v` on a scale to `max`.
fn y_of(v: u64, max: u64) -> f64 {
    TOP + PLOT_H - height_of(v, max)
}

fn height_of(v: u64, max: u64) -> f64 {
    PLOT_H * (v.min(max) as f64 / max.max(1) as f64)
}

/// Three gridlines (0, half, the top) with their figures at `x`, and the axis's unit above.
fn y_axis(max: u64, x: f64, anchor: &str, unit: &str) -> Markup {
    html! {
        g.axis {
            @for (v, y) in [(0, TOP + PLOT_H), (max / 2, TOP + PLOT_H / 2.0), (max, TOP)] {
                line.grid x1=(num(LEFT)) x2=(num(WIDTH - RIGHT)) y1=(num(y)) y2=(num(y)) {}
                text.label x=(num(x)) y=(num(y + 3.5)) text-anchor=(anchor) { (short(v)) }
            }
            text.unit x=(num(x)) y=(num(TOP - 10.0)) text-anchor=(anchor) { (unit) }
        }
    }
}

fn legend(series: &[(&str, &str)]) -> Markup {
    html! {
        g.legend {
            @for (i, (class, label)) in series.iter().enumerate() {
                @let x = WIDTH / 2.0 - 90.0 + 110.0 * i as f64;
                rect class=(class) x=(num(x)) y="6" width="10" height="10" {}
                text.label x=(num(x + 14.0)) y="15" { (label) }
            }
        }
    }
}

fn nothing_yet(message: &str) -> Markup {
    html! {
        text.empty x=(num(LEFT + PLOT_W / 2.0)) y=(num(TOP + PLOT_H / 2.0)) text-anchor="middle" { (message) }
    }
}

/// Whether the `i`th of `n` slots gets a label: every one up to `every_up_to` slots, else
/// every other one (and the last).
fn show_label(i: usize, n: usize, every_up_to: usize) -> bool {
    n <= every_up_to || i.is_multiple_of(2) || i + 1 == n
}

/// The top of an axis for figures up to `max`: 2, 4 or 10 times a power of ten, so that its
/// half, the middle gridline, is a whole figure too.
fn nice_max(max: u64) -> u64 {
    let mut step = 1u64;
    loop {
        for m in [2, 4, 10] {
            let candidate = step.saturating_mul(m);
            if candidate >= max || candidate == u64::MAX {
                return candidate;
            }
        }
        step = step.saturating_mul(10);
    }
}

/// A coordinate, to a tenth.
fn num(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0")
        .map_or_else(|| s.clone(), str::to_string)
}

/// A figure for an axis: `950`, `1.5k`, `12k`, `3M`, `1.2B`, `4T`.
pub fn short(v: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1_000_000_000_000, "T"),
        (1_000_000_000, "B"),
        (1_000_000, "M"),
        (1_000, "k"),
    ];
    for (size, unit) in UNITS {
        if v >= size {
            let tenths = (v as u128 * 10 / size as u128) as u64;
            return if tenths >= 100 || tenths.is_multiple_of(10) {
                format!("{}{unit}", tenths / 10)
            } else {
                format!("{}.{}{unit}", tenths / 10, tenths % 10)
            };
        }
    }
    v.to_string()
}

/// An exact figure with thousands separated: `1,234,567`.
pub fn grouped(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `one` for 1, else `many` ("1 request", "2 requests", "0 requests").
fn plural(n: u64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::views::Timestamp;

    fn day(day: &str, requests: u64, tokens: u64, denied: u64) -> DayUsageView {
        DayUsageView {
            day: day.into(),
            requests,
            tokens,
            denied,
            shadow_denied: 0,
        }
    }

    fn hour(at: i64, requests: u64, denied: u64) -> HourUsageView {
        HourUsageView {
            hour: Timestamp(at),
            requests,
            denied,
            prompt_tokens: 3 * requests,
            completion_tokens: 5 * requests,
        }
    }

    /// Every number in the drawing's coordinates is finite and within the drawing.
    fn coordinates_in_bounds(svg: &str) {
        for attr in [
            " x=\"",
            " y=\"",
            " width=\"",
            " height=\"",
            " cx=\"",
            " cy=\"",
        ] {
            for part in svg.split(attr).skip(1) {
                let v: f64 = part[..part.find('"').unwrap()].parse().unwrap();
                assert!(
                    v.is_finite() && (0.0..=WIDTH).contains(&v),
                    "{attr}{v} in {svg}"
                );
            }
        }
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    #[test]
    fn figures_are_shortened_for_axes_and_grouped_for_tables() {
        let cases = [
            (0, "0"),
            (999, "999"),
            (1_000, "1k"),
            (1_500, "1.5k"),
            (12_345, "12k"),
            (2_000_000, "2M"),
            (1_250_000_000, "1.2B"),
            (4_000_000_000_000, "4T"),
            (u64::MAX, "18446744T"),
        ];
        for (v, text) in cases {
            assert_eq!(short(v), text, "{v}");
        }
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
        for (max, top) in [
            (0, 2),
            (1, 2),
            (3, 4),
            (7, 10),
            (11, 20),
            (2_000_001, 4_000_000),
        ] {
            assert_eq!(nice_max(max), top, "{max}");
        }
        assert_eq!(nice_max(u64::MAX), u64::MAX);
    }

    #[test]
    fn the_charts_figures_are_in_tables_for_who_cannot_hover() {
        let days = vec![
            day("2026-12-01", 0, 0, 0),
            day("2026-12-02", 1_234, 56_789, 3),
        ];
        let table = daily_figures(&days).into_string();
        assert!(table.starts_with("<details class=\"figures\" id=\"figures-daily\">"));
        assert!(table.contains("<td>2026-12-02</td><td class=\"num\">56,789</td><td class=\"num\">1,234</td><td class=\"num\">3</td>"), "{table}");
        assert!(
            !table.contains("2026-12-01"),
            "a day without usage: {table}"
        );
        assert!(!table.contains("Shadow"), "{table}");
        let hours = vec![hour(1_796_083_200, 0, 0), hour(1_796_086_800, 7, 2)];
        let table = hourly_figures(&hours).into_string();
        assert_eq!(
            table.matches("<tr>").count(),
            2,
            "the heading and one hour: {table}"
        );
        assert!(table.contains("<td class=\"num\">7</td><td class=\"num\">2</td><td class=\"num\">21</td><td class=\"num\">35</td>"), "{table}");
        // Nothing to show, no table.
        assert_eq!(daily_figures(&days[..1]).into_string(), "");
        assert_eq!(hourly_figures(&hours[..1]).into_string(), "");
    }

    #[test]
    fn charts_without_usage_draw_their_axes_and_say_so() {
        let days = vec![day("2026-12-01", 0, 0, 0), day("2026-12-02", 0, 0, 0)];
        let svg = daily_chart(&days).into_string();
        assert!(
            svg.starts_with("<svg class=\"chart\" id=\"chart-daily\""),
            "{svg}"
        );
        assert!(svg.contains("No usage this month yet."), "{svg}");
        assert_eq!(svg.matches("data-day=").count(), 2);
        assert!(svg.contains("data-day=\"2026-12-02\" data-tokens=\"0\" data-requests=\"0\""));
        coordinates_in_bounds(&svg);
        let hours: Vec<_> = (0..48)
            .map(|i| hour(1_796_083_200 + i * 3600, 0, 0))
            .collect();
        let svg = hourly_chart(&hours).into_string();
        assert!(svg.contains("No requests in the last 48 hours."), "{svg}");
        assert_eq!(svg.matches("data-hour=").count(), 48);
        coordinates_in_bounds(&svg);
        // Nothing at all (never sent, but never a panic or a NaN either).
        coordinates_in_bounds(&daily_chart(&[]).into_string());
        coordinates_in_bounds(&hourly_chart(&[]).into_string());
    }

    #[test]
    fn one_day_fills_the_scale_and_its_title_gives_the_exact_figures() {
        let svg = daily_chart(&[day("2026-12-01", 4, 123, 2)]).into_string();
        assert!(!svg.contains("No usage"), "{svg}");
        assert!(svg.contains(
            "data-day=\"2026-12-01\" data-tokens=\"123\" data-requests=\"4\" data-denied=\"2\""
        ));
        assert!(svg.contains("<title>2026-12-01: 123 tokens, 4 requests, 2 denied (429)</title>"));
        assert_eq!(plural(1, " request", " requests"), " request");
        assert_eq!(plural(0, " request", " requests"), " requests");
        // The axes go to 200 tokens and 4 requests; the day is labelled "1".
        assert!(
            svg.contains(">200</text>") && svg.contains(">4</text>"),
            "{svg}"
        );
        assert!(svg.contains(">1</text>"), "{svg}");
        // One point: no line.
        assert!(!svg.contains("polyline"), "{svg}");
        coordinates_in_bounds(&svg);
    }

    #[test]
    fn big_figures_are_exact_in_data_and_titles_and_short_on_axes() {
        let big = 3_456_789_012_345;
        let days = vec![
            day("2026-12-01", 1, 0, 0),
            day("2026-12-02", 9_000_000, big, 0),
        ];
        let svg = daily_chart(&days).into_string();
        assert!(svg.contains(&format!("data-tokens=\"{big}\"")), "{svg}");
        assert!(
            svg.contains("3,456,789,012,345 tokens, 9,000,000 requests"),
            "{svg}"
        );
        assert!(
            svg.contains(">4T</text>") && svg.contains(">10M</text>"),
            "{svg}"
        );
        assert!(svg.contains("<polyline"), "{svg}");
        coordinates_in_bounds(&svg);
        let mut hours: Vec<_> = (0..48)
            .map(|i| hour(1_796_083_200 + i * 3600, 0, 0))
            .collect();
        hours[47] = hour(1_796_083_200 + 47 * 3600, 2_000_000, 500_000);
        let svg = hourly_chart(&hours).into_string();
        assert!(svg.contains(
            "data-hour=\"2026-12-02T23:00:00Z\" data-requests=\"2000000\" data-denied=\"500000\""
        ));
        assert!(
            svg.contains(">4M</text>") && svg.contains(">2M</text>"),
            "{svg}"
        );
        // Midnight shows the date, other sixth hours the time.
        assert!(
            svg.contains(">12-02</text>") && svg.contains(">06:00</text>"),
            "{svg}"
        );
        coordinates_in_bounds(&svg);
    }

    #[test]
    fn key_names_are_escaped() {
        let keys = vec![KeyUsageView {
            key_id: 7,
            prefix: "tg_abc".into(),
            name: Some("<script>alert(1)</script> & \"x\"".into()),
            revoked: true,
            requests: 1_234,
            tokens: 5,
            denied: 0,
        }];
        let html = keys_table(&keys).into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;x&quot;"));
        assert!(html.contains(
            "data-key-id=\"7\" data-requests=\"1234\" data-tokens=\"5\" data-denied=\"0\""
        ));
        assert!(
            html.contains(">1,234<") && html.contains("(revoked)"),
            "{html}"
        );
        assert!(keys_table(&[]).into_string().contains("No keys."));
    }
}
