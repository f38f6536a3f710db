//! Validation of HTTP traffic against an OpenAPI 3.1 document.
//!
//! Ferry talks to REST APIs it does not own (HPE Morpheus first). Its tests run the
//! client against a test double, and both sides can drift from the real API without
//! anyone noticing. This crate closes that gap: the double hands every request it
//! receives to [`Spec::validate_request`] and every response it is about to send to
//! [`Spec::validate_response`], so a test fails as soon as either side says something
//! the vendor's published document does not allow.
//!
//! What is checked:
//! - the operation exists (templated paths, literal segments preferred);
//! - path and query parameters, coerced from strings to their schema types;
//! - the `bearerAuth`-style security requirements of the operation;
//! - the request body's content type and, for JSON and form bodies, its contents;
//! - the response status, content type and JSON body.
//!
//! Schemas are checked as JSON Schema 2020-12 (what OpenAPI 3.1 uses) with `format`
//! treated as an annotation. References are resolved only inside the one document;
//! nothing is ever fetched from the network or the file system.

mod load;
mod route;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use jsonschema::{Draft, Registry, Retrieve, Uri, Validator};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{Map, Value};

use route::Route;

/// The URI under which the document is registered for `$ref` resolution. It is
/// never dereferenced over the network (retrieval is disabled); it only has to be
/// absolute so that `#/components/...` fragments have something to resolve against.
const DOC_URI: &str = "urn:ferry-openapi:document";

/// Characters that must be escaped for a JSON pointer to sit in a URI fragment
/// (templates such as `/api/instances/{id}` end up inside pointers).
const FRAGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Errors loading a document.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read OpenAPI document {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse OpenAPI document {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("not an OpenAPI 3.x document: {0}")]
    NotOpenApi(String),
    #[error("cannot index the document for reference resolution: {0}")]
    Registry(String),
}

/// A parsed OpenAPI document with its schema validators compiled on first use.
pub struct Spec {
    doc: Value,
    registry: Registry<'static>,
    routes: Vec<Route>,
    validators: Mutex<HashMap<String, Result<Arc<Validator>, String>>>,
}

impl std::str::FromStr for Spec {
    type Err = SpecError;
    fn from_str(text: &str) -> Result<Spec, SpecError> {
        Spec::parse(text)
    }
}

impl fmt::Debug for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spec")
            .field("title", &self.doc.pointer("/info/title"))
            .field("version", &self.doc.pointer("/info/version"))
            .field("paths", &self.routes.len())
            .finish_non_exhaustive()
    }
}

/// One HTTP request as the server saw it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Path without the query string, still percent-encoded.
    pub path: &'a str,
    /// The raw query string, without the leading `?`.
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub body: &'a [u8],
}

/// An operation of the document that a request matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// Upper case, as in `GET`.
    pub method: String,
    /// The path key in the document, e.g. `/api/instances/{id}`.
    pub template: String,
    pub operation_id: Option<String>,
    /// Percent-decoded values of the template's parameters.
    pub path_params: BTreeMap<String, String>,
}

/// Everything wrong with one request or response.
#[derive(Debug)]
pub struct Violations {
    pub method: String,
    pub path: String,
    /// The operation's `operationId`, when the request matched one that has it.
    pub operation_id: Option<String>,
    pub list: Vec<Violation>,
}

/// One disagreement with the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Where: `query.max`, `path.id`, `body/instance/name`, `header.authorization`,
    /// `header.content-type`, `status`, `operation`, `schema`.
    pub location: String,
    pub message: String,
}

impl Violation {
    fn new(location: impl Into<String>, message: impl Into<String>) -> Violation {
        Violation {
            location: location.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match &self.operation_id {
            Some(id) => format!("{} {} ({id})", self.method, self.path),
            None => format!("{} {}", self.method, self.path),
        };
        for (i, v) in self.list.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{op}: {v}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

impl Violations {
    /// Whether some violation is at `location` or inside it (`body` covers `body/role`).
    pub fn has(&self, location: &str) -> bool {
        self.list.iter().any(|v| {
            v.location == location
                || v.location
                    .strip_prefix(location)
                    .is_some_and(|rest| rest.starts_with('/') || rest.starts_with('.'))
        })
    }
}

/// A node of the document together with its JSON pointer, so that a schema found
/// by walking (and following `$ref`s) can be handed to the validator by location.
#[derive(Clone)]
struct Located<'a> {
    value: &'a Value,
    ptr: String,
}

impl<'a> Located<'a> {
    fn get(&self, key: &str) -> Option<Located<'a>> {
        let value = match self.value {
            Value::Object(m) => m.get(key)?,
            Value::Array(a) => a.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
        Some(Located {
            value,
            ptr: format!("{}/{}", self.ptr, escape_token(key)),
        })
    }
}

fn escape_token(t: &str) -> String {
    t.replace('~', "~0").replace('/', "~1")
}

/// Refuses every retrieval: the bundle is supposed to be self-contained, and a
/// validator that silently went to the network would make tests flaky and slow.
struct NoRetrieval;

impl Retrieve for NoRetrieval {
    fn retrieve(
        &self,
        uri: &Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!("external reference {uri} is not resolved (retrieval disabled)").into())
    }
}

impl Spec {
    /// Parses a YAML (or JSON) OpenAPI 3.1 document.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        Spec::from_value(load::read_document(path)?)
    }

    /// Parses a document held in memory (YAML or JSON).
    pub fn parse(text: &str) -> Result<Spec, SpecError> {
        let doc = load::parse_document(text).map_err(|message| SpecError::Parse {
            path: PathBuf::from("<memory>"),
            message,
        })?;
        Spec::from_value(doc)
    }

    /// Takes an already parsed document.
    pub fn from_value(doc: Value) -> Result<Spec, SpecError> {
        let version = doc.get("openapi").and_then(Value::as_str).unwrap_or("");
        if !version.starts_with("3.") {
            return Err(SpecError::NotOpenApi(format!(
                "`openapi` is {:?}, expected 3.x",
                doc.get("openapi")
            )));
        }
        let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
            return Err(SpecError::NotOpenApi("no `paths` object".into()));
        };
        let routes = paths.keys().map(|t| Route::parse(t)).collect();

        let mut copy = doc.clone();
        load::strip_examples(&mut copy);
        let registry = Registry::new()
            .retriever(NoRetrieval)
            .draft(Draft::Draft202012)
            .retrieve_known_draft_meta_schemas(false)
            .add(DOC_URI, Draft::Draft202012.create_resource(copy))
            .and_then(|b| b.prepare())
            .map_err(|e| SpecError::Registry(e.to_string()))?;

        Ok(Spec {
            doc,
            registry,
            routes,
            validators: Mutex::new(HashMap::new()),
        })
    }

    /// The document path tests use: `$FERRY_MORPHEUS_OPENAPI`, else the copy in the
    /// `shared/` folder beside the workspace.
    pub fn morpheus_default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("FERRY_MORPHEUS_OPENAPI").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        // The manifest is <root>/crates/ferry-openapi; shared/ sits beside <root>.
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let workspace = manifest.ancestors().nth(2).unwrap_or(manifest);
        workspace
            .join("..")
            .join("shared/morpheus-openapi/morpheus-openapi-8.1.2.yaml")
    }

    /// The raw document, e.g. to read an enum with a JSON pointer.
    pub fn document(&self) -> &Value {
        &self.doc
    }

    /// Matches method + path (no query) to an operation. Literal segments win over
    /// parameters; path parameters come back percent-decoded.
    pub fn find(&self, method: &str, path: &str) -> Option<Operation> {
        let m = method.to_ascii_lowercase();
        let paths = self.doc.get("paths")?;
        let mut best: Option<(&Route, BTreeMap<String, String>)> = None;
        for route in &self.routes {
            let Some(op) = paths.get(&route.template).and_then(|item| item.get(&m)) else {
                continue;
            };
            if !op.is_object() {
                continue;
            }
            let Some(params) = route.matches(path) else {
                continue;
            };
            if best
                .as_ref()
                .is_none_or(|(b, _)| route.more_specific(b).is_gt())
            {
                best = Some((route, params));
            }
        }
        let (route, raw) = best?;
        let op = &paths[&route.template][&m];
        Some(Operation {
            method: method.to_ascii_uppercase(),
            template: route.template.clone(),
            operation_id: op
                .get("operationId")
                .and_then(Value::as_str)
                .map(str::to_string),
            path_params: raw
                .into_iter()
                .map(|(k, v)| (k, percent_decode_str(&v).decode_utf8_lossy().into_owned()))
                .collect(),
        })
    }

    /// Checks a request; on success returns the operation it matched.
    pub fn validate_request(&self, req: &Request<'_>) -> Result<Operation, Violations> {
        let mut out = Violations {
            method: req.method.to_ascii_uppercase(),
            path: req.path.to_string(),
            operation_id: None,
            list: Vec::new(),
        };
        let Some(op) = self.find(req.method, req.path) else {
            out.list.push(Violation::new(
                "operation",
                format!("no operation {} {} in the document", out.method, req.path),
            ));
            return Err(out);
        };
        out.operation_id = op.operation_id.clone();
        let Some(node) = self.operation_node(&op) else {
            out.list
                .push(Violation::new("operation", "operation vanished"));
            return Err(out);
        };

        self.check_parameters(&op, &node, req, &mut out.list);
        self.check_security(&node, req, &mut out.list);
        self.check_request_body(&node, req, &mut out.list);

        if out.list.is_empty() {
            Ok(op)
        } else {
            Err(out)
        }
    }

    /// Checks a response to `op` (as returned by [`Spec::find`] or
    /// [`Spec::validate_request`]).
    pub fn validate_response(
        &self,
        op: &Operation,
        status: u16,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<(), Violations> {
        let mut out = Violations {
            method: op.method.clone(),
            path: op.template.clone(),
            operation_id: op.operation_id.clone(),
            list: Vec::new(),
        };
        self.check_response(op, status, content_type, body, &mut out.list);
        if out.list.is_empty() {
            Ok(())
        } else {
            Err(out)
        }
    }

    /// Compiles the schema of every parameter, request body and response of every
    /// operation and returns the ones that fail as `(json pointer, error)`. A broken
    /// schema would otherwise only surface when some test happens to hit it.
    pub fn check_schemas(&self) -> Vec<(String, String)> {
        let mut pointers = Vec::new();
        let root = Located {
            value: &self.doc,
            ptr: String::new(),
        };
        let paths = root.get("paths");
        let templates: Vec<&String> = self
            .doc
            .get("paths")
            .and_then(Value::as_object)
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        for template in templates {
            let Some(item) = paths.as_ref().and_then(|p| p.get(template)) else {
                continue;
            };
            for (method, _) in item.value.as_object().into_iter().flatten() {
                let Some(node) = item
                    .get(method)
                    .filter(|n| n.value.get("responses").is_some())
                else {
                    continue;
                };
                let op = Operation {
                    method: method.to_ascii_uppercase(),
                    template: template.clone(),
                    operation_id: None,
                    path_params: BTreeMap::new(),
                };
                for p in self.parameters(&op, &node) {
                    pointers.extend(p.get("schema").map(|s| s.ptr));
                }
                let bodies = node
                    .get("requestBody")
                    .map(|r| self.deref(r))
                    .into_iter()
                    .chain(node.get("responses").into_iter().flat_map(|rs| {
                        let keys: Vec<String> = rs
                            .value
                            .as_object()
                            .map(|m| m.keys().cloned().collect())
                            .unwrap_or_default();
                        keys.into_iter()
                            .filter_map(|k| rs.get(&k).map(|r| self.deref(r)))
                            .collect::<Vec<_>>()
                    }));
                for body in bodies {
                    let Some(content) = body.get("content") else {
                        continue;
                    };
                    for (mt, _) in content.value.as_object().into_iter().flatten() {
                        pointers
                            .extend(content.get(mt).and_then(|m| m.get("schema")).map(|s| s.ptr));
                    }
                }
            }
        }
        pointers.sort();
        pointers.dedup();
        pointers
            .into_iter()
            .filter_map(|ptr| self.validator(&ptr).err().map(|e| (ptr, e)))
            .collect()
    }

    fn operation_node(&self, op: &Operation) -> Option<Located<'_>> {
        let root = Located {
            value: &self.doc,
            ptr: String::new(),
        };
        let node = root
            .get("paths")?
            .get(&op.template)?
            .get(&op.method.to_ascii_lowercase())?;
        node.value.is_object().then_some(node)
    }

    /// Follows local `$ref`s (a chain of them, bounded so a cycle cannot hang us).
    fn deref<'a>(&'a self, mut node: Located<'a>) -> Located<'a> {
        for _ in 0..32 {
            let Some(r) = node.value.get("$ref").and_then(Value::as_str) else {
                break;
            };
            let Some(fragment) = r.strip_prefix('#') else {
                break;
            };
            let ptr = percent_decode_str(fragment)
                .decode_utf8_lossy()
                .into_owned();
            let Some(value) = self.doc.pointer(&ptr) else {
                break;
            };
            node = Located { value, ptr };
        }
        node
    }

    // ---- parameters -------------------------------------------------------------

    fn parameters<'a>(&'a self, op: &Operation, node: &Located<'a>) -> Vec<Located<'a>> {
        let mut params: Vec<Located<'a>> = Vec::new();
        let item = self
            .doc
            .get("paths")
            .and_then(|p| p.get(&op.template))
            .map(|value| Located {
                value,
                ptr: format!("/paths/{}", escape_token(&op.template)),
            });
        let lists = [
            item.and_then(|i| i.get("parameters")),
            node.get("parameters"),
        ];
        for list in lists.into_iter().flatten() {
            let n = list.value.as_array().map_or(0, Vec::len);
            for i in 0..n {
                let Some(p) = list.get(&i.to_string()).map(|p| self.deref(p)) else {
                    continue;
                };
                let key =
                    |p: &Located<'_>| (p.value.get("name").cloned(), p.value.get("in").cloned());
                // Operation-level parameters override path-level ones of the same name+in.
                let k = key(&p);
                params.retain(|q| key(q) != k);
                params.push(p);
            }
        }
        params
    }

    fn check_parameters(
        &self,
        op: &Operation,
        node: &Located<'_>,
        req: &Request<'_>,
        out: &mut Vec<Violation>,
    ) {
        let query = parse_pairs(req.query.unwrap_or(""));
        // Query keys the operation documents: a parameter's name, a deepObject's
        // `name[…]`, or any key at all when an exploded object parameter takes free keys.
        let mut documented: Vec<String> = vec![];
        let mut free_keys = false;
        for p in self.parameters(op, node) {
            if p.value.get("in").and_then(Value::as_str) != Some("query") {
                continue;
            }
            let name = p.value.get("name").and_then(Value::as_str).unwrap_or("");
            let object = p
                .get("schema")
                .map(|s| self.types_of(self.deref_value(s.value)).contains(&"object"))
                .unwrap_or(false);
            free_keys |=
                object && p.value.get("style").and_then(Value::as_str) != Some("deepObject");
            documented.push(name.to_string());
        }
        if !free_keys {
            for (k, _) in &query {
                let known = documented.iter().any(|n| {
                    k == n
                        || k.strip_prefix(n.as_str())
                            .is_some_and(|r| r.starts_with('['))
                });
                if !known && !out.iter().any(|v| v.location == format!("query.{k}")) {
                    out.push(Violation::new(
                        format!("query.{k}"),
                        format!(
                            "query parameter `{k}` is not documented for this operation (it takes: {})",
                            if documented.is_empty() { "none".to_string() } else { documented.join(", ") }
                        ),
                    ));
                }
            }
        }
        for p in self.parameters(op, node) {
            let name = p.value.get("name").and_then(Value::as_str).unwrap_or("");
            let place = p.value.get("in").and_then(Value::as_str).unwrap_or("");
            let required =
                p.value.get("required").and_then(Value::as_bool) == Some(true) || place == "path";
            let Some(schema) = p.get("schema") else {
                continue;
            };
            let location = format!("{place}.{name}");
            let instance = match place {
                "path" => op
                    .path_params
                    .get(name)
                    .map(|raw| self.coerce(raw, schema.value)),
                "query" => self.query_value(name, &p, schema.value, &query),
                "header" if name.eq_ignore_ascii_case("authorization") => {
                    req.authorization.map(|raw| self.coerce(raw, schema.value))
                }
                // Other headers and cookies are not part of `Request`.
                _ => continue,
            };
            match instance {
                Some(v) => self.check_schema(&schema.ptr, &v, &location, out),
                None if required => {
                    out.push(Violation::new(
                        location,
                        format!("required {place} parameter `{name}` is missing"),
                    ));
                }
                None => {}
            }
        }
    }

    fn query_value(
        &self,
        name: &str,
        param: &Located<'_>,
        schema: &Value,
        query: &[(String, String)],
    ) -> Option<Value> {
        let style = param
            .value
            .get("style")
            .and_then(Value::as_str)
            .unwrap_or("form");
        let explode = param
            .value
            .get("explode")
            .and_then(Value::as_bool)
            .unwrap_or(style == "form");
        let schema = self.deref_value(schema);
        let types = self.types_of(schema);

        if style == "deepObject" || (types.contains(&"object") && !types.contains(&"string")) {
            let prefix = format!("{name}[");
            let props = schema.get("properties");
            let mut obj = Map::new();
            for (k, v) in query {
                let key = if style == "deepObject" {
                    k.strip_prefix(&prefix).and_then(|r| r.strip_suffix(']'))
                } else if explode {
                    props.and_then(|p| p.get(k)).map(|_| k.as_str())
                } else {
                    None
                };
                if let Some(key) = key {
                    let prop = self.property_schema(schema, key);
                    obj.insert(key.to_string(), self.coerce_opt(v, prop));
                }
            }
            return (!obj.is_empty()).then_some(Value::Object(obj));
        }

        let values: Vec<&str> = query
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        if values.is_empty() {
            return None;
        }
        if types.contains(&"array") {
            let items = schema.get("items");
            let sep = match style {
                "spaceDelimited" => Some(' '),
                "pipeDelimited" => Some('|'),
                _ if explode => None,
                _ => Some(','),
            };
            let raw: Vec<&str> = match sep {
                Some(c) => values.iter().flat_map(|v| v.split(c)).collect(),
                None => values,
            };
            let arr = raw.into_iter().map(|v| self.coerce_opt(v, items)).collect();
            return Some(Value::Array(arr));
        }
        // A scalar given twice: the servers we imitate read the first occurrence.
        Some(self.coerce(values[0], schema))
    }

    // ---- security ---------------------------------------------------------------

    fn check_security(&self, node: &Located<'_>, req: &Request<'_>, out: &mut Vec<Violation>) {
        let requirements = node
            .value
            .get("security")
            .or_else(|| self.doc.get("security"))
            .and_then(Value::as_array);
        let Some(requirements) = requirements else {
            return;
        };
        if requirements.is_empty() {
            return;
        }
        let mut problems = Vec::new();
        for req_obj in requirements {
            let Some(schemes) = req_obj.as_object() else {
                continue;
            };
            let failed: Vec<String> = schemes
                .keys()
                .filter_map(|s| self.scheme_problem(s, req).err())
                .collect();
            if failed.is_empty() {
                return;
            }
            problems.extend(failed);
        }
        problems.dedup();
        let location = if problems.iter().any(|p| p.contains("Authorization")) {
            "header.authorization"
        } else {
            "security"
        };
        out.push(Violation::new(location, problems.join("; ")));
    }

    fn scheme_problem(&self, name: &str, req: &Request<'_>) -> Result<(), String> {
        let scheme = self
            .doc
            .pointer(&format!(
                "/components/securitySchemes/{}",
                escape_token(name)
            ))
            .map(|s| {
                self.deref(Located {
                    value: s,
                    ptr: String::new(),
                })
                .value
            });
        let Some(scheme) = scheme else {
            return Err(format!("security scheme `{name}` is not defined"));
        };
        let kind = scheme.get("type").and_then(Value::as_str).unwrap_or("");
        let http_scheme = scheme
            .get("scheme")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        let expect = match (kind, http_scheme.as_str()) {
            ("http", "bearer") | ("oauth2", _) | ("openIdConnect", _) => "Bearer",
            ("http", "basic") => "Basic",
            ("apiKey", _) => {
                let key = scheme.get("name").and_then(Value::as_str).unwrap_or("");
                let place = scheme.get("in").and_then(Value::as_str).unwrap_or("");
                return match place {
                    "query"
                        if !parse_pairs(req.query.unwrap_or(""))
                            .iter()
                            .any(|(k, _)| k == key) =>
                    {
                        Err(format!("`{name}` needs query parameter `{key}`"))
                    }
                    "header" if key.eq_ignore_ascii_case("authorization") => {
                        match req.authorization {
                            Some(v) if !v.trim().is_empty() => Ok(()),
                            _ => Err(format!("`{name}` needs an Authorization header")),
                        }
                    }
                    // Other headers are not part of `Request`, so they cannot be checked.
                    _ => Ok(()),
                };
            }
            _ => return Ok(()),
        };
        let ok = req.authorization.is_some_and(|h| {
            h.split_once(' ').is_some_and(|(s, token)| {
                s.eq_ignore_ascii_case(expect) && !token.trim().is_empty()
            })
        });
        if ok {
            Ok(())
        } else {
            Err(match req.authorization {
                None => format!("`{name}` needs an Authorization header `{expect} <token>`"),
                Some(_) => format!(
                    "`{name}` needs an Authorization header `{expect} <token>`, got something else"
                ),
            })
        }
    }

    // ---- bodies -----------------------------------------------------------------

    fn check_request_body(&self, node: &Located<'_>, req: &Request<'_>, out: &mut Vec<Violation>) {
        let empty = req.body.iter().all(u8::is_ascii_whitespace);
        let Some(rb) = node.get("requestBody").map(|r| self.deref(r)) else {
            if !empty {
                out.push(Violation::new(
                    "body",
                    "the operation declares no request body, but one was sent",
                ));
            }
            return;
        };
        let required = rb.value.get("required").and_then(Value::as_bool) == Some(true);
        if empty {
            if required {
                out.push(Violation::new("body", "request body is required"));
            }
            return;
        }
        let Some(content) = rb.get("content") else {
            return;
        };
        let Some(ct) = req.content_type else {
            out.push(Violation::new(
                "header.content-type",
                format!(
                    "a body was sent without Content-Type; the operation accepts {}",
                    declared_types(content.value)
                ),
            ));
            return;
        };
        let Some((mt, media)) = pick_media(&content, ct) else {
            out.push(Violation::new(
                "header.content-type",
                format!(
                    "content type `{ct}` is not accepted; the operation accepts {}",
                    declared_types(content.value)
                ),
            ));
            return;
        };
        let Some(schema) = media.get("schema") else {
            return;
        };
        let instance = if is_json(&mt) {
            match serde_json::from_slice::<Value>(req.body) {
                Ok(v) => v,
                Err(e) => {
                    out.push(Violation::new("body", format!("not valid JSON: {e}")));
                    return;
                }
            }
        } else if mt == "application/x-www-form-urlencoded" {
            let Ok(text) = std::str::from_utf8(req.body) else {
                out.push(Violation::new("body", "form body is not UTF-8"));
                return;
            };
            self.form_object(text, schema.value)
        } else {
            return;
        };
        self.check_schema(&schema.ptr, &instance, "body", out);
    }

    fn form_object(&self, text: &str, schema: &Value) -> Value {
        let schema = self.deref_value(schema);
        let mut grouped: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in parse_pairs(text) {
            grouped.entry(k).or_default().push(v);
        }
        let mut obj = Map::new();
        for (k, vals) in grouped {
            let prop = self.property_schema(schema, &k);
            let is_array =
                prop.is_some_and(|p| self.types_of(self.deref_value(p)).contains(&"array"));
            let value = if is_array {
                let items = prop.and_then(|p| self.deref_value(p).get("items"));
                Value::Array(vals.iter().map(|v| self.coerce_opt(v, items)).collect())
            } else {
                self.coerce_opt(&vals[0], prop)
            };
            obj.insert(k, value);
        }
        Value::Object(obj)
    }

    fn check_response(
        &self,
        op: &Operation,
        status: u16,
        content_type: Option<&str>,
        body: &[u8],
        out: &mut Vec<Violation>,
    ) {
        let Some(node) = self.operation_node(op) else {
            out.push(Violation::new(
                "operation",
                format!("no operation {} {} in the document", op.method, op.template),
            ));
            return;
        };
        let Some(responses) = node.get("responses") else {
            out.push(Violation::new(
                "status",
                "the operation declares no responses",
            ));
            return;
        };
        let map = responses.value.as_object();
        let code = status.to_string();
        let range = format!("{}XX", status / 100);
        let key = map.and_then(|m| {
            m.keys()
                .find(|k| **k == code)
                .or_else(|| m.keys().find(|k| k.eq_ignore_ascii_case(&range)))
                .or_else(|| m.keys().find(|k| *k == "default"))
        });
        let Some(key) = key.cloned() else {
            let declared: Vec<&str> = map
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            out.push(Violation::new(
                "status",
                format!(
                    "status {status} is not declared (declared: {})",
                    declared.join(", ")
                ),
            ));
            return;
        };
        let Some(resp) = responses.get(&key).map(|r| self.deref(r)) else {
            return;
        };
        let Some(content) = resp
            .get("content")
            .filter(|c| c.value.as_object().is_some_and(|m| !m.is_empty()))
        else {
            return;
        };
        let empty = body.iter().all(u8::is_ascii_whitespace);
        let Some(ct) = content_type else {
            if !empty {
                out.push(Violation::new(
                    "header.content-type",
                    format!(
                        "a body was returned without Content-Type; response {key} declares {}",
                        declared_types(content.value)
                    ),
                ));
            }
            return;
        };
        let Some((mt, media)) = pick_media(&content, ct) else {
            out.push(Violation::new(
                "header.content-type",
                format!(
                    "content type `{ct}` is not declared for response {key}; it declares {}",
                    declared_types(content.value)
                ),
            ));
            return;
        };
        if empty || !is_json(&mt) {
            return;
        }
        let Some(schema) = media.get("schema") else {
            return;
        };
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => self.check_schema(&schema.ptr, &v, "body", out),
            Err(e) => out.push(Violation::new("body", format!("not valid JSON: {e}"))),
        }
    }

    // ---- schemas ----------------------------------------------------------------

    fn validator(&self, ptr: &str) -> Result<Arc<Validator>, String> {
        if let Some(v) = self.lock().get(ptr) {
            return v.clone();
        }
        // Compiled outside the lock: a large schema takes milliseconds, and other
        // requests should not wait on it. A rare duplicate compile is harmless.
        let uri = format!("{DOC_URI}#{}", utf8_percent_encode(ptr, FRAGMENT));
        let built = jsonschema::options()
            .with_draft(Draft::Draft202012)
            .with_registry(&self.registry)
            .with_retriever(NoRetrieval)
            .should_validate_formats(false)
            .build(&serde_json::json!({ "$ref": uri }))
            .map(Arc::new)
            .map_err(|e| e.to_string());
        self.lock().entry(ptr.to_string()).or_insert(built).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Result<Arc<Validator>, String>>> {
        // A panic elsewhere while holding the lock leaves only a cache behind.
        self.validators
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check_schema(&self, ptr: &str, instance: &Value, location: &str, out: &mut Vec<Violation>) {
        let validator = match self.validator(ptr) {
            Ok(v) => v,
            Err(e) => {
                out.push(Violation::new(
                    "schema",
                    format!("cannot compile the schema at #{ptr}: {e}"),
                ));
                return;
            }
        };
        for err in validator.iter_errors(instance) {
            let path = err.instance_path().as_str().to_string();
            let loc = if path.is_empty() {
                location.to_string()
            } else if location == "body" {
                format!("body{path}")
            } else {
                format!("{location}{path}")
            };
            out.push(Violation::new(loc, err.to_string()));
        }
    }

    /// Like `deref`, for callers that only need the value (coercion hints).
    fn deref_value<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        for _ in 0..32 {
            let Some(r) = value.get("$ref").and_then(Value::as_str) else {
                break;
            };
            let Some(next) = r
                .strip_prefix('#')
                .and_then(|f| self.doc.pointer(&percent_decode_str(f).decode_utf8_lossy()))
            else {
                break;
            };
            value = next;
        }
        value
    }

    fn property_schema<'a>(&'a self, schema: &'a Value, name: &str) -> Option<&'a Value> {
        let direct = schema.get("properties").and_then(|p| p.get(name));
        direct.or_else(|| {
            ["allOf", "anyOf", "oneOf"].iter().find_map(|k| {
                schema
                    .get(*k)?
                    .as_array()?
                    .iter()
                    .find_map(|s| self.property_schema(self.deref_value(s), name))
            })
        })
    }

    /// The JSON types a schema admits, looking one level into `*Of` branches:
    /// enough to decide how to read a string from a URL.
    fn types_of<'a>(&'a self, schema: &'a Value) -> Vec<&'a str> {
        let mut types = Vec::new();
        match schema.get("type") {
            Some(Value::String(t)) => types.push(t.as_str()),
            Some(Value::Array(ts)) => types.extend(ts.iter().filter_map(Value::as_str)),
            _ => {}
        }
        for k in ["allOf", "anyOf", "oneOf"] {
            for s in schema
                .get(k)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(t) = self.deref_value(s).get("type") {
                    match t {
                        Value::String(t) => types.push(t.as_str()),
                        Value::Array(ts) => types.extend(ts.iter().filter_map(Value::as_str)),
                        _ => {}
                    }
                }
            }
        }
        types
    }

    fn coerce_opt(&self, raw: &str, schema: Option<&Value>) -> Value {
        match schema {
            Some(s) => self.coerce(raw, s),
            None => Value::String(raw.to_string()),
        }
    }

    /// Reads a URL string as the type its schema wants. A string that does not fit
    /// stays a string, so the validator reports the type mismatch with its usual text.
    fn coerce(&self, raw: &str, schema: &Value) -> Value {
        let schema = self.deref_value(schema);
        let types = self.types_of(schema);
        if types.contains(&"integer") {
            if let Ok(i) = raw.parse::<i64>() {
                return Value::from(i);
            }
            if let Ok(u) = raw.parse::<u64>() {
                return Value::from(u);
            }
        }
        if types.contains(&"number") {
            if let Some(n) = raw
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
            {
                return Value::Number(n);
            }
        }
        if types.contains(&"boolean") && (raw == "true" || raw == "false") {
            return Value::Bool(raw == "true");
        }
        if types.contains(&"null") && !types.contains(&"string") && raw == "null" {
            return Value::Null;
        }
        Value::String(raw.to_string())
    }
}

fn parse_pairs(s: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn media_type(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_json(mt: &str) -> bool {
    mt == "application/json" || mt.ends_with("+json")
}

fn declared_types(content: &Value) -> String {
    content
        .as_object()
        .map(|m| {
            m.keys()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// The declared media type for `ct`: an exact match first, then `type/*`, then `*/*`.
fn pick_media<'a>(content: &Located<'a>, ct: &str) -> Option<(String, Located<'a>)> {
    let mt = media_type(ct);
    let map = content.value.as_object()?;
    let major = mt.split('/').next().unwrap_or("");
    let key = map
        .keys()
        .find(|k| media_type(k) == mt)
        .or_else(|| map.keys().find(|k| media_type(k) == format!("{major}/*")))
        .or_else(|| map.keys().find(|k| media_type(k) == "*/*"))?;
    Some((mt, content.get(key)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn spec_is_shareable() {
        assert_send_sync::<Spec>();
    }
}
