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

/// What a request to a `/v1/` route gets of CORS when `cors_origins` is set.
pub(crate) struct Allowed {
    /// The `Access-Control-Allow-Origin`: the origin, or `*` when every origin may; `None` for
    /// a request from no origin, or one not listed.
    origin: Option<HeaderValue>,
    /// Whether the answer depends on the origin (listed origins): then it says so
    /// (`Vary: Origin`), whatever the origin, so that no shared cache gives one origin's answer
    /// to another.
    varies: bool,
}

/// What the request gets of CORS: `None` when `cors_origins` is not set or the path is not under
/// `/v1/`.
pub(crate) fn allowed<B>(origins: &CorsOrigins, request: &Request<B>) -> Option<Allowed> {
    if matches!(origins, CorsOrigins::None) || !request.uri().path().starts_with("/v1/") {
        return None;
    }
    let origin = request
        .headers()
        .get(ORIGIN)
        .and_then(|o| o.to_str().ok())
        .and_then(|o| origins.allow(o))
        .and_then(|allow| HeaderValue::from_str(allow).ok());
    Some(Allowed {
        origin,
        varies: matches!(origins, CorsOrigins::Listed(_)),
    })
}

/// The answer to a preflight from an allowed origin; `None` for any other request. The methods
/// of the `/v1/` routes, and whatever headers the page asked to send (its key among them).
pub(crate) fn preflight<B>(allowed: &Allowed, request: &Request<B>) -> Option<Response> {
    let origin = allowed.origin.as_ref()?;
    let asked = request.headers();
    if request.method() != Method::OPTIONS || !asked.contains_key(ACCESS_CONTROL_REQUEST_METHOD) {
        return None;
    }
    let mut answer = StatusCode::NO_CONTENT.into_response();
    let h = answer.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
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
        if let Some(origin) = self.origin {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("*"));
        }
        if self.varies {
            h.append(VARY, HeaderValue::from_static("origin"));
        }
    }
}
