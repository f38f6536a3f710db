//! The REST API: the only code that knows the public HTTP and JSON shapes.
//!
//! Every route but `GET /api/openapi.json` needs `Authorization: Bearer TOKEN`. Lists take
//! `limit` (1-500, default 50) and `offset` and answer `{items, total, limit, offset}`.
//! Errors answer `{"error": {"code", "message", "details"?}}`.

use crate::csv_import::{self, LineError};
use crate::engine::Engine;
use crate::error::{ApiError, ErrorBody};
use crate::secrets::{hash_token, new_token, SecretBox};
use axum::extract::{FromRequest, FromRequestParts, Request, State as AxState};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use ferry_model::*;
use ferry_store::{ImportRow, MigrationFilter, Page, Store, TokenRecord, WorkloadFilter};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};
use uuid::Uuid;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub secrets: SecretBox,
    pub tokens: Arc<RwLock<HashMap<String, TokenRecord>>>,
}

impl AppState {
    pub(crate) fn store(&self) -> &Store {
        &self.engine.store
    }
}

// ---- extractors that answer with the JSON error body ------------------------------

/// A JSON object body (serde would also take an array for a struct: refused here).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Json(v) = Json::<serde_json::Value>::from_request(req, state).await?;
        if !v.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        serde_json::from_value(v)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

fn parse_id(s: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s)
        .map_err(|_| ApiError::bad_request(format!("'{s}' is not a {what} id (a UUID)")))
}

// ---- shapes ------------------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip (default 0).
    #[param(minimum = 0, maximum = 2147483647)]
    pub offset: Option<i64>,
}

impl PageParams {
    fn page(&self) -> Result<Page, ApiError> {
        let limit = self.limit.unwrap_or(50);
        let offset = self.offset.unwrap_or(0);
        if !(1..=500).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit {limit} is outside 1-500"
            )));
        }
        if !(0..=i64::from(i32::MAX)).contains(&offset) {
            return Err(ApiError::bad_request(format!(
                "offset {offset} must be 0 or more"
            )));
        }
        Ok(Page { limit, offset })
    }
}

macro_rules! paged {
    ($name:ident, $t:ty) => {
        #[derive(Debug, Serialize, Deserialize, ToSchema)]
        pub struct $name {
            pub items: Vec<$t>,
            pub total: i64,
            pub limit: i64,
            pub offset: i64,
        }
        impl $name {
            fn new((items, total): (Vec<$t>, i64), p: Page) -> Self {
                $name {
                    items,
                    total,
                    limit: p.limit,
                    offset: p.offset,
                }
            }
        }
    };
}

paged!(SourcePage, Source);
paged!(TargetPage, Target);
paged!(CredentialPage, Credential);
paged!(WorkloadPage, Workload);
paged!(GroupPage, MoveGroup);
paged!(ProfilePage, Profile);
paged!(MigrationPage, Migration);

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub schema_version: i64,
    pub backend: String,
    pub open_jobs: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenInfo {
    pub id: Uuid,
    pub name: String,
    pub admin: bool,
    pub created_at: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    pub id: Uuid,
    pub name: String,
    /// Shown once; only its hash is stored.
    pub token: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WorkloadQuery {
    /// Name contains this text.
    pub name: Option<String>,
    /// Move group name or id.
    pub group: Option<String>,
    /// Source name or id.
    pub source: Option<String>,
    pub tag: Option<String>,
    /// Items per page, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip (default 0).
    #[param(minimum = 0, maximum = 2147483647)]
    pub offset: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImportReport {
    pub imported: usize,
    pub rejected: usize,
    pub errors: Vec<LineError>,
    pub workload_ids: Vec<Uuid>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMigration {
    /// Workload name or id.
    pub workload: String,
    /// Profile name or id.
    pub profile: String,
    /// Start at once (pre-flight, then the initial sync). Default true.
    #[serde(default = "yes")]
    pub start: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupMigrations {
    /// Profile name or id applied to every member without an active migration.
    pub profile: String,
    #[serde(default = "yes")]
    pub start: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupMigrationsReport {
    pub created: Vec<Migration>,
    /// Members skipped, with the reason.
    pub skipped: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupCommandReport {
    pub move_group: MoveGroup,
    pub applied: Vec<Uuid>,
    pub skipped: Vec<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MigrationQuery {
    #[param(value_type = Option<State>)]
    pub state: Option<String>,
    /// Workload name or id.
    pub workload: Option<String>,
    /// Move group name or id.
    pub group: Option<String>,
    /// Items per page, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip (default 0).
    #[param(minimum = 0, maximum = 2147483647)]
    pub offset: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MigrationDetail {
    pub migration: Migration,
    /// Commands accepted in the current state.
    pub allowed_commands: Vec<Command>,
    /// The step running now, if any.
    pub running_step: Option<Step>,
    pub syncs: Vec<SyncRun>,
    /// The cutover's downtime, once final validation passed.
    pub downtime: Option<Downtime>,
}

/// Time from "stop services" to "target passed validation", by phase.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Downtime {
    pub total_ms: i64,
    pub phases: Vec<DowntimePhase>,
    /// Time between the phases (queueing, bookkeeping).
    pub other_ms: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DowntimePhase {
    /// A cutover step (`stop_services`, `final_delta`, `shutdown_source`, `shutdown_delta`,
    /// `start_target`, `post_cutover`, `final_validation`) or `conversion`, the guest's conversion
    /// within `start_target`.
    pub phase: String,
    pub ms: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    pub command: Command,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CursorQuery {
    /// Only items with a greater id.
    pub after: Option<i64>,
    /// 1-1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Only this migration's events.
    #[param(format = Uuid)]
    pub migration_id: Option<String>,
}

impl CursorQuery {
    fn parts(&self) -> Result<(i64, i64, Option<Uuid>), ApiError> {
        let limit = self.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit {limit} is outside 1-1000"
            )));
        }
        let mid = match &self.migration_id {
            Some(s) => Some(parse_id(s, "migration")?),
            None => None,
        };
        Ok((self.after.unwrap_or(0).max(0), limit, mid))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StateCount {
    pub state: State,
    pub count: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobInfo {
    pub id: Uuid,
    pub step: Step,
    pub status: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub run_at: i64,
    pub lease_owner: Option<String>,
    pub last_error: Option<String>,
}

// ---- the document ------------------------------------------------------------------

#[derive(OpenApi)]
#[openapi(
    info(title = "Ferry appliance API", description = "Control plane of Ferry: inventory, move groups, profiles and migrations."),
    paths(
        openapi_json, health, list_tokens, create_token,
        list_credentials, create_credential,
        list_sources, create_source, get_source, patch_source, delete_source, discover_source, fix_source,
        list_targets, create_target, get_target, patch_target, delete_target,
        list_workloads, create_workload, get_workload, patch_workload, import_workloads,
        list_groups, create_group, get_group, group_migrations, group_cutover, group_sync,
        list_profiles, create_profile, get_profile,
        list_migrations, create_migration, get_migration, migration_command, migration_schedule,
        migration_events, migration_logs, migration_jobs,
        list_events, event_stream, stats,
    ),
    components(schemas(ErrorBody, Status, State, Step, Command, UatVerdict)),
    tags((name = "ferry"))
)]
pub struct ApiDoc;

/// The OpenAPI document with bearer auth and the error responses on every operation.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::path::Operation;
    use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let comps = doc.components.get_or_insert_with(Default::default);
    comps.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    let err = |d: &str| {
        ResponseBuilder::new()
            .description(d)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                        "ErrorBody",
                    ))))
                    .build(),
            )
            .build()
    };
    let add = |op: &mut Operation, public: bool| {
        let mut codes = vec![
            ("400", "Bad request"),
            ("404", "Not found"),
            ("409", "Conflict"),
            ("500", "Internal error"),
        ];
        if !public {
            codes.push(("401", "Missing or unknown token"));
            op.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
                "bearer",
                Vec::<String>::new(),
            )]);
        }
        for (c, d) in codes {
            op.responses
                .responses
                .entry(c.to_string())
                .or_insert_with(|| RefOr::T(err(d)));
        }
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let public = path == "/api/openapi.json";
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            add(op, public);
        }
    }
    doc
}

#[utoipa::path(get, path = "/api/openapi.json", responses((status = 200, description = "This document", body = Object)))]
async fn openapi_json() -> Response {
    Json(openapi()).into_response()
}

// ---- auth ----------------------------------------------------------------------------

/// Who made a request: the name of the token used (recorded as the actor of commands).
#[derive(Debug, Clone)]
pub struct Caller(pub String);

pub async fn auth(AxState(st): AxState<AppState>, mut req: Request, next: Next) -> Response {
    if req.uri().path() == "/api/openapi.json" {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let Some(token) = header
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
    else {
        return ApiError::unauthorized("send 'Authorization: Bearer TOKEN' (the admin token is in the appliance's data directory, file admin-token)").into_response();
    };
    match caller_for_token(&st, &token).await {
        Ok(name) => {
            req.extensions_mut().insert(Caller(name));
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// The name of the token `token`, if it is one of the appliance's.
pub(crate) async fn caller_for_token(st: &AppState, token: &str) -> Result<String, ApiError> {
    let hash = hash_token(token);
    let cached = st
        .tokens
        .read()
        .ok()
        .and_then(|m| m.get(&hash).map(|r| r.name.clone()));
    let name = match cached {
        Some(n) => n,
        None => match st.store().token_by_hash(&hash).await {
            Ok(Some(rec)) => {
                let n = rec.name.clone();
                if let Ok(mut m) = st.tokens.write() {
                    m.insert(hash, rec);
                }
                n
            }
            Ok(None) => return Err(ApiError::unauthorized("unknown token")),
            Err(e) => return Err(ApiError::from(e)),
        },
    };
    Ok(name)
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the API is described at /api/openapi.json")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route; see /api/openapi.json",
    )
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/openapi.json", get(openapi_json))
        .route("/api/health", get(health))
        .route("/api/stats", get(stats))
        .route("/api/tokens", get(list_tokens).post(create_token))
        .route(
            "/api/credentials",
            get(list_credentials).post(create_credential),
        )
        .route("/api/sources", get(list_sources).post(create_source))
        .route(
            "/api/sources/{key}",
            get(get_source).patch(patch_source).delete(delete_source),
        )
        .route("/api/sources/{key}/discover", post(discover_source))
        .route("/api/sources/{key}/fix", post(fix_source))
        .route("/api/targets", get(list_targets).post(create_target))
        .route(
            "/api/targets/{key}",
            get(get_target).patch(patch_target).delete(delete_target),
        )
        .route("/api/workloads", get(list_workloads).post(create_workload))
        .route("/api/workloads/import", post(import_workloads))
        .route(
            "/api/workloads/{key}",
            get(get_workload).patch(patch_workload),
        )
        .route("/api/groups", get(list_groups).post(create_group))
        .route("/api/groups/{key}", get(get_group))
        .route("/api/groups/{key}/migrations", post(group_migrations))
        .route("/api/groups/{key}/cutover", post(group_cutover))
        .route("/api/groups/{key}/sync", post(group_sync))
        .route("/api/profiles", get(list_profiles).post(create_profile))
        .route("/api/profiles/{key}", get(get_profile))
        .route(
            "/api/migrations",
            get(list_migrations).post(create_migration),
        )
        .route("/api/migrations/{id}", get(get_migration))
        .route("/api/migrations/{id}/commands", post(migration_command))
        .route("/api/migrations/{id}/schedule", put(migration_schedule))
        .route("/api/migrations/{id}/events", get(migration_events))
        .route("/api/migrations/{id}/logs", get(migration_logs))
        .route("/api/migrations/{id}/jobs", get(migration_jobs))
        .route("/api/events", get(list_events))
        .route("/api/events/stream", get(event_stream))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .merge(crate::ui::routes(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

type ApiResult<T> = Result<T, ApiError>;

// ---- handlers ------------------------------------------------------------------------

#[utoipa::path(get, path = "/api/health", responses((status = 200, body = Health)))]
async fn health(AxState(st): AxState<AppState>) -> ApiResult<Json<Health>> {
    Ok(Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        schema_version: st.store().schema_version().await?,
        backend: format!("{:?}", st.store().backend()).to_lowercase(),
        open_jobs: st.store().count_open_jobs().await?,
    }))
}

#[utoipa::path(get, path = "/api/stats", responses((status = 200, body = Vec<StateCount>)))]
async fn stats(AxState(st): AxState<AppState>) -> ApiResult<Json<Vec<StateCount>>> {
    let counts = st.store().count_by_state().await?;
    Ok(Json(
        counts
            .into_iter()
            .map(|(state, count)| StateCount { state, count })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/tokens", responses((status = 200, body = Vec<TokenInfo>)))]
async fn list_tokens(AxState(st): AxState<AppState>) -> ApiResult<Json<Vec<TokenInfo>>> {
    let list = st.store().list_tokens().await?;
    Ok(Json(
        list.into_iter()
            .map(|t| TokenInfo {
                id: t.id,
                name: t.name,
                admin: t.admin,
                created_at: t.created_at,
            })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/tokens", request_body = NewToken, responses((status = 201, body = CreatedToken)))]
async fn create_token(
    AxState(st): AxState<AppState>,
    ApiJson(t): ApiJson<NewToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    validate_name(&t.name).map_err(|m| ApiError::bad_request(format!("name {m}")))?;
    let token = new_token();
    let id = st
        .store()
        .insert_token(&t.name, &hash_token(&token), false)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id,
            name: t.name,
            token,
        }),
    ))
}

#[utoipa::path(get, path = "/api/credentials", params(PageParams), responses((status = 200, body = CredentialPage)))]
async fn list_credentials(
    AxState(st): AxState<AppState>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<CredentialPage>> {
    let page = p.page()?;
    Ok(Json(CredentialPage::new(
        st.store().list_credentials(page).await?,
        page,
    )))
}

#[utoipa::path(post, path = "/api/credentials", request_body = NewCredential, responses((status = 201, body = Credential)))]
async fn create_credential(
    AxState(st): AxState<AppState>,
    ApiJson(c): ApiJson<NewCredential>,
) -> ApiResult<(StatusCode, Json<Credential>)> {
    validate_name(&c.name).map_err(|m| ApiError::bad_request(format!("name {m}")))?;
    if c.secret.is_empty() {
        return Err(ApiError::bad_request("secret must not be empty"));
    }
    let sealed = st.secrets.seal(&c.secret);
    let cred = st
        .store()
        .insert_credential(&c.name, c.kind, c.username.as_deref(), &sealed)
        .await?;
    Ok((StatusCode::CREATED, Json(cred)))
}

async fn check_credential(st: &AppState, id: Option<Uuid>) -> ApiResult<()> {
    if let Some(id) = id {
        st.store()
            .credential_secret(id)
            .await
            .map_err(|_| field_error("credential", format!("credential {id} does not exist")))?;
    }
    Ok(())
}

fn check_config(config: &serde_json::Value) -> ApiResult<()> {
    if !config.is_object() {
        return Err(field_error("config", "config must be a JSON object".into()));
    }
    if let Some(p) = config.get("path") {
        if !p.is_string() && !p.is_null() {
            return Err(field_error("path", "config.path must be a string".into()));
        }
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/sources", params(PageParams), responses((status = 200, body = SourcePage)))]
async fn list_sources(
    AxState(st): AxState<AppState>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<SourcePage>> {
    let page = p.page()?;
    Ok(Json(SourcePage::new(
        st.store().list_sources(page).await?,
        page,
    )))
}

#[utoipa::path(post, path = "/api/sources", request_body = NewSource, responses((status = 201, body = Source)))]
async fn create_source(
    AxState(st): AxState<AppState>,
    ApiJson(s): ApiJson<NewSource>,
) -> ApiResult<(StatusCode, Json<Source>)> {
    Ok((StatusCode::CREATED, Json(insert_source(&st, &s).await?)))
}

/// Checks a new source (the field at fault in the error's details) and stores it.
pub(crate) async fn insert_source(st: &AppState, s: &NewSource) -> ApiResult<Source> {
    check_source(st, s).await?;
    Ok(st.store().insert_source(s).await?)
}

/// What a source must satisfy to be stored (new or edited).
pub(crate) async fn check_source(st: &AppState, s: &NewSource) -> ApiResult<()> {
    validate_name(&s.name).map_err(|m| field_error("name", format!("name {m}")))?;
    if let Some(why) = st.engine.adapters.refuse_source_kind(s.kind) {
        return Err(field_error("kind", why));
    }
    check_config(&s.config)?;
    check_credential(st, s.credential_id).await
}

/// A bad request about one field, named in `details.fields` (what forms show at it).
fn field_error(field: &str, message: String) -> ApiError {
    ApiError::bad_request(message.clone())
        .with_details(serde_json::json!({"fields": [{"field": field, "message": message}]}))
}

#[utoipa::path(get, path = "/api/sources/{key}", params(("key" = String, Path, description = "Name or id")), responses((status = 200, body = Source)))]
async fn get_source(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<Json<Source>> {
    Ok(Json(st.store().get_source(&key).await?))
}

/// A fix pre-flight offers, for some of the source's workloads.
#[derive(Debug, Deserialize, ToSchema)]
pub struct FixRequest {
    /// e.g. `enable-cbt` (vSphere: changed block tracking on).
    pub fix: String,
    pub workloads: Vec<String>,
}

/// Applies a fix pre-flight offers; a line per workload says what was done.
#[utoipa::path(post, path = "/api/sources/{key}/fix", params(("key" = String, Path, description = "Name or id")), request_body = FixRequest, responses((status = 200, body = Vec<String>)))]
async fn fix_source(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
    ApiJson(req): ApiJson<FixRequest>,
) -> ApiResult<Json<Vec<String>>> {
    let (src, adapter, secrets) = source_session(&st, &key).await?;
    let done = adapter
        .fix(&src, &secrets, &req.fix, &req.workloads)
        .await
        .map_err(|e| {
            ApiError::bad_request(format!(
                "fix '{}' on source '{}' failed: {}",
                req.fix, src.name, e.message
            ))
        })?;
    Ok(Json(done))
}

/// A source, its adapter, and its own credential decrypted.
async fn source_session(
    st: &AppState,
    key: &str,
) -> ApiResult<(
    ferry_model::Source,
    std::sync::Arc<dyn ferry_adapter::SourceAdapter>,
    ferry_adapter::Secrets,
)> {
    let src = st.store().get_source(key).await?;
    let adapter = st
        .engine
        .adapters
        .sources
        .get(&src.kind)
        .cloned()
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "no adapter for source kind '{}' in this build",
                src.kind
            ))
        })?;
    let mut secrets = ferry_adapter::Secrets::default();
    st.engine
        .endpoint_credential(
            &mut secrets,
            src.credential_id,
            &format!("source '{}'", src.name),
            (
                ferry_adapter::SOURCE_USERNAME,
                ferry_adapter::SOURCE_PASSWORD,
            ),
        )
        .await
        .map_err(|e| ApiError::bad_request(e.message))?;
    Ok((src, adapter, secrets))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiscoverQuery {
    /// Move workloads of the same name that belong to another source to this one
    /// (without it such a discovery is refused and changes nothing).
    pub adopt: Option<bool>,
}

/// Asks the source which workloads it holds and brings them into the inventory: new ones
/// are added, known ones (same name, same source) get their disks, NICs and sizing
/// refreshed; addresses a powered-off VM no longer reports are kept.
#[utoipa::path(post, path = "/api/sources/{key}/discover", params(("key" = String, Path, description = "Name or id"), DiscoverQuery), responses((status = 200, body = Vec<Workload>)))]
async fn discover_source(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
    ApiQuery(q): ApiQuery<DiscoverQuery>,
) -> ApiResult<Json<Vec<Workload>>> {
    let (src, adapter, secrets) = source_session(&st, &key).await?;
    let found = adapter.discover(&src, &secrets).await.map_err(|e| {
        ApiError::bad_request(format!(
            "discovery on source '{}' failed: {}",
            src.name, e.message
        ))
    })?;
    // A workload is never moved between sources silently: one of another source's
    // names found here is refused (nothing changes) unless the caller adopts it.
    if q.adopt != Some(true) {
        let mut taken = vec![];
        for nw in &found {
            if let Ok(w) = st.store().get_workload(&nw.name).await {
                if let Some(other) = w.source_id.filter(|o| *o != src.id) {
                    let owner = match st.store().get_source(&other.to_string()).await {
                        Ok(o) => o.name,
                        Err(_) => other.to_string(),
                    };
                    taken.push(format!("'{}' (source '{owner}')", w.name));
                }
            }
        }
        if !taken.is_empty() {
            return Err(ApiError::conflict(format!(
                "source '{}' holds workloads already in the inventory from another source: {}; nothing was changed. Move them to '{}' with `ferry source discover {} --adopt`, or rename one of them",
                src.name,
                taken.join(", "),
                src.name,
                src.name
            )));
        }
    }
    let mut out = vec![];
    for nw in found {
        let w = match st.store().get_workload(&nw.name).await {
            Ok(mut w) => {
                w.source_id = Some(src.id);
                w.disks = nw.disks;
                w.nics = keep_known_addresses(nw.nics, &w.nics);
                w.os = nw.os.or(w.os);
                w.cpus = nw.cpus.or(w.cpus);
                w.memory_mib = nw.memory_mib.or(w.memory_mib);
                w.hardware = nw.hardware.or(w.hardware);
                st.store().update_workload(&w).await?
            }
            Err(ferry_store::StoreError::NotFound { .. }) => {
                st.store().insert_workload(&nw).await?
            }
            Err(e) => return Err(e.into()),
        };
        out.push(w);
    }
    Ok(Json(out))
}

/// The NICs discovery found, with the addresses recorded before for a NIC (same MAC, or
/// same name) that now reports none: a VM that is off, or whose agent does not answer,
/// keeps the address its cutover must move.
fn keep_known_addresses(found: Vec<Nic>, known: &[Nic]) -> Vec<Nic> {
    found
        .into_iter()
        .map(|mut n| {
            if n.ips.is_empty() {
                let before = known.iter().find(|k| match (&k.mac, &n.mac) {
                    (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                    _ => k.name == n.name,
                });
                if let Some(k) = before {
                    n.ips = k.ips.clone();
                }
            }
            n
        })
        .collect()
}

#[utoipa::path(delete, path = "/api/sources/{key}", params(("key" = String, Path, description = "Name or id")), responses((status = 204, description = "Deleted")))]
async fn delete_source(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let s = st.store().get_source(&key).await?;
    st.store().delete_source(s.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/targets", params(PageParams), responses((status = 200, body = TargetPage)))]
async fn list_targets(
    AxState(st): AxState<AppState>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<TargetPage>> {
    let page = p.page()?;
    Ok(Json(TargetPage::new(
        st.store().list_targets(page).await?,
        page,
    )))
}

#[utoipa::path(post, path = "/api/targets", request_body = NewTarget, responses((status = 201, body = Target)))]
async fn create_target(
    AxState(st): AxState<AppState>,
    ApiJson(t): ApiJson<NewTarget>,
) -> ApiResult<(StatusCode, Json<Target>)> {
    Ok((StatusCode::CREATED, Json(insert_target(&st, &t).await?)))
}

/// Checks a new target (the field at fault in the error's details) and stores it.
pub(crate) async fn insert_target(st: &AppState, t: &NewTarget) -> ApiResult<Target> {
    check_target(st, t).await?;
    Ok(st.store().insert_target(t).await?)
}

/// What a target must satisfy to be stored (new or edited).
pub(crate) async fn check_target(st: &AppState, t: &NewTarget) -> ApiResult<()> {
    validate_name(&t.name).map_err(|m| field_error("name", format!("name {m}")))?;
    if let Some(why) = st.engine.adapters.refuse_target_kind(t.kind) {
        return Err(field_error("kind", why));
    }
    check_config(&t.config)?;
    if t.kind == TargetKind::LocalDir && !t.config.get("path").is_some_and(|p| p.is_string()) {
        return Err(field_error(
            "path",
            "a local_dir target needs config.path: the directory to write instances into".into(),
        ));
    }
    check_credential(st, t.credential_id).await
}

#[utoipa::path(get, path = "/api/targets/{key}", params(("key" = String, Path, description = "Name or id")), responses((status = 200, body = Target)))]
async fn get_target(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<Json<Target>> {
    Ok(Json(st.store().get_target(&key).await?))
}

/// Changes a target's endpoint, credential or config.
#[utoipa::path(patch, path = "/api/targets/{key}", params(("key" = String, Path, description = "Name or id")), request_body = EndpointPatch, responses((status = 200, body = Target)))]
async fn patch_target(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
    ApiJson(p): ApiJson<TargetPatch>,
) -> ApiResult<Json<Target>> {
    let mut t = st.store().get_target(&key).await?;
    let (endpoint, credential_id, config) = patched(
        "target",
        &t.name,
        &t.endpoint,
        t.credential_id,
        &t.config,
        p,
    )?;
    // The patched target meets every rule a new one does.
    check_target(
        &st,
        &NewTarget {
            name: t.name.clone(),
            kind: t.kind,
            endpoint: endpoint.clone(),
            credential_id,
            config: config.clone(),
        },
    )
    .await?;
    (t.endpoint, t.credential_id, t.config) = (endpoint, credential_id, config);
    Ok(Json(st.store().update_target(&t).await?))
}

/// Changes a source's endpoint, credential or config.
#[utoipa::path(patch, path = "/api/sources/{key}", params(("key" = String, Path, description = "Name or id")), request_body = EndpointPatch, responses((status = 200, body = Source)))]
async fn patch_source(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
    ApiJson(p): ApiJson<SourcePatch>,
) -> ApiResult<Json<Source>> {
    let mut s = st.store().get_source(&key).await?;
    let (endpoint, credential_id, config) = patched(
        "source",
        &s.name,
        &s.endpoint,
        s.credential_id,
        &s.config,
        p,
    )?;
    check_source(
        &st,
        &NewSource {
            name: s.name.clone(),
            kind: s.kind,
            endpoint: endpoint.clone(),
            credential_id,
            config: config.clone(),
        },
    )
    .await?;
    (s.endpoint, s.credential_id, s.config) = (endpoint, credential_id, config);
    Ok(Json(st.store().update_source(&s).await?))
}

/// A source's or target's endpoint, credential and config with `p` applied. A changed
/// endpoint without a credential in the same patch is refused: the stored credential
/// was given for the old host.
fn patched(
    what: &str,
    name: &str,
    endpoint: &Option<String>,
    credential_id: Option<Uuid>,
    config: &serde_json::Value,
    p: EndpointPatch,
) -> ApiResult<(Option<String>, Option<Uuid>, serde_json::Value)> {
    let moved = p
        .endpoint
        .as_ref()
        .is_some_and(|e| Some(e) != endpoint.as_ref());
    if moved && credential_id.is_some() && p.credential_id.is_none() {
        return Err(field_error(
            "credential_id",
            format!(
                "changing the endpoint of {what} '{name}' from {} to {} needs its credential in the same change (credential_id): the stored one was given for the old host and is never sent to another unasked",
                endpoint.as_deref().unwrap_or("none"),
                p.endpoint.as_deref().unwrap_or("none"),
            ),
        ));
    }
    Ok((
        p.endpoint.or_else(|| endpoint.clone()),
        p.credential_id.or(credential_id),
        p.config.unwrap_or_else(|| config.clone()),
    ))
}

#[utoipa::path(delete, path = "/api/targets/{key}", params(("key" = String, Path, description = "Name or id")), responses((status = 204, description = "Deleted")))]
async fn delete_target(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let t = st.store().get_target(&key).await?;
    st.store().delete_target(t.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/workloads", params(WorkloadQuery), responses((status = 200, body = WorkloadPage)))]
async fn list_workloads(
    AxState(st): AxState<AppState>,
    ApiQuery(q): ApiQuery<WorkloadQuery>,
) -> ApiResult<Json<WorkloadPage>> {
    let page = PageParams {
        limit: q.limit,
        offset: q.offset,
    }
    .page()?;
    let mut f = WorkloadFilter {
        name_contains: q.name.clone(),
        tag: q.tag.clone(),
        ..Default::default()
    };
    if let Some(g) = &q.group {
        f.move_group_id = Some(st.store().get_group(g).await?.id);
    }
    if let Some(s) = &q.source {
        f.source_id = Some(st.store().get_source(s).await?.id);
    }
    Ok(Json(WorkloadPage::new(
        st.store().list_workloads(&f, page).await?,
        page,
    )))
}

#[utoipa::path(post, path = "/api/workloads", request_body = NewWorkload, responses((status = 201, body = Workload)))]
async fn create_workload(
    AxState(st): AxState<AppState>,
    ApiJson(w): ApiJson<NewWorkload>,
) -> ApiResult<(StatusCode, Json<Workload>)> {
    let errs = w.validate();
    if !errs.is_empty() {
        let msg = errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ApiError::bad_request(format!("invalid workload: {msg}"))
            .with_details(serde_json::json!({"fields": errs})));
    }
    if let Some(s) = w.source_id {
        st.store()
            .get_source(&s.to_string())
            .await
            .map_err(|_| ApiError::bad_request(format!("source {s} does not exist")))?;
    }
    if let Some(g) = w.move_group_id {
        st.store()
            .get_group(&g.to_string())
            .await
            .map_err(|_| ApiError::bad_request(format!("move group {g} does not exist")))?;
    }
    check_credential(&st, w.credential_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(st.store().insert_workload(&w).await?),
    ))
}

/// Changes a workload: its source, disks, move group and order, services, sizing, tags.
#[utoipa::path(patch, path = "/api/workloads/{key}", params(("key" = String, Path, description = "Name or id")), request_body = WorkloadPatch, responses((status = 200, body = Workload)))]
async fn patch_workload(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
    ApiJson(p): ApiJson<WorkloadPatch>,
) -> ApiResult<Json<Workload>> {
    let w = st.store().get_workload(&key).await?;
    let w = w.patched(&p).map_err(|errs| {
        let msg = errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        ApiError::bad_request(format!("invalid workload: {msg}"))
            .with_details(serde_json::json!({"fields": errs}))
    })?;
    if let Some(s) = p.source_id {
        st.store()
            .get_source(&s.to_string())
            .await
            .map_err(|_| ApiError::bad_request(format!("source {s} does not exist")))?;
    }
    if let Some(g) = p.move_group_id {
        st.store()
            .get_group(&g.to_string())
            .await
            .map_err(|_| ApiError::bad_request(format!("move group {g} does not exist")))?;
    }
    check_credential(&st, p.credential_id).await?;
    Ok(Json(st.store().update_workload(&w).await?))
}

#[utoipa::path(get, path = "/api/workloads/{key}", params(("key" = String, Path, description = "Name or id")), responses((status = 200, body = Workload)))]
async fn get_workload(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<Json<Workload>> {
    Ok(Json(st.store().get_workload(&key).await?))
}

/// Imports a CSV in RiverMeadow's columns. Valid rows are imported together; rows with
/// errors are reported by line and imported not at all.
#[utoipa::path(post, path = "/api/workloads/import", request_body(content = String, content_type = "text/csv"), responses((status = 200, body = ImportReport)))]
async fn import_workloads(
    AxState(st): AxState<AppState>,
    body: String,
) -> ApiResult<Json<ImportReport>> {
    import_csv(&st, &body).await.map(Json)
}

/// Imports an inventory CSV: the valid rows go in, each bad one is reported by line.
pub(crate) async fn import_csv(st: &AppState, body: &str) -> ApiResult<ImportReport> {
    if body.trim().is_empty() {
        return Err(ApiError::bad_request(
            "the CSV body is empty; send the file, starting with a header line naming the columns",
        ));
    }
    let (rows, mut errors) = csv_import::parse(body).map_err(|e| {
        ApiError::bad_request(format!("line {}: {}", e.line, e.message))
            .with_details(serde_json::json!({"errors": [e]}))
    })?;
    let names: Vec<String> = rows.iter().map(|r| r.workload.name.clone()).collect();
    let existing: std::collections::HashSet<String> = st
        .store()
        .workload_names_existing(&names)
        .await?
        .into_iter()
        .collect();
    let mut valid = vec![];
    for r in rows {
        if existing.contains(&r.workload.name) {
            errors.push(LineError {
                line: r.line,
                message: format!("workload '{}' is already in the inventory", r.workload.name),
            });
            continue;
        }
        let group_target_date = r.workload.target_migration_date.clone();
        valid.push(ImportRow {
            credential: r
                .credential
                .map(|(k, u, secret)| (k, u, st.secrets.seal(&secret))),
            workload: r.workload,
            move_group_name: r.move_group_name,
            group_target_date,
        });
    }
    errors.sort_by_key(|e| e.line);
    let created = if valid.is_empty() {
        vec![]
    } else {
        st.store().import_workloads(valid).await?
    };
    Ok(ImportReport {
        imported: created.len(),
        rejected: errors.len(),
        errors,
        workload_ids: created.iter().map(|w| w.id).collect(),
    })
}

#[utoipa::path(get, path = "/api/groups", params(PageParams), responses((status = 200, body = GroupPage)))]
async fn list_groups(
    AxState(st): AxState<AppState>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<GroupPage>> {
    let page = p.page()?;
    Ok(Json(GroupPage::new(
        st.store().list_groups(page).await?,
        page,
    )))
}

#[utoipa::path(post, path = "/api/groups", request_body = NewMoveGroup, responses((status = 201, body = MoveGroup)))]
async fn create_group(
    AxState(st): AxState<AppState>,
    ApiJson(g): ApiJson<NewMoveGroup>,
) -> ApiResult<(StatusCode, Json<MoveGroup>)> {
    validate_name(&g.name).map_err(|m| ApiError::bad_request(format!("name {m}")))?;
    if let Some(d) = &g.target_date {
        validate_date(d).map_err(|m| ApiError::bad_request(format!("target_date: {m}")))?;
    }
    if g.concurrency == 0 || g.concurrency > 1000 {
        return Err(ApiError::bad_request("concurrency must be 1-1000"));
    }
    Ok((
        StatusCode::CREATED,
        Json(st.store().insert_group(&g).await?),
    ))
}

#[utoipa::path(get, path = "/api/groups/{key}", params(("key" = String, Path, description = "Name or id")), responses((status = 200, body = MoveGroup)))]
async fn get_group(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<Json<MoveGroup>> {
    Ok(Json(st.store().get_group(&key).await?))
}

async fn all_group_workloads(st: &AppState, g: &MoveGroup) -> ApiResult<Vec<Workload>> {
    let f = WorkloadFilter {
        move_group_id: Some(g.id),
        ..Default::default()
    };
    let mut out = vec![];
    loop {
        let (page, total) = st
            .store()
            .list_workloads(
                &f,
                Page {
                    limit: 500,
                    offset: out.len() as i64,
                },
            )
            .await?;
        let n = page.len();
        out.extend(page);
        if n == 0 || out.len() as i64 >= total {
            return Ok(out);
        }
    }
}

/// Applies a profile to every member of the group (those without an active migration).
#[utoipa::path(post, path = "/api/groups/{key}/migrations", params(("key" = String, Path, description = "Name or id")), request_body = GroupMigrations, responses((status = 201, body = GroupMigrationsReport)))]
async fn group_migrations(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
    ApiJson(req): ApiJson<GroupMigrations>,
) -> ApiResult<(StatusCode, Json<GroupMigrationsReport>)> {
    let g = st.store().get_group(&key).await?;
    let profile = st.store().get_profile(&req.profile).await?;
    let mut report = GroupMigrationsReport {
        created: vec![],
        skipped: vec![],
    };
    for w in all_group_workloads(&st, &g).await? {
        match new_migration(&st, &w, &profile, req.start).await {
            Ok(m) => report.created.push(m),
            Err(e) => report.skipped.push(format!("{}: {}", w.name, e.message)),
        }
    }
    Ok((StatusCode::CREATED, Json(report)))
}

/// Cuts the group over: members in `synced` cut over by `group_order`, at most
/// `concurrency` at a time; a later order starts when the earlier ones finished.
#[utoipa::path(post, path = "/api/groups/{key}/cutover", params(("key" = String, Path, description = "Name or id")), responses((status = 202, body = MoveGroup)))]
async fn group_cutover(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<MoveGroup>)> {
    let g = st.store().get_group(&key).await?;
    st.store().set_group_cutover(g.id, true).await?;
    let mut ev = NewEvent::new(
        None,
        "group.cutover.requested",
        format!("cutover of move group {} requested", g.name),
    );
    ev.data = serde_json::json!({"move_group_id": g.id});
    st.store().insert_event(&ev).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(st.store().get_group(&key).await?),
    ))
}

/// A delta sync now for every member that can take one.
#[utoipa::path(post, path = "/api/groups/{key}/sync", params(("key" = String, Path, description = "Name or id")), responses((status = 202, body = GroupCommandReport)))]
async fn group_sync(
    AxState(st): AxState<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<GroupCommandReport>)> {
    let g = st.store().get_group(&key).await?;
    let f = MigrationFilter {
        move_group_id: Some(g.id),
        ..Default::default()
    };
    let mut applied = vec![];
    let mut skipped = vec![];
    let mut offset = 0;
    loop {
        let (page, total) = st
            .store()
            .list_migrations(&f, Page { limit: 500, offset })
            .await?;
        for m in page.iter().filter(|m| !m.state().is_terminal()) {
            match st
                .engine
                .command(m.id, Command::Sync, &format!("token '{}'", caller.0))
                .await
            {
                Ok(_) => applied.push(m.id),
                Err(e) => skipped.push(format!("{}: {}", m.workload_name, e.message)),
            }
        }
        offset += 500;
        if offset >= total {
            break;
        }
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(GroupCommandReport {
            move_group: g,
            applied,
            skipped,
        }),
    ))
}

#[utoipa::path(get, path = "/api/profiles", params(PageParams), responses((status = 200, body = ProfilePage)))]
async fn list_profiles(
    AxState(st): AxState<AppState>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<ProfilePage>> {
    let page = p.page()?;
    Ok(Json(ProfilePage::new(
        st.store().list_profiles(page).await?,
        page,
    )))
}

#[utoipa::path(post, path = "/api/profiles", request_body = ProfileSpec, responses((status = 201, body = Profile)))]
async fn create_profile(
    AxState(st): AxState<AppState>,
    ApiJson(spec): ApiJson<ProfileSpec>,
) -> ApiResult<(StatusCode, Json<Profile>)> {
    Ok((StatusCode::CREATED, Json(insert_profile(&st, &spec).await?)))
}

/// Validates a profile (each problem named by its field, in the error's details) and
/// stores it.
pub(crate) async fn insert_profile(st: &AppState, spec: &ProfileSpec) -> ApiResult<Profile> {
    check_profile(st, spec).await?;
    Ok(st.store().insert_profile(spec).await?)
}

/// What a profile must satisfy to be stored (new or edited).
pub(crate) async fn check_profile(st: &AppState, spec: &ProfileSpec) -> ApiResult<()> {
    let errs = spec.validate();
    if !errs.is_empty() {
        let msg = errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ApiError::bad_request(format!("invalid profile: {msg}"))
            .with_details(serde_json::json!({"fields": errs})));
    }
    st.store().get_target(&spec.target).await.map_err(|_| {
        ApiError::not_found(format!(
            "target: no target named '{}'; create it first (ferry target add)",
            spec.target
        ))
        .with_details(
            serde_json::json!({"fields": [{"field": "target", "message": "unknown target"}]}),
        )
    })?;
    Ok(())
}

#[utoipa::path(get, path = "/api/profiles/{key}", params(("key" = String, Path, description = "Name or id")), responses((status = 200, body = Profile)))]
async fn get_profile(
    AxState(st): AxState<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<Json<Profile>> {
    Ok(Json(st.store().get_profile(&key).await?))
}

pub(crate) async fn new_migration(
    st: &AppState,
    w: &Workload,
    p: &Profile,
    start: bool,
) -> ApiResult<Migration> {
    let target = st.store().get_target(&p.spec.target).await.map_err(|_| {
        ApiError::conflict(format!(
            "profile '{}' names target '{}', which no longer exists",
            p.spec.name, p.spec.target
        ))
    })?;
    // Records stored before a kind lost its adapter (or by another build) are refused
    // here, with the reason, rather than when a step reaches them.
    let refused = match w.source_id {
        Some(id) => {
            let s = st.store().get_source(&id.to_string()).await?;
            st.engine.adapters.refuse_source_kind(s.kind)
        }
        None => None,
    }
    .or_else(|| st.engine.adapters.refuse_target_kind(target.kind));
    if let Some(why) = refused {
        return Err(ApiError::conflict(format!(
            "cannot migrate '{}' with profile '{}': {why}",
            w.name, p.spec.name
        )));
    }
    let m = st
        .store()
        .insert_migration(
            w.id,
            p.id,
            target.id,
            Status::new(p.spec.uat.required),
            p.spec.schedule.clone(),
        )
        .await?;
    if start {
        return st.engine.command(m.id, Command::Start, "api").await;
    }
    Ok(m)
}

#[utoipa::path(get, path = "/api/migrations", params(MigrationQuery), responses((status = 200, body = MigrationPage)))]
async fn list_migrations(
    AxState(st): AxState<AppState>,
    ApiQuery(q): ApiQuery<MigrationQuery>,
) -> ApiResult<Json<MigrationPage>> {
    let page = PageParams {
        limit: q.limit,
        offset: q.offset,
    }
    .page()?;
    let mut f = MigrationFilter::default();
    if let Some(s) = &q.state {
        f.state = Some(State::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown state '{s}'; states are: {}",
                State::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?);
    }
    if let Some(w) = &q.workload {
        f.workload_id = Some(st.store().get_workload(w).await?.id);
    }
    if let Some(g) = &q.group {
        f.move_group_id = Some(st.store().get_group(g).await?.id);
    }
    Ok(Json(MigrationPage::new(
        st.store().list_migrations(&f, page).await?,
        page,
    )))
}

#[utoipa::path(post, path = "/api/migrations", request_body = NewMigration, responses((status = 201, body = Migration)))]
async fn create_migration(
    AxState(st): AxState<AppState>,
    ApiJson(req): ApiJson<NewMigration>,
) -> ApiResult<(StatusCode, Json<Migration>)> {
    let w = st.store().get_workload(&req.workload).await?;
    let p = st.store().get_profile(&req.profile).await?;
    Ok((
        StatusCode::CREATED,
        Json(new_migration(&st, &w, &p, req.start).await?),
    ))
}

#[utoipa::path(get, path = "/api/migrations/{id}", params(("id" = Uuid, Path, description = "Migration id")), responses((status = 200, body = MigrationDetail)))]
async fn get_migration(
    AxState(st): AxState<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<MigrationDetail>> {
    let id = parse_id(&id, "migration")?;
    let m = st.store().get_migration(id).await?;
    let syncs = st.store().list_syncs(id).await?;
    let downtime = st
        .store()
        .latest_event(id, crate::engine::DOWNTIME_EVENT)
        .await?
        .and_then(|e| serde_json::from_value(e.data).ok());
    Ok(Json(MigrationDetail {
        downtime,
        allowed_commands: allowed_commands(&m.status),
        running_step: m.status.running_step(),
        migration: m,
        syncs,
    }))
}

/// Sends a command: `start`, `preflight`, `sync`, `uat_start`, `uat_stop`, `uat_pass`,
/// `uat_fail`, `cutover`, `rollback`, `retry`, `cancel`. Refused with 409 and the allowed
/// commands when the current state does not accept it.
#[utoipa::path(post, path = "/api/migrations/{id}/commands", params(("id" = Uuid, Path, description = "Migration id")), request_body = CommandRequest, responses((status = 202, body = Migration)))]
async fn migration_command(
    AxState(st): AxState<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CommandRequest>,
) -> ApiResult<(StatusCode, Json<Migration>)> {
    let id = parse_id(&id, "migration")?;
    let actor = format!("token '{}'", caller.0);
    Ok((
        StatusCode::ACCEPTED,
        Json(st.engine.command(id, req.command, &actor).await?),
    ))
}

#[utoipa::path(put, path = "/api/migrations/{id}/schedule", params(("id" = Uuid, Path, description = "Migration id")), request_body = DeltaSchedule, responses((status = 200, body = Migration)))]
async fn migration_schedule(
    AxState(st): AxState<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(s): ApiJson<DeltaSchedule>,
) -> ApiResult<Json<Migration>> {
    let id = parse_id(&id, "migration")?;
    Ok(Json(st.engine.set_schedule(id, s).await?))
}

#[utoipa::path(get, path = "/api/migrations/{id}/events", params(("id" = Uuid, Path, description = "Migration id"), CursorQuery), responses((status = 200, body = Vec<Event>)))]
async fn migration_events(
    AxState(st): AxState<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<CursorQuery>,
) -> ApiResult<Json<Vec<Event>>> {
    let id = parse_id(&id, "migration")?;
    let (after, limit, _) = q.parts()?;
    st.store().get_migration(id).await?;
    Ok(Json(st.store().list_events(Some(id), after, limit).await?))
}

#[utoipa::path(get, path = "/api/migrations/{id}/logs", params(("id" = Uuid, Path, description = "Migration id"), CursorQuery), responses((status = 200, body = Vec<LogLine>)))]
async fn migration_logs(
    AxState(st): AxState<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<CursorQuery>,
) -> ApiResult<Json<Vec<LogLine>>> {
    let id = parse_id(&id, "migration")?;
    let (after, limit, _) = q.parts()?;
    st.store().get_migration(id).await?;
    Ok(Json(st.store().list_logs(id, after, limit).await?))
}

#[utoipa::path(get, path = "/api/migrations/{id}/jobs", params(("id" = Uuid, Path, description = "Migration id")), responses((status = 200, body = Vec<JobInfo>)))]
async fn migration_jobs(
    AxState(st): AxState<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Vec<JobInfo>>> {
    let id = parse_id(&id, "migration")?;
    st.store().get_migration(id).await?;
    let jobs = st.store().list_jobs(id).await?;
    Ok(Json(
        jobs.into_iter()
            .map(|j| JobInfo {
                id: j.id,
                step: j.step,
                status: serde_json::to_value(j.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                attempts: j.attempts,
                max_attempts: j.max_attempts,
                run_at: j.run_at,
                lease_owner: j.lease_owner,
                last_error: j.last_error,
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/events", params(CursorQuery), responses((status = 200, body = Vec<Event>)))]
async fn list_events(
    AxState(st): AxState<AppState>,
    ApiQuery(q): ApiQuery<CursorQuery>,
) -> ApiResult<Json<Vec<Event>>> {
    let (after, limit, mid) = q.parts()?;
    Ok(Json(st.store().list_events(mid, after, limit).await?))
}

/// Server-sent events: every new event as `data: {Event JSON}` with `id:` the event id.
/// Resume with `after` (or the `Last-Event-ID` header).
#[utoipa::path(get, path = "/api/events/stream", params(CursorQuery), responses((status = 200, description = "text/event-stream of Event objects", content_type = "text/event-stream", body = String)))]
async fn event_stream(
    AxState(st): AxState<AppState>,
    headers: axum::http::HeaderMap,
    ApiQuery(q): ApiQuery<CursorQuery>,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>>>> {
    let (mut after, _, mid) = q.parts()?;
    if let Some(last) = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
    {
        after = after.max(last);
    }
    let store = st.store().clone();
    let stream = futures::stream::unfold(
        (store, after, std::collections::VecDeque::<Event>::new()),
        move |(store, mut after, mut buf)| async move {
            loop {
                if let Some(e) = buf.pop_front() {
                    let ev = SseEvent::default()
                        .id(e.id.to_string())
                        .event(e.kind.clone())
                        .data(serde_json::to_string(&e).unwrap_or_default());
                    return Some((Ok(ev), (store, after, buf)));
                }
                match store.list_events(mid, after, 200).await {
                    Ok(list) if !list.is_empty() => {
                        after = list.last().map(|e| e.id).unwrap_or(after);
                        buf.extend(list);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, mac: Option<&str>, ips: &[&str]) -> Nic {
        Nic {
            name: name.into(),
            network: None,
            mac: mac.map(str::to_string),
            ips: ips.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn rediscovery_keeps_addresses_a_powered_off_vm_no_longer_reports() {
        let known = vec![
            nic("eth0", Some("52:54:00:AA:00:01"), &["10.0.0.5"]),
            nic("eth1", None, &["10.1.0.5"]),
        ];
        let found = vec![
            nic("Network adapter 1", Some("52:54:00:aa:00:01"), &[]),
            nic("eth1", None, &[]),
            nic("eth2", Some("52:54:00:aa:00:03"), &["10.2.0.9"]),
        ];
        let merged = keep_known_addresses(found, &known);
        assert_eq!(merged[0].ips, vec!["10.0.0.5"]);
        assert_eq!(merged[1].ips, vec!["10.1.0.5"]);
        assert_eq!(merged[2].ips, vec!["10.2.0.9"]);
        // A NIC that reports addresses has its own, not the old ones.
        let moved = keep_known_addresses(
            vec![nic("eth0", Some("52:54:00:aa:00:01"), &["10.9.9.9"])],
            &known,
        );
        assert_eq!(moved[0].ips, vec!["10.9.9.9"]);
    }
}
