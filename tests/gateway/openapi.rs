//! The OpenAPI document (`/openapi.json`) against the gateway that serves it:
//! - it is OpenAPI 3.1, its references resolve, its operation ids are unique and each operation
//!   names a security scheme it defines;
//! - each listener documents exactly the admin and workspace routes that the README lists for
//!   it, and no route answers a method its document does not list (`405` with `Allow`);
//! - every answer of those routes, successes and errors, is one the document allows for that
//!   operation and status, and its body matches the schema, by the strict validator below. Every
//!   documented (operation, status) is produced at least once, except `408` and `503` (a body
//!   sent too slowly, a database down: `faults.rs` and `tests/postgres.rs` test those answers);
//! - every body an operation took (a `2xx`) matches the document's request body for it, and
//!   every operation answers a query parameter it does not take with a `400` it documents.
//!
//! The validator is written here, over the part of JSON Schema that utoipa emits: `$ref` to the
//! components, `type` (one or a list), `enum`, `properties`, `required`, `additionalProperties`,
//! `items`, `oneOf`, `allOf`, and the annotations `format`, `minimum`, `description`,
//! `propertyNames`. A keyword it does not know fails the test, so the document cannot grow a
//! construct that would be skipped unchecked. The `jsonschema` crate would bring a large tree
//! (regex engines, time, URL and HTTP crates for remote references) for this, and could not be
//! as strict as this test must be: here an object allows only the properties its schema lists
//! (JSON Schema allows any unless `additionalProperties: false`), so an answer with a field the
//! document does not describe fails, as does one missing a required field. It also holds the
//! document to the answers' convention on null: a property that an answer may leave out is never
//! `null`, and one that may be `null` is always sent (required).

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tiergate::http::extract::MAX_API_BODY;

use crate::harness::*;

/// Routes as `(METHOD, path)`, path parameters as written in the README (`{id}`).
type Routes = BTreeSet<(String, String)>;

/// The routes the README lists under "The workspace's own" and under "Admin".
fn readme_routes() -> (Routes, Routes) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let endpoints = readme
        .find("\n## Endpoints")
        .expect("## Endpoints in README");
    // The routes in code spans (`GET /v1/limits`) from the heading `start` to the next heading.
    let section = |start: &str| -> Routes {
        let from = endpoints
            + readme[endpoints..]
                .find(start)
                .unwrap_or_else(|| panic!("{start} in README"));
        let body = &readme[from + start.len()..];
        let body = &body[..body.find("\n#").unwrap_or(body.len())];
        let mut routes = BTreeSet::new();
        for chunk in body.split('`').skip(1).step_by(2) {
            let Some((method, rest)) = chunk.split_once(' ') else {
                continue;
            };
            if ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method) && rest.starts_with('/')
            {
                let path = rest.split(['?', ' ']).next().unwrap();
                routes.insert((method.to_string(), path.to_string()));
            }
        }
        routes
    };
    let workspace = section("\n### The workspace's own");
    let admin = section("\n### Admin (");
    assert!(
        workspace.len() >= 4 && admin.len() >= 14,
        "{workspace:?} {admin:?}"
    );
    (workspace, admin)
}

/// The document's operations, as `(METHOD, path)`.
fn documented_routes(doc: &Value) -> Routes {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            routes.insert((method.to_uppercase(), path.clone()));
        }
    }
    routes
}

async fn fetch_document(gw: &TestGateway, base: &str) -> Value {
    // No token needed.
    let r = gw
        .client
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    r.json().await.unwrap()
}

/// The strict validator (see the top of this file) over one document's schemas.
struct Schemas<'a> {
    doc: &'a Value,
}

const KEYWORDS: &[&str] = &[
    "$ref",
    "type",
    "enum",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "oneOf",
    "allOf",
    "format",
    "minimum",
    "maximum",
    "description",
    "propertyNames",
];

impl<'a> Schemas<'a> {
    fn resolve(&self, reference: &Value) -> &'a Value {
        let name = reference
            .as_str()
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
            .unwrap_or_else(|| panic!("a reference outside the components: {reference}"));
        let schema = &self.doc["components"]["schemas"][name];
        assert!(schema.is_object(), "no schema {name}");
        schema
    }

    /// `schema` with its `$ref`s followed.
    fn target(&self, mut schema: &'a Value) -> &'a Value {
        while let Some(r) = schema.get("$ref") {
            schema = self.resolve(r);
        }
        schema
    }

    fn check(&self, schema: &'a Value, value: &Value, at: &str) -> Result<(), String> {
        self.check_object(schema, value, at, true)
    }

    /// `closed`: an object may hold only the properties listed here (false for the parts of an
    /// `allOf`, which list only some; the `allOf` checks the union).
    fn check_object(
        &self,
        schema: &'a Value,
        value: &Value,
        at: &str,
        closed: bool,
    ) -> Result<(), String> {
        let object = schema
            .as_object()
            .unwrap_or_else(|| panic!("{at}: a schema that is not an object: {schema}"));
        for keyword in object.keys() {
            assert!(
                KEYWORDS.contains(&keyword.as_str()),
                "{at}: the validator does not know the keyword '{keyword}' of {schema}; teach it"
            );
        }
        if let Some(r) = object.get("$ref") {
            return self.check_object(self.resolve(r), value, at, closed);
        }
        if let Some(one_of) = object.get("oneOf") {
            let errors: Vec<String> = one_of
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|s| self.check(s, value, at).err())
                .collect();
            let matched = one_of.as_array().unwrap().len() - errors.len();
            if matched != 1 {
                return Err(format!(
                    "{at}: {value} matches {matched} schemas of oneOf, not 1 ({errors:?})"
                ));
            }
        }
        if let Some(all_of) = object.get("allOf") {
            let mut names = BTreeSet::new();
            for part in all_of.as_array().unwrap() {
                self.check_object(part, value, at, false)?;
                if let Some(properties) = self.target(part).get("properties") {
                    names.extend(properties.as_object().unwrap().keys().cloned());
                }
            }
            if let Some(value) = value.as_object() {
                if let Some(extra) = value.keys().find(|k| !names.contains(*k)) {
                    return Err(format!("{at}: '{extra}' is in no part of the allOf"));
                }
            }
        }
        if let Some(types) = object.get("type") {
            let types: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
                other => panic!("{at}: type {other}"),
            };
            let fits = |t: &str| match t {
                "null" => value.is_null(),
                "boolean" => value.is_boolean(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "object" => value.is_object(),
                "array" => value.is_array(),
                other => panic!("{at}: type {other}"),
            };
            if !types.iter().any(|t| fits(t)) {
                return Err(format!("{at}: {value} is not of type {types:?}"));
            }
        }
        if let Some(values) = object.get("enum") {
            if !values.as_array().unwrap().contains(value) {
                return Err(format!("{at}: {value} is not one of {values}"));
            }
        }
        if let (Some(format), false) = (object.get("format"), value.is_null()) {
            let ok = match format.as_str().unwrap() {
                "date-time" => value.as_str().is_some_and(|s| {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .is_ok()
                }),
                "date" => value.as_str().is_some_and(|s| {
                    let f = time::macros::format_description!("[year]-[month]-[day]");
                    time::Date::parse(s, &f).is_ok()
                }),
                "int32" => value
                    .as_i64()
                    .map(|n| i32::try_from(n).is_ok() || u32::try_from(n).is_ok())
                    .unwrap_or(false),
                "int64" => value.is_i64() || value.is_u64(),
                "double" => value.is_number(),
                other => panic!("{at}: the validator does not know the format '{other}'"),
            };
            if !ok {
                return Err(format!("{at}: {value} is not a {format}"));
            }
        }
        if let (Some(minimum), Some(n)) = (object.get("minimum"), value.as_f64()) {
            if n < minimum.as_f64().unwrap() {
                return Err(format!("{at}: {value} is below {minimum}"));
            }
        }
        if let (Some(maximum), Some(n)) = (object.get("maximum"), value.as_f64()) {
            if n > maximum.as_f64().unwrap() {
                return Err(format!("{at}: {value} is above {maximum}"));
            }
        }
        if let (Some(items), Some(array)) = (object.get("items"), value.as_array()) {
            for (i, item) in array.iter().enumerate() {
                self.check(items, item, &format!("{at}[{i}]"))?;
            }
        }
        if let Some(fields) = value.as_object() {
            let properties = object.get("properties").and_then(Value::as_object);
            for name in object
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if !fields.contains_key(name.as_str().unwrap()) {
                    return Err(format!("{at}: the required '{name}' is missing"));
                }
            }
            for (name, field) in fields {
                let at = format!("{at}.{name}");
                match (
                    properties.and_then(|p| p.get(name)),
                    object.get("additionalProperties"),
                ) {
                    (Some(property), _) => self.check(property, field, &at)?,
                    (None, Some(Value::Bool(false))) => {
                        return Err(format!("{at}: not allowed (additionalProperties: false)"))
                    }
                    (None, Some(Value::Bool(true))) => {}
                    (None, Some(additional)) => self.check(additional, field, &at)?,
                    // Strict: an object that lists its properties has no others.
                    (None, None) if properties.is_some() && closed => {
                        return Err(format!("{at}: not in the schema"))
                    }
                    // A free-form object (an audit entry's `before` and `after`).
                    (None, None) => {}
                }
            }
        }
        Ok(())
    }

    /// Whether `schema` admits `null`.
    fn admits_null(&self, schema: &'a Value) -> bool {
        let schema = self.target(schema);
        let typed = match &schema["type"] {
            Value::String(t) => t == "null",
            Value::Array(ts) => ts.contains(&json!("null")),
            _ => false,
        };
        typed
            || schema["oneOf"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| self.admits_null(s)))
    }

    /// The answers' convention on null, over every schema reachable from `schema`: a property
    /// that may be left out is never `null`, one that may be `null` is always sent.
    fn lint(&self, schema: &'a Value, at: &str, seen: &mut BTreeSet<String>) {
        if let Some(r) = schema.get("$ref") {
            if seen.insert(r.to_string()) {
                self.lint(self.resolve(r), &r.to_string(), seen);
            }
            return;
        }
        let required: BTreeSet<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r.as_str().unwrap())
            .collect();
        if let Some(properties) = schema["properties"].as_object() {
            for (name, property) in properties {
                assert!(
                    required.contains(name.as_str()) || !self.admits_null(property),
                    "{at}.{name}: may be left out and may be null; an answer does one or the other"
                );
                self.lint(property, &format!("{at}.{name}"), seen);
            }
        }
        for key in ["items", "additionalProperties"] {
            if schema[key].is_object() {
                self.lint(&schema[key], &format!("{at}.{key}"), seen);
            }
        }
        for key in ["oneOf", "allOf"] {
            for s in schema[key].as_array().into_iter().flatten() {
                self.lint(s, at, seen);
            }
        }
    }
}

/// The checks every document must pass, whatever it lists.
fn check_document(doc: &Value) {
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    let schemas = Schemas { doc };
    // Every reference resolves.
    fn references<'v>(v: &'v Value, out: &mut Vec<&'v Value>) {
        match v {
            Value::Object(o) => {
                if let Some(r) = o.get("$ref") {
                    out.push(r);
                }
                o.values().for_each(|v| references(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| references(v, out)),
            _ => {}
        }
    }
    let mut refs = Vec::new();
    references(doc, &mut refs);
    refs.iter().for_each(|r| {
        schemas.resolve(r);
    });
    let security_schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    let mut ids = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id), "operationId {id} twice");
            let tag = op["tags"][0].as_str().unwrap();
            let scheme = match path.as_str() {
                "/limits" => None,
                p if p.starts_with("/admin/v1/") => Some("admin_token"),
                p if p.starts_with("/v1/") => Some("workspace_key"),
                p => panic!("{p}: neither the admin nor the workspace's API"),
            };
            assert_eq!(
                tag,
                if scheme == Some("admin_token") {
                    "admin"
                } else {
                    "workspace"
                },
                "{method} {path}"
            );
            match scheme {
                Some(scheme) => {
                    assert_eq!(op["security"], json!([{ scheme: [] }]), "{method} {path}");
                    let s = &security_schemes[scheme];
                    assert_eq!(
                        (&s["type"], &s["scheme"]),
                        (&json!("http"), &json!("bearer"))
                    );
                }
                None => assert!(op.get("security").is_none(), "{method} {path}"),
            }
            for (status, response) in op["responses"].as_object().unwrap() {
                assert!(
                    response["description"].is_string(),
                    "{method} {path} {status}"
                );
                for media in response["content"].as_object().into_iter().flatten() {
                    schemas.lint(
                        &media.1["schema"],
                        &format!("{method} {path} {status}"),
                        &mut seen,
                    );
                }
            }
        }
    }
}

/// An answer that the document must allow.
enum Body {
    None,
    Json(Value),
    Raw(Vec<u8>),
}

/// Calls routes and checks each answer against the document; remembers which (method, path,
/// status) were seen.
struct Checker {
    doc: Value,
    client: reqwest::Client,
    seen: BTreeSet<(String, String, u16)>,
}

impl Checker {
    fn new(doc: Value) -> Checker {
        check_document(&doc);
        Checker {
            doc,
            // Redirects are answers to check, not to follow (`GET /limits`).
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            seen: BTreeSet::new(),
        }
    }

    /// The document's path that `path` (without its query) is an instance of.
    fn template(&self, method: &Method, path: &str) -> String {
        let path = path.split('?').next().unwrap();
        let segments: Vec<&str> = path.split('/').collect();
        let found: Vec<&String> = self.doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(template, item)| {
                let t: Vec<&str> = template.split('/').collect();
                t.len() == segments.len()
                    && t.iter()
                        .zip(&segments)
                        .all(|(t, s)| t == s || (t.starts_with('{') && t.ends_with('}')))
                    && item.get(method.as_str().to_lowercase()).is_some()
            })
            .map(|(template, _)| template)
            .collect();
        assert_eq!(found.len(), 1, "{method} {path}: {found:?}");
        found[0].clone()
    }

    /// Sends the request to `base`, checks the answer against the document, and returns it.
    async fn call(
        &mut self,
        base: &str,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Body,
    ) -> (StatusCode, Value) {
        let template = self.template(&method, path);
        let sent = match &body {
            Body::Json(v) => Some(v.clone()),
            _ => None,
        };
        let mut request = self.client.request(method.clone(), format!("{base}{path}"));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request = match body {
            Body::None => request,
            Body::Json(v) => request.json(&v),
            Body::Raw(bytes) => request
                .header("content-type", "application/json")
                .body(bytes),
        };
        let r = request.send().await.unwrap();
        let status = r.status();
        let content_type = header(&r, "content-type").unwrap_or_default().to_string();
        let text = r.text().await.unwrap();
        let what = format!("{method} {path} -> {status}");
        let op = &self.doc["paths"][&template][method.as_str().to_lowercase()];
        // A body the operation took is one its document describes (a client generated from
        // the document sends what it says).
        if let (Some(sent), true) = (&sent, status.is_success()) {
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            assert!(
                schema.is_object(),
                "{method} {path}: took a body it does not describe"
            );
            let schemas = Schemas { doc: &self.doc };
            if let Err(e) = schemas.check(schema, sent, "request") {
                panic!(
                    "{method} {path} took a body that does not match the document: {e}\n{sent:#}"
                );
            }
        }
        let response = &op["responses"][status.as_str()];
        assert!(
            response.is_object(),
            "{what}: the document has no such answer for {template}: {text}"
        );
        self.seen
            .insert((method.to_string(), template, status.as_u16()));
        let Some(content) = response["content"].as_object() else {
            // An answer without a body (a redirect): the document says so, and it has none.
            assert!(
                text.is_empty(),
                "{what}: a body the document does not describe: {text}"
            );
            return (status, Value::Null);
        };
        assert_eq!(content.len(), 1, "{what}");
        let (media, media_type) = content.iter().next().unwrap();
        assert!(
            content_type.starts_with(media.as_str()),
            "{what}: {content_type}"
        );
        if media != "application/json" {
            assert_eq!(media_type["schema"]["type"], "string", "{what}");
            return (status, Value::String(text));
        }
        let value: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
        let schemas = Schemas { doc: &self.doc };
        if let Err(e) = schemas.check(&media_type["schema"], &value, "answer") {
            panic!("{what}: the answer does not match the document: {e}\n{value:#}");
        }
        (status, value)
    }

    async fn expect(
        &mut self,
        base: &str,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Body,
        status: StatusCode,
    ) -> Value {
        let (s, v) = self.call(base, token, method.clone(), path, body).await;
        assert_eq!(s, status, "{method} {path}: {v}");
        v
    }

    /// An admin API call with the admin token.
    async fn admin(
        &mut self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        status: StatusCode,
    ) -> Value {
        let body = body.map_or(Body::None, Body::Json);
        self.expect(base, Some(ADMIN), method, path, body, status)
            .await
    }

    /// A workspace API call with `key`.
    async fn keyed(
        &mut self,
        base: &str,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        status: StatusCode,
    ) -> Value {
        let body = body.map_or(Body::None, Body::Json);
        self.expect(base, Some(key), method, path, body, status)
            .await
    }

    /// Every documented (method, path, status).
    fn documented(&self) -> BTreeSet<(String, String, u16)> {
        let mut all = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for status in op["responses"].as_object().unwrap().keys() {
                    all.insert((method.to_uppercase(), path.clone(), status.parse().unwrap()));
                }
            }
        }
        all
    }
}

#[tokio::test]
async fn each_listener_documents_the_routes_it_serves_as_the_readme_lists_them() {
    let (workspace, admin) = readme_routes();
    let both: BTreeSet<_> = workspace.union(&admin).cloned().collect();

    // One listener: both APIs.
    let gw = TestGateway::start().await;
    let doc = fetch_document(&gw, &gw.url).await;
    check_document(&doc);
    assert_eq!(documented_routes(&doc), both);
    // The workspace API's routes are those the gateway matches in any letter case.
    let firsts: BTreeSet<&str> = workspace
        .iter()
        .filter_map(|(_, path)| path.strip_prefix("/v1/"))
        .map(|rest| rest.split('/').next().unwrap())
        .collect();
    let own: BTreeSet<&str> = tiergate::http::OWN_V1_ROUTES.into_iter().collect();
    assert_eq!(firsts, own);
    // No method beyond those documented: a route answers any other with 405 and `Allow`.
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "1").replace("{name}", "free");
        let r = gw
            .client
            .request(Method::OPTIONS, format!("{}{concrete}", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        let allowed: BTreeSet<String> = header(&r, "allow")
            .unwrap_or_default()
            .split(',')
            .map(|m| m.trim().to_lowercase())
            .filter(|m| m != "head")
            .collect();
        let documented: BTreeSet<String> = item.as_object().unwrap().keys().cloned().collect();
        assert_eq!(allowed, documented, "{path}");
    }

    // With an admin listener: each listener's document has what it serves.
    let gw = TestGateway::start_with(Options {
        admin_listener: true,
        ..Options::default()
    })
    .await;
    let main = fetch_document(&gw, &gw.url).await;
    let operator = fetch_document(&gw, gw.admin_url.as_deref().unwrap()).await;
    check_document(&main);
    check_document(&operator);
    assert_eq!(documented_routes(&main), workspace);
    assert_eq!(documented_routes(&operator), admin);
    // Only the tags and security schemes of what each lists.
    let names = |doc: &Value, key: &str| -> Vec<String> {
        let tags = doc["tags"].as_array().unwrap().iter();
        let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
        match key {
            "tags" => tags.map(|t| t["name"].as_str().unwrap().into()).collect(),
            _ => schemes.keys().cloned().collect(),
        }
    };
    assert_eq!(names(&main, "tags"), ["workspace"]);
    assert_eq!(names(&main, "schemes"), ["workspace_key"]);
    assert_eq!(names(&operator, "tags"), ["admin"]);
    assert_eq!(names(&operator, "schemes"), ["admin_token"]);
}

#[tokio::test]
async fn every_answer_of_the_admin_and_workspace_apis_matches_the_document() {
    use Method as M;
    // Webhook retries ten minutes apart: a delivery's first attempt is its only one here, so
    // none is under way when the test gives it up through the store (below).
    let gw = TestGateway::start_with(Options {
        raw: tiergate::config::RawSettings {
            webhook_retry_base_ms: Some(600_000),
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    let b = gw.url.as_str();
    let mut api = Checker::new(fetch_document(&gw, b).await);
    let (ok, created) = (StatusCode::OK, StatusCode::CREATED);
    let id = |v: &Value| v["id"].as_i64().unwrap();
    let secret = |v: &Value| v["key"].as_str().unwrap().to_string();

    // Successes, showing both ways the fields that may be null or left out.
    let richer = json!({"rank": 51, "tokens_per_minute": 1000000});
    api.admin(b, M::PUT, "/admin/v1/tiers/richer", Some(richer), ok)
        .await;
    let rich = json!({
        "rank": 50,
        "requests_per_second": 2.5, "burst": 4, "tokens_per_minute": 100000,
        "tokens_per_month": 10000000, "concurrent_requests": 5,
        "models": {"mock-small": {"tokens_per_minute": 50000, "tokens_per_month": 5000000}},
        "promotion": {"to": "richer", "min_days": 30, "min_tokens_30d": 5,
            "min_attributes": {"paid_usd": 5, "verified": true}},
    });
    api.admin(b, M::PUT, "/admin/v1/tiers/rich", Some(rich), ok)
        .await;
    let bare = api.admin(b, M::PUT, "/admin/v1/tiers/bare", Some(json!({})), ok);
    assert_eq!(bare.await, json!({"name": "bare"}));
    // In a tier's body, null is a field left out, as the document says (an outside audit with
    // schemathesis found `models: null` refused and the others taken, none documented).
    let nulls = json!({"rank": null, "requests_per_second": null, "burst": null,
        "tokens_per_minute": null, "tokens_per_month": null, "concurrent_requests": null,
        "models": null, "promotion": null, "enforcement": null, "shadow": null});
    let put = api.admin(b, M::PUT, "/admin/v1/tiers/nulls", Some(nulls), ok);
    assert_eq!(put.await, json!({"name": "nulls"}));
    api.admin(b, M::GET, "/admin/v1/tiers", None, ok).await;
    let workspaces = "/admin/v1/workspaces";
    let body = json!({"name": "rich", "tier": "rich"});
    let rich_ws = id(&api.admin(b, M::POST, workspaces, Some(body), created).await);
    let body = json!({"name": "bare", "tier": "bare"});
    let bare_ws = id(&api.admin(b, M::POST, workspaces, Some(body), created).await);
    let body = json!({"name": "free"});
    let free_ws = id(&api.admin(b, M::POST, workspaces, Some(body), created).await);
    api.admin(b, M::GET, workspaces, None, ok).await;
    let rich_path = format!("/admin/v1/workspaces/{rich_ws}");
    api.admin(b, M::GET, &rich_path, None, ok).await;
    let patch =
        json!({"limits": {"tokens_per_month": 20000000, "burst": null}, "status": "active"});
    let patched = api.admin(b, M::PATCH, &rich_path, Some(patch), ok).await;
    assert_eq!(patched["overrides"], json!({"tokens_per_month": 20000000}));
    let attributes = format!("{rich_path}/attributes");
    let set = json!({"paid_usd": 1, "verified": true});
    let set = api.admin(b, M::PUT, &attributes, Some(set), ok).await;
    assert_eq!(set["tier"], "rich", "not yet qualified: {set}");
    let keys = format!("{rich_path}/keys");
    let named = json!({"name": "main", "expires_at": "2099-01-01T00:00:00Z"});
    let rich_made = api.admin(b, M::POST, &keys, Some(named), created).await;
    let rich_key = secret(&rich_made);
    let unnamed = api.admin(b, M::POST, &keys, None, created).await;
    let bare_keys = format!("/admin/v1/workspaces/{bare_ws}/keys");
    let bare_made = api
        .admin(b, M::POST, &bare_keys, Some(json!({})), created)
        .await;
    let bare_key = secret(&bare_made);
    let free_key = gw.key(free_ws).await;
    // Usage, for the ledger's daily rows and a key's last use.
    assert_eq!(gw.chat(&rich_key, hello(), &[]).await.status(), ok);
    let listed = api.admin(b, M::GET, &keys, None, ok).await;
    let used = listed["data"].as_array().unwrap().iter();
    assert!(used.clone().any(|k| k["last_used_at"].is_string()));
    let revoke = format!("/admin/v1/keys/{}", id(&unnamed));
    let revoked = api.admin(b, M::DELETE, &revoke, None, ok).await;
    assert!(revoked["revoked_at"].is_string());
    // A key's own limits: set (every one), cleared (with null), refused for a revoked key.
    let key_limits = json!({"limits": {"requests_per_second": 1.5, "burst": 2,
        "tokens_per_minute": 5000, "tokens_per_month": 100000}});
    let rich_key_path = format!("/admin/v1/keys/{}", id(&rich_made));
    let set = api
        .admin(b, M::PATCH, &rich_key_path, Some(key_limits.clone()), ok)
        .await;
    assert_eq!(set["limits"], key_limits["limits"]);
    let bare_key_path = format!("/admin/v1/keys/{}", id(&bare_made));
    let cleared = api.admin(
        b,
        M::PATCH,
        &bare_key_path,
        Some(json!({"limits": null})),
        ok,
    );
    assert_eq!(cleared.await["limits"], json!({}));
    let conflict = StatusCode::CONFLICT;
    api.admin(b, M::PATCH, &revoke, Some(json!({"limits": {}})), conflict)
        .await;

    let limits = api
        .keyed(b, &rich_key, M::GET, "/v1/limits", None, ok)
        .await;
    assert!(limits["usage"]["token_bucket"].is_object());
    assert_eq!(limits["key"]["limits"], key_limits["limits"], "{limits}");
    assert_eq!(limits["next_tier"]["name"], "richer");
    assert_eq!(limits["next_tier"]["automatic"], true);
    // The workspace's own budget: set (a model's too), read, cleared.
    let budget = json!({"tokens_per_month": 5000, "models": {"mock-small": 100}});
    let set = api
        .keyed(b, &rich_key, M::PUT, "/v1/budget", Some(budget), ok)
        .await;
    assert_eq!(set["tokens_per_month"], 5000);
    let read = api
        .keyed(b, &rich_key, M::GET, "/v1/budget", None, ok)
        .await;
    assert_eq!(read, set);
    let cleared = api
        .keyed(b, &rich_key, M::PUT, "/v1/budget", Some(json!({})), ok)
        .await;
    assert!(cleared["tokens_per_month"].is_null());
    let limits = api
        .keyed(b, &bare_key, M::GET, "/v1/limits", None, ok)
        .await;
    assert!(limits["usage"]["token_bucket"].is_null());
    assert!(limits["next_tier"].is_null());
    assert!(limits.get("key").is_none(), "{limits}");
    // Usage over time: a named key with usage, and (the other workspace's) an unnamed one.
    let history = api.keyed(b, &rich_key, M::GET, "/v1/usage", None, ok).await;
    assert_eq!(history["hours"].as_array().unwrap().len(), 48);
    assert!(history["keys"][0]["name"].is_string(), "{history}");
    let history = api.keyed(b, &bare_key, M::GET, "/v1/usage", None, ok).await;
    assert!(history["keys"][0]["name"].is_null(), "{history}");
    let ask = |limits: Value| Some(json!({"use_case": "more", "requested_limits": limits}));
    let requests = "/v1/limit-requests";
    let tpm = ask(json!({"tokens_per_minute": 200000}));
    let first = id(&api
        .keyed(b, &rich_key, M::POST, requests, tpm, created)
        .await);
    let rps = ask(json!({"requests_per_second": 5}));
    let second = id(&api
        .keyed(b, &rich_key, M::POST, requests, rps, created)
        .await);
    api.keyed(b, &rich_key, M::GET, requests, None, ok).await;
    api.admin(b, M::GET, "/admin/v1/limit-requests", None, ok)
        .await;
    let pending = format!("/admin/v1/limit-requests?status=pending&workspace_id={rich_ws}");
    api.admin(b, M::GET, &pending, None, ok).await;
    let approve = format!("/admin/v1/limit-requests/{first}/approve");
    let approved = api.admin(b, M::POST, &approve, None, ok).await;
    assert!(approved["granted_limits"].is_object());
    // A body of JSON null, which the document allows, is no body.
    let burst = ask(json!({"tokens_per_month": 9_000_000_000u64}));
    let third = id(&api
        .keyed(b, &rich_key, M::POST, requests, burst, created)
        .await);
    let approve_null = format!("/admin/v1/limit-requests/{third}/approve");
    let approved = api
        .admin(b, M::POST, &approve_null, Some(Value::Null), ok)
        .await;
    assert_eq!(
        approved["granted_limits"],
        json!({"tokens_per_month": 9_000_000_000u64}),
        "{approved}"
    );
    let deny = format!("/admin/v1/limit-requests/{second}/deny");
    let reason = Some(json!({"reason": "not now"}));
    let denied = api.admin(b, M::POST, &deny, reason.clone(), ok).await;
    assert!(denied["reason"].is_string());
    api.keyed(b, &rich_key, M::GET, requests, None, ok).await;
    // One request, read by its workspace and by the operator; withdrawn while pending.
    let one = format!("{requests}/{second}");
    let read = api.keyed(b, &rich_key, M::GET, &one, None, ok).await;
    assert_eq!(read, denied);
    let nobody = StatusCode::NOT_FOUND;
    api.keyed(b, &bare_key, M::GET, &one, None, nobody).await;
    let by_operator = format!("/admin/v1/limit-requests/{second}");
    api.admin(b, M::GET, &by_operator, None, ok).await;
    let tpm = ask(json!({"tokens_per_minute": 250000}));
    let fourth = id(&api
        .keyed(b, &rich_key, M::POST, requests, tpm, created)
        .await);
    let withdraw = format!("{requests}/{fourth}");
    let withdrawn = api
        .keyed(b, &rich_key, M::DELETE, &withdraw, None, ok)
        .await;
    assert_eq!(withdrawn["status"], "withdrawn");
    let gone = StatusCode::CONFLICT;
    api.keyed(b, &rich_key, M::DELETE, &withdraw, None, gone)
        .await;
    // Webhooks: a workspace's own endpoint, and the operator's with its deliveries (the
    // events above, which no one receives at this address: pending, with their error).
    let hook = json!({"url": "http://127.0.0.1:9/hook", "events": ["limit_request.created"]});
    let own = api
        .keyed(
            b,
            &rich_key,
            M::POST,
            "/v1/webhooks",
            Some(hook.clone()),
            created,
        )
        .await;
    assert!(own["secret"].as_str().unwrap().starts_with("whsec_"));
    api.keyed(b, &rich_key, M::GET, "/v1/webhooks", None, ok)
        .await;
    let own_deliveries = format!("/v1/webhooks/{}/deliveries", id(&own));
    api.keyed(b, &rich_key, M::GET, &own_deliveries, None, ok)
        .await;
    let own_path = format!("/v1/webhooks/{}", id(&own));
    api.keyed(b, &rich_key, M::DELETE, &own_path, None, ok)
        .await;
    let operator = api
        .admin(b, M::POST, "/admin/v1/webhooks", Some(hook), created)
        .await;
    let ask_again = ask(json!({"tokens_per_minute": 300000}));
    api.keyed(b, &rich_key, M::POST, requests, ask_again, created)
        .await;
    api.admin(b, M::GET, "/admin/v1/webhooks", None, ok).await;
    let deliveries = format!("/admin/v1/webhooks/{}/deliveries", id(&operator));
    let listed = api.admin(b, M::GET, &deliveries, None, ok).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    let mut tries = 0;
    loop {
        let listed = api.admin(b, M::GET, &deliveries, None, ok).await;
        if listed["data"][0]["last_error"].is_string() || tries == 100 {
            break;
        }
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // At most 10 endpoints of its own.
    let quiet = json!({"url": "http://127.0.0.1:9/hook", "events": ["workspace.suspended"]});
    for _ in 0..10 {
        let body = Some(quiet.clone());
        api.keyed(b, &bare_key, M::POST, "/v1/webhooks", body, created)
            .await;
    }
    let body = Some(quiet.clone());
    api.keyed(
        b,
        &bare_key,
        M::POST,
        "/v1/webhooks",
        body,
        StatusCode::CONFLICT,
    )
    .await;
    // A delivery given up (through the store here, as after its 12th attempt) is sent again on
    // asking, the operator's and a workspace's own; asked again, it is pending: a conflict.
    let own = api
        .keyed(
            b,
            &rich_key,
            M::POST,
            "/v1/webhooks",
            Some(json!({"url": "http://127.0.0.1:9/own", "events": ["limit_request.created"]})),
            created,
        )
        .await;
    let ask_more = ask(json!({"tokens_per_minute": 350000}));
    api.keyed(b, &rich_key, M::POST, requests, ask_more, created)
        .await;
    let own_deliveries = format!("/admin/v1/webhooks/{}/deliveries", id(&own));
    for listing in [&deliveries, &own_deliveries] {
        for tries in 0.. {
            let listed = api.admin(b, M::GET, listing, None, ok).await;
            let data = listed["data"].as_array().unwrap();
            if !data.is_empty() && data.iter().all(|d| d["attempts"] == 1) {
                break;
            }
            assert!(tries < 200, "{listed}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let store = tiergate::store::open(&format!("sqlite://{}", gw.db.display()))
        .await
        .unwrap();
    let given_up = tiergate::store::DeliveryOutcome::Failed {
        status: None,
        error: Some("given up".into()),
    };
    loop {
        let due = store
            .claim_deliveries(10_000_000_000_000, 10_000_000_000_001, 100)
            .await
            .unwrap();
        if due.is_empty() {
            break;
        }
        for d in due {
            store.finish_delivery(d.id, &given_up).await.unwrap();
        }
    }
    let event_of = |listed: Value| listed["data"][0]["event_id"].as_str().unwrap().to_string();
    let event = event_of(api.admin(b, M::GET, &deliveries, None, ok).await);
    let again = format!("{deliveries}/{event}/redeliver");
    let sent = api.admin(b, M::POST, &again, None, ok).await;
    assert_eq!(sent["status"], "pending");
    api.admin(b, M::POST, &again, None, StatusCode::CONFLICT)
        .await;
    let own_event = event_of(api.admin(b, M::GET, &own_deliveries, None, ok).await);
    let own_again = format!("/v1/webhooks/{}/deliveries/{own_event}/redeliver", id(&own));
    let sent = api.keyed(b, &rich_key, M::POST, &own_again, None, ok).await;
    assert_eq!(sent["status"], "pending");
    api.keyed(
        b,
        &rich_key,
        M::POST,
        &own_again,
        None,
        StatusCode::CONFLICT,
    )
    .await;
    let removed = format!("/admin/v1/webhooks/{}", id(&operator));
    api.admin(b, M::DELETE, &removed, None, ok).await;
    let usage = format!("{rich_path}/usage");
    let usage = api.admin(b, M::GET, &usage, None, ok).await;
    assert!(!usage["daily"].as_array().unwrap().is_empty());
    let range = format!("/admin/v1/workspaces/{bare_ws}/usage?from=2020-01-01&to=2099-12-31");
    api.admin(b, M::GET, &range, None, ok).await;
    let page = api.admin(b, M::GET, "/admin/v1/audit?limit=2", None, ok);
    assert_eq!(page.await["has_more"], true);
    api.admin(b, M::GET, "/admin/v1/audit?action=tier.put", None, ok)
        .await;
    let none = api.admin(b, M::GET, "/admin/v1/audit?workspace_id=999999", None, ok);
    assert!(none.await["last_id"].is_null());
    api.expect(
        b,
        None,
        M::GET,
        "/limits",
        Body::None,
        StatusCode::PERMANENT_REDIRECT,
    )
    .await;

    // Conflicts: a request already answered; a workspace with 10 requests waiting.
    let conflict = StatusCode::CONFLICT;
    api.admin(b, M::POST, &approve, None, conflict).await;
    api.admin(
        b,
        M::POST,
        &approve.replace("approve", "deny"),
        reason,
        conflict,
    )
    .await;
    // (Above what the workspace has now: an increase asks for more.)
    for _ in 0..10 {
        let more = ask(json!({"tokens_per_minute": 600_000}));
        api.keyed(b, &free_key, M::POST, requests, more, created)
            .await;
    }
    let more = ask(json!({"tokens_per_minute": 600_000}));
    api.keyed(b, &free_key, M::POST, requests, more, conflict)
        .await;
    // A suspended workspace, whose key gets 403 on its own API.
    let suspend = Some(json!({"status": "suspended"}));
    let free_path = format!("/admin/v1/workspaces/{free_ws}");
    api.admin(b, M::PATCH, &free_path, suspend, ok).await;

    // The errors every operation of its kind can give, driven by the document itself.
    let no_admin = TestGateway::start_with(Options {
        admin_token: None,
        ..Options::default()
    })
    .await;
    let operations: Vec<(Method, String, Value)> = api.doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object().unwrap().iter().map(|(method, op)| {
                let method = method.to_uppercase().parse().unwrap();
                (method, path.clone(), op.clone())
            })
        })
        .collect();
    let (bad, not_found) = (StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND);
    for (method, template, op) in operations {
        let m = || method.clone();
        let at = |id: &str| template.replace("{id}", id).replace("{name}", "t");
        let scheme = op["security"][0].as_object().and_then(|s| s.keys().next());
        // Every operation refuses a query parameter it does not take, and the document says so.
        let token = match scheme.map(String::as_str) {
            Some("admin_token") => Some(ADMIN),
            Some(_) => Some(bare_key.as_str()),
            None => None,
        };
        let path = format!("{}?unknown=1", at(&rich_ws.to_string()));
        let v = api.expect(b, token, m(), &path, Body::None, bad).await;
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("unknown parameter 'unknown'"),
            "{method} {path}: {v}"
        );
        let Some(scheme) = scheme else {
            continue; // The limits page.
        };
        let admin_api = scheme == "admin_token";
        // No credentials, or wrong ones.
        for token in [None, Some("wrong-token-0123456789abcdef")] {
            let unauthorized = StatusCode::UNAUTHORIZED;
            api.expect(b, token, m(), &at("1"), Body::None, unauthorized)
                .await;
        }
        // The admin API without a configured token; a suspended workspace's key.
        let (base, token) = match admin_api {
            true => (no_admin.url.as_str(), ADMIN),
            false => (b, free_key.as_str()),
        };
        let forbidden = StatusCode::FORBIDDEN;
        api.expect(base, Some(token), m(), &at("1"), Body::None, forbidden)
            .await;
        let token = Some(if admin_api { ADMIN } else { bare_key.as_str() });
        if template.contains("{id}") {
            api.expect(b, token, m(), &at("x"), Body::None, bad).await;
            // A valid request about an id that does not exist.
            let valid = match template.rsplit('/').next().unwrap() {
                "deny" => Body::Json(json!({"reason": "r"})),
                "attributes" => Body::Json(json!({})),
                "{id}" if method == M::PATCH && template.contains("/keys/") => {
                    Body::Json(json!({"limits": {}}))
                }
                "{id}" if method == M::PATCH => Body::Json(json!({"status": "active"})),
                _ => Body::None,
            };
            api.expect(b, token, m(), &at("999999"), valid, not_found)
                .await;
        }
        if op.get("requestBody").is_some() {
            let path = match template.contains("/workspaces/{id}") {
                true => at(&rich_ws.to_string()),
                false => at(&first.to_string()),
            };
            // A field no body takes (attributes take any name: a value of no kind they take).
            let unknown = match template.ends_with("/attributes") {
                true => Body::Json(json!({"unknown": "text"})),
                false => Body::Json(json!({"unknown": 1})),
            };
            api.expect(b, token, m(), &path, unknown, bad).await;
            let too_large = Body::Raw(vec![b' '; MAX_API_BODY + 1]);
            let status = StatusCode::PAYLOAD_TOO_LARGE;
            api.expect(b, token, m(), &path, too_large, status).await;
        }
    }

    // A workspace's changes of its own past 60 at once: each route that makes one answers 429.
    // Those refused change nothing and take nothing, and one more comes every 2 s: the bucket
    // is emptied again (by budgets) just before each.
    let (changer, _) = gw.workspace("free").await;
    let changer = gw.key(changer).await;
    let budget = || Body::Json(json!({"tokens_per_month": 1000}));
    let too_many = StatusCode::TOO_MANY_REQUESTS;
    for (method, path, body) in [
        (M::PUT, "/v1/budget", budget()),
        (
            M::POST,
            "/v1/limit-requests",
            Body::Json(json!({"use_case": "u", "requested_limits": {"tokens_per_minute": 999999}})),
        ),
        (M::DELETE, "/v1/limit-requests/999999", Body::None),
        (
            M::POST,
            "/v1/webhooks",
            Body::Json(
                json!({"url": "https://example.com/hook", "events": ["limit_request.decided"]}),
            ),
        ),
        (M::DELETE, "/v1/webhooks/999999", Body::None),
        (
            M::POST,
            "/v1/webhooks/999999/deliveries/evt_none/redeliver",
            Body::None,
        ),
    ] {
        for made in 0.. {
            let (status, v) = api
                .call(b, Some(&changer), M::PUT, "/v1/budget", budget())
                .await;
            if status == too_many {
                break;
            }
            assert!(made < 70, "never refused: {status} {v}");
        }
        let refused = api
            .expect(b, Some(&changer), method, path, body, too_many)
            .await;
        assert_eq!(refused["code"], "workspace_changes", "{refused}");
    }

    // Each documented answer was given at least once, but those this test cannot provoke.
    let untested = [
        StatusCode::REQUEST_TIMEOUT.as_u16(),
        StatusCode::SERVICE_UNAVAILABLE.as_u16(),
    ];
    let missing: Vec<_> = api
        .documented()
        .into_iter()
        .filter(|(_, _, status)| !untested.contains(status))
        .filter(|answer| !api.seen.contains(answer))
        .collect();
    assert!(
        missing.is_empty(),
        "documented, never answered: {missing:?}"
    );
}
