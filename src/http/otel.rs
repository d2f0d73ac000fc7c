//! OpenTelemetry (the cargo feature `otel`): one span per proxied request, whose parent is the
//! client's `traceparent` when it sent one, and whose context is passed to the upstream in
//! `traceparent`, so that the upstream's spans join the same trace. Exporting the spans is the
//! binary's (`main.rs`), and only when an OTLP endpoint is configured.

use axum::http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The span of one proxied request, child of the client's trace context if any.
pub fn request_span(headers: &HeaderMap, path: &str) -> tracing::Span {
    let route = crate::estimate::Endpoint::of_path(path).map_or("other", |e| e.path());
    let span = tracing::info_span!(
        target: "tiergate::otel",
        "request",
        otel.name = route,
        otel.kind = "server",
        http.route = route,
        http.response.status_code = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
    span
}

/// Writes the current span's context into the upstream request's headers (`traceparent`).
pub fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}
