//! The parameter, security and content-type rules, on a small document written here.

use ferry_openapi::{Request, Spec, SpecError};
use serde_json::json;

const DOC: &str = r##"
openapi: 3.1.0
info: {title: t, version: "1"}
security:
  - bearerAuth: []
components:
  securitySchemes:
    bearerAuth: {type: http, scheme: bearer}
    basicAuth: {type: http, scheme: basic}
  parameters:
    max:
      name: max
      in: query
      schema: {type: integer, minimum: 1}
  schemas:
    Thing:
      type: object
      required: [name]
      properties:
        name: {type: string, examples: ["a"]}
        size: {type: integer}
        examples: {type: boolean}
      example:
        $ref: ../examples/thing.json
  requestBodies:
    Thing:
      required: true
      content:
        application/json:
          schema: {$ref: '#/components/schemas/Thing'}
  responses:
    Error:
      description: error
      content:
        application/json:
          schema:
            type: object
            required: [msg]
            properties: {msg: {type: string}}
paths:
  /things:
    get:
      operationId: listThings
      parameters:
        - $ref: '#/components/parameters/max'
        - {name: ids, in: query, schema: {type: array, items: {type: integer}}}
        - {name: tags, in: query, explode: false, schema: {type: array, items: {type: string}}}
        - {name: flag, in: query, schema: {type: boolean}}
        - {name: ratio, in: query, schema: {type: number}}
        - {name: mode, in: query, required: true, schema: {type: string, enum: [a, b]}}
      responses:
        '200':
          description: ok
          content:
            application/json:
              schema:
                type: object
                properties: {things: {type: array, items: {$ref: '#/components/schemas/Thing'}}}
        4xx: {$ref: '#/components/responses/Error'}
        default:
          description: anything
    post:
      security: []
      requestBody: {$ref: '#/components/requestBodies/Thing'}
      responses:
        '204': {description: created}
  /things/{name}:
    parameters:
      - {name: name, in: path, required: true, schema: {type: string, minLength: 3}}
    get:
      security:
        - basicAuth: []
        - bearerAuth: []
      responses:
        '200': {description: ok}
    put:
      requestBody:
        content:
          application/x-www-form-urlencoded:
            schema:
              type: object
              required: [size]
              properties:
                size: {type: integer}
                on: {type: boolean}
                tags: {type: array, items: {type: string}}
          application/*:
            schema: {$ref: '#/components/schemas/Thing'}
      responses:
        '200': {description: ok}
  /things/special:
    get:
      security: [{}]
      responses:
        '200': {description: ok}
  /blobs/{id}:
    put:
      parameters:
        - {name: id, in: path, required: true, schema: {type: integer}}
      requestBody:
        required: true
        content:
          application/octet-stream: {}
          multipart/form-data:
            schema: {type: object, properties: {file: {type: string}}}
      responses:
        '200': {description: ok}
"##;

fn spec() -> Spec {
    Spec::parse(DOC).expect("inline document loads")
}

fn req<'a>(method: &'a str, path: &'a str, query: Option<&'a str>) -> Request<'a> {
    Request {
        method,
        path,
        query,
        content_type: None,
        authorization: Some("Bearer t"),
        body: b"",
    }
}

fn locations(s: &Spec, r: &Request<'_>) -> Vec<String> {
    match s.validate_request(r) {
        Ok(_) => Vec::new(),
        Err(v) => v.list.into_iter().map(|v| v.location).collect(),
    }
}

#[test]
fn query_parameters() {
    let s = spec();
    let ok = |q: &str| {
        let l = locations(&s, &req("GET", "/things", Some(q)));
        assert!(l.is_empty(), "{q}: {l:?}");
    };
    let bad = |q: &str, loc: &str| {
        let l = locations(&s, &req("GET", "/things", Some(q)));
        assert!(
            l.iter().any(|x| x.starts_with(loc)),
            "{q}: expected {loc}, got {l:?}"
        );
    };
    ok("mode=a");
    ok("mode=b&max=3&ids=1&ids=2&tags=x,y&flag=true&ratio=0.5");
    // A key the operation does not document is refused: a real server may reject it.
    bad("mode=a&other=1", "query.other");
    ok("mode=a&tags=x");
    bad("max=3", "query.mode");
    bad("mode=c", "query.mode");
    bad("mode=a&max=0", "query.max");
    bad("mode=a&max=1.5", "query.max");
    bad("mode=a&ids=1&ids=x", "query.ids/1");
    // explode=false: a comma list in one value, never repeated integers.
    bad("mode=a&ids=1,2", "query.ids/0");
    bad("mode=a&flag=yes", "query.flag");
    bad("mode=a&ratio=half", "query.ratio");
    assert_eq!(locations(&s, &req("GET", "/things", None)), ["query.mode"]);
}

#[test]
fn path_parameters_and_matching() {
    let s = spec();
    let op = s.find("get", "/things/a%20b").unwrap();
    assert_eq!(op.template, "/things/{name}");
    assert_eq!(op.method, "GET");
    assert_eq!(op.path_params["name"], "a b");
    assert_eq!(
        s.find("GET", "/things/special").unwrap().template,
        "/things/special"
    );
    // No GET on the literal path for PUT, so the template is used.
    assert_eq!(
        s.find("PUT", "/things/special").unwrap().template,
        "/things/{name}"
    );
    assert!(s.find("DELETE", "/things/abc").is_none());
    assert!(s.find("GET", "/things/abc/more").is_none());

    // Path-level parameter applies to every method of the path.
    assert_eq!(
        locations(&s, &req("GET", "/things/ab", None)),
        ["path.name"]
    );
    let l = locations(&s, &req("PUT", "/blobs/x", None));
    assert!(l.contains(&"path.id".to_string()), "{l:?}");

    let v = s
        .validate_request(&req("PATCH", "/things", None))
        .unwrap_err();
    assert_eq!(v.list[0].location, "operation");
    assert_eq!(
        v.to_string(),
        "PATCH /things: operation: no operation PATCH /things in the document"
    );
}

#[test]
fn security() {
    let s = spec();
    let with = |auth: Option<&'static str>, method: &'static str, path: &'static str| {
        let query = (method == "GET" && path == "/things").then_some("mode=a");
        let mut r = req(method, path, query);
        r.authorization = auth;
        if method == "POST" {
            r.content_type = Some("application/json");
            r.body = br#"{"name":"x"}"#;
        }
        locations(&s, &r)
    };
    // Top-level bearerAuth applies.
    assert!(with(Some("Bearer abc"), "GET", "/things").is_empty());
    assert!(with(Some("bearer abc"), "GET", "/things").is_empty());
    assert_eq!(with(None, "GET", "/things"), ["header.authorization"]);
    assert_eq!(
        with(Some("Bearer"), "GET", "/things"),
        ["header.authorization"]
    );
    assert_eq!(
        with(Some("Bearer  "), "GET", "/things"),
        ["header.authorization"]
    );
    assert_eq!(
        with(Some("Token abc"), "GET", "/things"),
        ["header.authorization"]
    );
    // `security: []` turns it off; `[{}]` makes it optional.
    assert!(with(None, "POST", "/things").is_empty());
    assert!(with(None, "GET", "/things/special").is_empty());
    // Alternatives: either basic or bearer.
    assert!(with(Some("Basic eDp5"), "GET", "/things/abc").is_empty());
    assert!(with(Some("Bearer t"), "GET", "/things/abc").is_empty());
    assert_eq!(with(None, "GET", "/things/abc"), ["header.authorization"]);
}

#[test]
fn request_bodies() {
    let s = spec();
    let body =
        |method: &'static str, path: &'static str, ct: Option<&'static str>, b: &'static [u8]| {
            let mut r = req(method, path, None);
            r.content_type = ct;
            r.body = b;
            locations(&s, &r)
        };
    let json = Some("application/json; charset=utf-8");
    assert!(body(
        "POST",
        "/things",
        json,
        br#"{"name":"x","size":2,"examples":true}"#
    )
    .is_empty());
    assert_eq!(body("POST", "/things", json, br#"{"size":2}"#), ["body"]);
    assert_eq!(
        body("POST", "/things", json, br#"{"name":"x","size":"2"}"#),
        ["body/size"]
    );
    // The property named `examples` survived the stripping of annotations.
    assert_eq!(
        body("POST", "/things", json, br#"{"name":"x","examples":1}"#),
        ["body/examples"]
    );
    assert_eq!(body("POST", "/things", json, b"{oops"), ["body"]);
    assert_eq!(body("POST", "/things", json, b""), ["body"]);
    assert_eq!(
        body("POST", "/things", None, br#"{"name":"x"}"#),
        ["header.content-type"]
    );
    assert_eq!(
        body("POST", "/things", Some("text/plain"), b"x"),
        ["header.content-type"]
    );
    // A body where none is declared.
    assert_eq!(body("GET", "/things/abc", json, b"{}"), ["body"]);

    // Form bodies: strings coerced to the declared types; repeated keys for arrays.
    let form = Some("application/x-www-form-urlencoded");
    assert!(body(
        "PUT",
        "/things/abc",
        form,
        b"size=3&on=true&tags=a&tags=b&x=1"
    )
    .is_empty());
    assert_eq!(body("PUT", "/things/abc", form, b"size=big"), ["body/size"]);
    assert_eq!(body("PUT", "/things/abc", form, b"on=false"), ["body"]);
    // The optional body may be absent; a media range matches a `+json` type.
    assert!(body("PUT", "/things/abc", None, b"").is_empty());
    assert!(body(
        "PUT",
        "/things/abc",
        Some("application/merge-patch+json"),
        br#"{"name":"x"}"#
    )
    .is_empty());
    assert_eq!(
        body(
            "PUT",
            "/things/abc",
            Some("application/merge-patch+json"),
            b"{}"
        ),
        ["body"]
    );

    // Binary and multipart: only the content type counts.
    assert!(body(
        "PUT",
        "/blobs/1",
        Some("application/octet-stream"),
        b"\x00\x01"
    )
    .is_empty());
    assert!(body(
        "PUT",
        "/blobs/1",
        Some("multipart/form-data; boundary=xyz"),
        b"--xyz--"
    )
    .is_empty());
    assert_eq!(
        body("PUT", "/blobs/1", Some("application/json"), b"{}"),
        ["header.content-type"]
    );
    assert_eq!(
        body("PUT", "/blobs/1", Some("application/octet-stream"), b""),
        ["body"]
    );
}

#[test]
fn responses() {
    let s = spec();
    let list = s.find("GET", "/things").unwrap();
    let json = Some("application/json");
    let check = |status: u16, ct: Option<&str>, body: &[u8]| -> Vec<String> {
        match s.validate_response(&list, status, ct, body) {
            Ok(()) => Vec::new(),
            Err(v) => v.list.into_iter().map(|v| v.location).collect(),
        }
    };
    assert!(check(200, json, br#"{"things":[{"name":"a"}]}"#).is_empty());
    assert_eq!(
        check(200, json, br#"{"things":[{"size":1}]}"#),
        ["body/things/0"]
    );
    assert!(check(200, json, b"").is_empty());
    assert_eq!(
        check(200, Some("text/plain"), b"hi"),
        ["header.content-type"]
    );
    assert_eq!(check(200, None, b"{}"), ["header.content-type"]);
    // Lower-case range key, through a $ref to components/responses.
    assert!(check(404, json, br#"{"msg":"gone"}"#).is_empty());
    assert_eq!(check(404, json, br#"{"message":"gone"}"#), ["body"]);
    // `default` declares no content: anything goes.
    assert!(check(500, Some("text/html"), b"<h1>oops</h1>").is_empty());

    let create = s.find("POST", "/things").unwrap();
    assert!(s.validate_response(&create, 204, None, b"").is_ok());
    let v = s.validate_response(&create, 200, json, b"{}").unwrap_err();
    assert_eq!(v.list[0].location, "status");
    assert!(v.to_string().starts_with("POST /things: status: "), "{v}");
}

#[test]
fn json_documents_and_errors() {
    let doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {"/x": {"get": {"responses": {"200": {"description": "ok"}}}}}
    });
    let s = Spec::parse(&doc.to_string()).unwrap();
    assert!(s.validate_request(&req("GET", "/x", None)).is_ok());

    assert!(matches!(
        Spec::parse("swagger: '2.0'\npaths: {}\n"),
        Err(SpecError::NotOpenApi(_))
    ));
    assert!(matches!(Spec::parse("a: [b"), Err(SpecError::Parse { .. })));
    assert!(matches!(
        Spec::load(std::path::Path::new("/nonexistent/openapi.yaml")),
        Err(SpecError::Io { .. })
    ));
}

#[test]
fn external_refs_are_never_fetched() {
    let doc = r#"
openapi: 3.1.0
info: {title: t, version: "1"}
paths:
  /x:
    post:
      requestBody:
        content:
          application/json:
            schema: {$ref: 'https://example.invalid/schema.json'}
      responses:
        '200': {description: ok}
"#;
    let s = Spec::parse(doc).unwrap();
    let r = Request {
        method: "POST",
        path: "/x",
        content_type: Some("application/json"),
        body: b"{}",
        ..Request::default()
    };
    let v = s.validate_request(&r).unwrap_err();
    assert_eq!(v.list[0].location, "schema", "{v}");
    assert_eq!(s.check_schemas().len(), 1);
}
