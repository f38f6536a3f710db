//! The migration dashboard, served by the appliance itself: server-rendered pages (every
//! page is whole and true on a plain reload) with a little JavaScript that refreshes the
//! page's content when the event stream says something changed. No external asset: the
//! style and the script are compiled in, so it works in an isolated network.
//!
//! Same authentication as the API: the login form takes an API token and keeps it in an
//! HttpOnly, SameSite=Strict cookie; forms post only to `/ui/…` routes of this origin.

mod pages;
mod view;

use axum::extract::{Request, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::{caller_for_token, AppState, Caller};

/// The cookie holding the API token of a dashboard session.
const COOKIE: &str = "ferry_token";

/// The token in a request's session cookie.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

pub fn routes(state: AppState) -> Router<AppState> {
    let private = Router::new()
        .route("/ui/", get(pages::overview))
        .route("/ui/groups/{key}", get(pages::group))
        .route("/ui/groups/{key}/action", post(pages::group_action))
        .route("/ui/migrations/{id}", get(pages::migration))
        .route("/ui/migrations/{id}/action", post(pages::migration_action))
        .route("/ui/workloads", get(pages::workloads))
        .route("/ui/migrations", post(pages::start_migration))
        .route(
            "/ui/profiles",
            get(pages::profiles).post(pages::create_profile),
        )
        .route(
            "/ui/profiles/{key}/edit",
            get(pages::edit_profile_form).post(pages::edit_profile),
        )
        .route(
            "/ui/sources/{key}/edit",
            get(pages::edit_source_form).post(pages::edit_source),
        )
        .route(
            "/ui/targets/{key}/edit",
            get(pages::edit_target_form).post(pages::edit_target),
        )
        .route("/ui/import", get(pages::import_form).post(pages::import))
        .route(
            "/ui/sources",
            get(pages::sources).post(pages::create_source),
        )
        .route(
            "/ui/targets",
            get(pages::targets).post(pages::create_target),
        )
        .route("/ui/stream", get(stream))
        .route("/ui/logout", post(logout))
        .layer(axum::middleware::from_fn_with_state(state, require_session));
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/static/app.css", get(css))
        .route("/ui/static/app.js", get(js))
        .merge(private)
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("app.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("app.js"),
    )
        .into_response()
}

/// Pages need a valid session; without one, the login form (then back here).
async fn require_session(AxState(st): AxState<AppState>, mut req: Request, next: Next) -> Response {
    let Some(token) = session_token(req.headers()) else {
        return Redirect::to("/ui/login").into_response();
    };
    match caller_for_token(&st, &token).await {
        Ok(name) => {
            req.extensions_mut().insert(Caller(name));
            next.run(req).await
        }
        Err(_) => Redirect::to("/ui/login?expired=1").into_response(),
    }
}

#[derive(serde::Deserialize, Default)]
struct LoginQuery {
    expired: Option<String>,
}

async fn login_form(q: axum::extract::Query<LoginQuery>) -> Response {
    let msg = q
        .expired
        .as_ref()
        .map(|_| "That token is no longer valid: log in again.");
    view::html(view::login(msg))
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(AxState(st): AxState<AppState>, axum::Form(f): axum::Form<LoginForm>) -> Response {
    let token = f.token.trim();
    if token.is_empty() {
        return (
            StatusCode::UNAUTHORIZED,
            view::html(view::login(Some("Enter an API token (the admin token is in the appliance's data directory, file admin-token)."))),
        )
            .into_response();
    }
    match caller_for_token(&st, token).await {
        Ok(_) => (
            [(
                header::SET_COOKIE,
                format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"),
            )],
            Redirect::to("/ui/"),
        )
            .into_response(),
        Err(_) => (
            StatusCode::UNAUTHORIZED,
            view::html(view::login(Some(
                "Unknown token: check it, or create one with `ferry token create`.",
            ))),
        )
            .into_response(),
    }
}

async fn logout() -> Response {
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/ui/login"),
    )
        .into_response()
}

/// Server-sent events for the dashboard: one unnamed event per appliance event from now
/// on (its kind as the data), so the page knows to refresh whatever happened.
async fn stream(
    AxState(st): AxState<AppState>,
) -> Result<
    axum::response::sse::Sse<
        impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    Response,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let store = st.store().clone();
    let after = store
        .last_event_id()
        .await
        .map_err(|e| crate::error::ApiError::from(e).into_response())?;
    let s = futures::stream::unfold((store, after), |(store, mut after)| async move {
        loop {
            match store.list_events(None, after, 200).await {
                Ok(list) if !list.is_empty() => {
                    after = list.last().map(|e| e.id).unwrap_or(after);
                    let kinds: Vec<&str> = list.iter().map(|e| e.kind.as_str()).collect();
                    let ev = Event::default().id(after.to_string()).data(kinds.join(" "));
                    return Some((Ok(ev), (store, after)));
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(300)).await,
            }
        }
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::default()))
}
