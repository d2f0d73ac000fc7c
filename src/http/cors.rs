//! CORS on the main listener's `/v1/` routes, for the web origins `cors_origins` allows: a page
//! of such an origin may call the gateway from a browser with a workspace key. A preflight
//! (`OPTIONS` with `Access-Control-Request-Method`) from such an origin is answered here, before
//! any key is asked for (a browser sends none with it): `204`, counted against nothing and not
//! forwarded. Every other answer to such an origin (a `401` or a `429` too, so that a page can
//! read why and when to retry) says the origin may read it and every header it carries. Without
//! `cors_origins` (the default), nothing here runs: no CORS header is sent, and a preflight is
//! refused as any request without a key is.

use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::config::CorsOrigins;

/// A request from an origin that may read the answer.
pub(crate) struct Allowed {
    /// The `Access-Control-Allow-Origin`: the origin, or `*` when every origin may.
    origin: HeaderValue,
    any: bool,
}

/// Whether the request is to a `/v1/` route from an origin `origins` allows.
pub(crate) fn allowed<B>(origins: &CorsOrigins, request: &Request<B>) -> Option<Allowed> {
    if matches!(origins, CorsOrigins::None) || !request.uri().path().starts_with("/v1/") {
        return None;
    }
    let origin = request.headers().get(ORIGIN)?.to_str().ok()?;
    let allow = origins.allow(origin)?;
    Some(Allowed {
        origin: HeaderValue::from_str(allow).ok()?,
        any: allow == "*",
    })
}

/// The answer to a preflight from an allowed origin; `None` for any other request. The methods
/// of the `/v1/` routes, and whatever headers the page asked to send (its key among them).
pub(crate) fn preflight<B>(allowed: &Allowed, request: &Request<B>) -> Option<Response> {
    let asked = request.headers();
    if request.method() != Method::OPTIONS || !asked.contains_key(ACCESS_CONTROL_REQUEST_METHOD) {
        return None;
    }
    let mut answer = StatusCode::NO_CONTENT.into_response();
    let h = answer.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allowed.origin.clone());
    h.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
    );
    if let Some(headers) = asked.get(ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(ACCESS_CONTROL_ALLOW_HEADERS, headers.clone());
    }
    h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    h.insert(
        VARY,
        HeaderValue::from_static(
            "origin, access-control-request-method, access-control-request-headers",
        ),
    );
    Some(answer)
}

impl Allowed {
    /// Lets the origin read the answer and its headers (`*`: every header but those of
    /// credentials, which these requests do not use).
    pub(crate) fn apply(self, h: &mut HeaderMap) {
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, self.origin);
        h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("*"));
        if !self.any {
            h.append(VARY, HeaderValue::from_static("origin"));
        }
    }
}
