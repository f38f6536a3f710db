//! Checks against the vendor's Morpheus 8.1.2 document. The document lives outside
//! the repository; when it is missing these tests print SKIP and pass.

use std::sync::OnceLock;
use std::time::Instant;

use ferry_openapi::{Operation, Request, Spec, Violations};
use serde_json::json;

fn spec() -> Option<&'static Spec> {
    static SPEC: OnceLock<Option<Spec>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = Spec::morpheus_default_path();
        if !path.exists() {
            return None;
        }
        let started = Instant::now();
        let spec = Spec::load(&path).expect("the Morpheus document loads");
        eprintln!(
            "loaded {} in {:.0} ms",
            path.display(),
            started.elapsed().as_secs_f64() * 1e3
        );
        Some(spec)
    })
    .as_ref()
}

macro_rules! spec_or_skip {
    () => {
        match spec() {
            Some(s) => s,
            None => {
                println!(
                    "SKIP: Morpheus OpenAPI document not found at {}",
                    Spec::morpheus_default_path().display()
                );
                return;
            }
        }
    };
}

const TOKEN_QUERY: &str = "client_id=morph-api&grant_type=password&scope=write";
const FORM: &str = "application/x-www-form-urlencoded";

fn token_request<'a>(query: &'a str, body: &'a [u8]) -> Request<'a> {
    Request {
        method: "POST",
        path: "/oauth/token",
        query: Some(query),
        content_type: Some(FORM),
        authorization: None,
        body,
    }
}

fn get<'a>(path: &'a str, query: Option<&'a str>, auth: Option<&'a str>) -> Request<'a> {
    Request {
        method: "GET",
        path,
        query,
        content_type: None,
        authorization: auth,
        body: b"",
    }
}

fn post_json<'a>(path: &'a str, body: &'a [u8]) -> Request<'a> {
    Request {
        method: "POST",
        path,
        query: None,
        content_type: Some("application/json"),
        authorization: Some("Bearer x"),
        body,
    }
}

fn expect_violation(r: Result<Operation, Violations>, location: &str) -> Violations {
    let v = r.expect_err("the request should be rejected");
    assert!(
        v.has(location),
        "expected a violation at {location}, got:\n{v}"
    );
    v
}

#[test]
fn oauth_token_query_and_form_body() {
    let s = spec_or_skip!();
    let op = s
        .validate_request(&token_request(TOKEN_QUERY, b"username=a&password=b"))
        .unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(op.template, "/oauth/token");
    assert_eq!(op.operation_id.as_deref(), Some("getAccessToken"));

    let v = expect_violation(
        s.validate_request(&token_request(
            "grant_type=password&scope=write",
            b"username=a&password=b",
        )),
        "query.client_id",
    );
    assert_eq!(v.list.len(), 1, "{v}");

    let v = expect_violation(
        s.validate_request(&token_request(
            "client_id=other&grant_type=password&scope=write",
            b"username=a&password=b",
        )),
        "query.client_id",
    );
    assert!(v.to_string().contains("POST /oauth/token"), "{v}");

    // Security is `[]` here: no Authorization needed, but the body is required.
    expect_violation(s.validate_request(&token_request(TOKEN_QUERY, b"")), "body");
    // JSON is not what the operation accepts.
    let mut json_req = token_request(TOKEN_QUERY, br#"{"username":"a"}"#);
    json_req.content_type = Some("application/json");
    expect_violation(s.validate_request(&json_req), "header.content-type");
}

#[test]
fn roles_list_needs_bearer_and_integer_max() {
    let s = spec_or_skip!();
    s.validate_request(&get("/api/roles", Some("max=10"), Some("Bearer x")))
        .unwrap_or_else(|v| panic!("{v}"));
    expect_violation(
        s.validate_request(&get("/api/roles", Some("max=10"), None)),
        "header.authorization",
    );
    expect_violation(
        s.validate_request(&get("/api/roles", Some("max=10"), Some("Bearer "))),
        "header.authorization",
    );
    expect_violation(
        s.validate_request(&get("/api/roles", Some("max=10"), Some("Basic eDp5"))),
        "header.authorization",
    );
    expect_violation(
        s.validate_request(&get("/api/roles", Some("max=abc"), Some("Bearer x"))),
        "query.max",
    );
    // A query parameter the operation does not document is an error: a manager may
    // refuse it, and its meaning is not what the client thinks.
    expect_violation(
        s.validate_request(&get("/api/roles", Some("max=1&zzz=1"), Some("Bearer x"))),
        "query.zzz",
    );
    // Networks take no paging parameters; a cloud's datastores take `max` but no `offset`.
    expect_violation(
        s.validate_request(&get(
            "/api/networks",
            Some("max=100&offset=0"),
            Some("Bearer x"),
        )),
        "query.max",
    );
    s.validate_request(&get(
        "/api/zones/1/data-stores",
        Some("max=1000"),
        Some("Bearer x"),
    ))
    .unwrap_or_else(|v| panic!("{v}"));
    expect_violation(
        s.validate_request(&get(
            "/api/zones/1/data-stores",
            Some("max=100&offset=0"),
            Some("Bearer x"),
        )),
        "query.offset",
    );
}

#[test]
fn role_create_body() {
    let s = spec_or_skip!();
    let ok = json!({"role": {"authority": "ferry-migration",
        "featurePermissions": [{"code": "activity", "access": "read"}]}});
    s.validate_request(&post_json("/api/roles", ok.to_string().as_bytes()))
        .unwrap_or_else(|v| panic!("{v}"));

    let bad = json!({"role": {"authority": "ferry-migration",
        "featurePermissions": [{"code": "no-such-permission", "access": "read"}]}});
    let v = expect_violation(
        s.validate_request(&post_json("/api/roles", bad.to_string().as_bytes())),
        "body/role/featurePermissions/0/code",
    );
    assert_eq!(v.list.len(), 1, "{v}");

    expect_violation(s.validate_request(&post_json("/api/roles", b"{}")), "body");
    expect_violation(
        s.validate_request(&post_json("/api/roles", b"{\"role\": ")),
        "body",
    );
}

#[test]
fn instance_path_parameter() {
    let s = spec_or_skip!();
    let op = s.find("GET", "/api/instances/12").expect("matches");
    assert_eq!(op.template, "/api/instances/{id}");
    assert_eq!(op.path_params.get("id").map(String::as_str), Some("12"));
    // The document's `id-path` parameter is an integer.
    assert_eq!(
        s.document()
            .pointer("/components/parameters/id-path/schema/type")
            .and_then(|t| t.as_str()),
        Some("integer")
    );
    expect_violation(
        s.validate_request(&get("/api/instances/abc", None, Some("Bearer x"))),
        "path.id",
    );
    s.validate_request(&get("/api/instances/12", None, Some("Bearer x")))
        .unwrap_or_else(|v| panic!("{v}"));

    let v = expect_violation(
        s.validate_request(&post_json("/api/foo", b"{}")),
        "operation",
    );
    assert!(
        v.list[0]
            .message
            .contains("no operation POST /api/foo in the document"),
        "{v}"
    );
}

#[test]
fn literal_segments_win() {
    let s = spec_or_skip!();
    let templates: Vec<&str> = s.document()["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    // Find a literal sibling of a templated path in the document itself, so the
    // test does not depend on one particular endpoint's name.
    let (lit, param) = templates
        .iter()
        .filter(|t| !t.contains('{') && s.document()["paths"][**t].get("get").is_some())
        .find_map(|t| {
            let (parent, _) = t.rsplit_once('/')?;
            let sibling = templates.iter().find(|o| {
                o.strip_prefix(parent)
                    .and_then(|r| r.strip_prefix("/{"))
                    .is_some_and(|r| !r.contains('/'))
                    && s.document()["paths"][**o].get("get").is_some()
            })?;
            Some((*t, *sibling))
        })
        .expect("the document has a literal path beside a templated one");
    assert_eq!(
        s.find("GET", lit).unwrap().template,
        lit,
        "{lit} vs {param}"
    );
}

fn roles_op(s: &Spec) -> Operation {
    s.find("GET", "/api/roles").expect("GET /api/roles")
}

#[test]
fn roles_responses() {
    let s = spec_or_skip!();
    let op = roles_op(s);
    let body = json!({
        "roles": [{
            "id": 1,
            "name": "System Admin",
            "authority": "System Admin",
            "description": "Super User",
            "landingUrl": null,
            "scope": "Account",
            "roleType": "user",
            "multitenant": false,
            "multitenantLocked": false,
            "parentRoleId": null,
            "diverged": false,
            "ownerId": 1,
            "owner": {"id": 1, "name": "Root Account"},
            "defaultPersona": null,
            "dateCreated": "2024-01-01T00:00:00Z",
            "lastUpdated": "2024-01-01T00:00:00Z"
        }],
        "meta": {"size": 1, "total": 1, "max": 25, "offset": 0}
    });
    let json_ct = Some("application/json;charset=UTF-8");
    s.validate_response(&op, 200, json_ct, body.to_string().as_bytes())
        .unwrap_or_else(|v| panic!("{v}"));

    let v = s
        .validate_response(&op, 200, json_ct, br#"{"roles": "x"}"#)
        .expect_err("roles must be an array");
    assert!(v.has("body/roles"), "{v}");

    s.validate_response(
        &op,
        401,
        json_ct,
        br#"{"success":false,"msg":"Unauthorized"}"#,
    )
    .unwrap_or_else(|v| panic!("{v}"));
    let v = s
        .validate_response(
            &op,
            401,
            json_ct,
            br#"{"success":"no","msg":"Unauthorized"}"#,
        )
        .expect_err("4XX is checked against the Error schema");
    assert!(v.has("body/success"), "{v}");

    let v = s
        .validate_response(&op, 299, json_ct, b"{}")
        .expect_err("299 is not declared");
    assert!(v.has("status"), "{v}");

    let v = s
        .validate_response(&op, 200, Some("text/html"), b"<html/>")
        .expect_err("text/html is not declared");
    assert!(v.has("header.content-type"), "{v}");

    let v = s
        .validate_response(&op, 200, json_ct, b"{not json")
        .expect_err("malformed JSON");
    assert!(v.has("body"), "{v}");
}

#[test]
fn timing() {
    let s = spec_or_skip!();
    let op = roles_op(s);
    let create = json!({"role": {"authority": "ferry-migration",
        "featurePermissions": [{"code": "activity", "access": "read"}]}})
    .to_string();
    let list = br#"{"roles":[{"id":1,"authority":"a","name":"a"}],"meta":{"size":1,"total":1,"max":25,"offset":0}}"#;

    // First calls compile the validators; later ones hit the cache.
    let started = Instant::now();
    s.validate_request(&post_json("/api/roles", create.as_bytes()))
        .unwrap();
    s.validate_response(&op, 200, Some("application/json"), list)
        .unwrap();
    let first = started.elapsed();

    let n = 200;
    let started = Instant::now();
    for _ in 0..n {
        s.validate_request(&post_json("/api/roles", create.as_bytes()))
            .unwrap();
        s.validate_request(&get(
            "/api/roles",
            Some("max=10&offset=0"),
            Some("Bearer x"),
        ))
        .unwrap();
        s.validate_response(&op, 200, Some("application/json"), list)
            .unwrap();
    }
    let per = started.elapsed() / (3 * n);
    eprintln!(
        "first validations (compiling): {:.1} ms; cached: {:.1} us per call",
        first.as_secs_f64() * 1e3,
        per.as_secs_f64() * 1e6
    );
}

#[test]
fn every_schema_compiles() {
    let s = spec_or_skip!();
    let started = Instant::now();
    let failures = s.check_schemas();
    eprintln!(
        "compiled every operation schema in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    assert!(
        failures.is_empty(),
        "schemas that do not compile: {failures:#?}"
    );
}
