//! The admin listener: every request carries `Authorization: Bearer <admin
//! token>`, compared in constant time, or is answered 401.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::net::Peer;
use super::oauth::{OAuthError, json, read_body};
use super::{App, form, policies};
use refresh_guard::{
    AuthorizeRequest, Decision, Error, Jkt, LoadErrors, OAuthError as OAuthCode, PolicyVersion,
    ProfileReport, ReloadError,
};

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/admin/v1/authorizations", post(authorize))
        .route("/admin/v1/subjects/{subject}/revoke", post(revoke_subject))
        .route("/admin/v1/policies/reload", post(reload))
        .route(
            "/admin/v1/policies/shadow",
            post(shadow_set).get(shadow_report).delete(shadow_drop),
        )
        .route("/admin/v1/policies/promote", post(promote))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(super::oauth::not_found)
        .layer(middleware::from_fn_with_state(app.clone(), require_admin))
        .with_state(app)
}

/// `/healthz` on the admin listener: with the store's own error.
async fn healthz(State(app): State<Arc<App>>) -> Response {
    super::oauth::health(&app, true).await
}

async fn require_admin(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && app.admin.matches(token.trim())
        });
    if ok {
        return next.run(req).await;
    }
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the admin API needs Authorization: Bearer <admin token>",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"refresh-guard-admin\""),
    );
    // An unauthenticated client keeps no admin connection: kept alive, it
    // would hold one of the listener's few slots (README "Connections").
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = serde_json::json!({"error": error, "error_description": description});
    json(status, body.to_string(), true)
}

fn engine_error(app: &App, what: &str, e: &Error) -> Response {
    match e {
        Error::InvalidArgument { .. } => error(
            StatusCode::BAD_REQUEST,
            OAuthCode::InvalidRequest.as_str(),
            &e.to_string(),
        ),
        _ => {
            app.engine_failed(what, e);
            if app.is_unavailable(e) {
                // As at the token endpoint: nothing changed, retry.
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    OAuthCode::TemporarilyUnavailable.as_str(),
                    "the shared store is unavailable; retry shortly",
                );
                r.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    super::oauth::RETRY_AFTER_SECS.into(),
                );
                return r;
            }
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                OAuthCode::ServerError.as_str(),
                "the server could not complete the request",
            )
        }
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    app: &App,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, Response> {
    let bytes = read_body(app, headers, body).await.map_err(|e| {
        let OAuthError {
            status,
            error: code,
            description,
            ..
        } = e;
        error(status, code.as_str(), &description)
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            OAuthCode::InvalidRequest.as_str(),
            &e.to_string(),
        )
    })
}

/// `POST /admin/v1/authorizations`: the embedding server's login and
/// consent happened; mint the code.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeBody {
    client_id: String,
    subject: String,
    #[serde(default)]
    scope: String,
    redirect_uri: String,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    /// The user agent's address, if the caller knows it; else the caller's.
    ip: Option<IpAddr>,
    /// The thumbprint of the client's DPoP key, from the authorization
    /// request (RFC 9449 §10): the code's exchange needs a proof from it.
    dpop_jkt: Option<String>,
}

async fn authorize(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let b: AuthorizeBody = match read_json(&app, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let dpop_jkt = match b.dpop_jkt.as_deref().map(Jkt::from_base64url).transpose() {
        Ok(j) => j,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                OAuthCode::InvalidRequest.as_str(),
                &format!("dpop_jkt: {e}"),
            );
        }
    };
    let ip = b.ip.or_else(|| app.client_ip(peer.0, &headers));
    let engine = app.engine.clone();
    let client = b.client_id.clone();
    let result = tokio::task::spawn_blocking(move || {
        let decision = engine.authorize(&AuthorizeRequest {
            client: &b.client_id,
            subject: &b.subject,
            scope: &b.scope,
            redirect_uri: &b.redirect_uri,
            code_challenge: b.code_challenge.as_deref(),
            code_challenge_method: b.code_challenge_method.as_deref(),
            ip,
            dpop_jkt,
        })?;
        let ttl = engine.policies().policy(&b.client_id).code_ttl();
        Ok::<_, Error>((decision, ttl))
    })
    .await;
    match result {
        Ok(Ok((decision, ttl))) => {
            app.metrics.decision(&client, &decision);
            match decision {
                Decision::Accept(a) => {
                    let body = serde_json::json!({
                        "code": a.token.as_str(),
                        "expires_in": ttl.as_secs().max(1),
                    });
                    json(StatusCode::CREATED, body.to_string(), true)
                }
                Decision::Deny(d) => error(
                    StatusCode::BAD_REQUEST,
                    d.reason.oauth_error().as_str(),
                    d.reason.description(),
                ),
            }
        }
        Ok(Err(e)) => engine_error(&app, "authorization", &e),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            OAuthCode::ServerError.as_str(),
            "task failed",
        ),
    }
}

async fn revoke_subject(
    State(app): State<Arc<App>>,
    Path(subject): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    let client = match form::parse(query.as_bytes()) {
        Ok(f) => f.get("client_id").map(str::to_owned),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                OAuthCode::InvalidRequest.as_str(),
                &e.to_string(),
            );
        }
    };
    let engine = app.engine.clone();
    let result =
        tokio::task::spawn_blocking(move || engine.revoke_subject(&subject, client.as_deref()))
            .await;
    match result {
        Ok(Ok(n)) => json(
            StatusCode::OK,
            serde_json::json!({ "revoked": n }).to_string(),
            true,
        ),
        Ok(Err(e)) => engine_error(&app, "subject revocation", &e),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            OAuthCode::ServerError.as_str(),
            "task failed",
        ),
    }
}

/// 422 for a directory that does not load: each problem as data (file,
/// line, column, key, message; README "Server"), so that a deploy tool can
/// point at the place without parsing a rendered line.
fn policy_errors(errors: &LoadErrors) -> Response {
    let errors: Vec<serde_json::Value> = errors
        .errors()
        .iter()
        .map(|e| {
            serde_json::json!({
                "file": e.path.display().to_string(),
                "line": e.position.map(|p| p.line),
                "column": e.position.map(|p| p.column),
                "key": e.key,
                "message": e.message,
            })
        })
        .collect();
    json(
        StatusCode::UNPROCESSABLE_ENTITY,
        serde_json::json!({
            "error": "invalid_policy_set",
            "error_description": "the policy directory does not load; the set in force is unchanged",
            "errors": errors,
        })
        .to_string(),
        true,
    )
}

/// 422 for a set that loads but breaks a profile the server requires: the
/// report of each profile not met, in the JSON form README "Compliance
/// profiles" documents.
fn profile_not_met(version: PolicyVersion, reports: &[ProfileReport]) -> Response {
    let names: Vec<&str> = reports.iter().map(|r| r.profile).collect();
    json(
        StatusCode::UNPROCESSABLE_ENTITY,
        serde_json::json!({
            "error": "profile_not_met",
            "error_description": format!(
                "policy version {version} does not meet the required profile(s) {}; \
                 the set in force is unchanged",
                names.join(", ")
            ),
            "version": version.to_string(),
            "reports": reports,
        })
        .to_string(),
        true,
    )
}

fn refused(e: &ReloadError) -> Response {
    match e {
        ReloadError::Load(errors) => policy_errors(errors),
        ReloadError::ProfileNotMet { version, reports } => profile_not_met(*version, reports),
        _ => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_policy_set",
            &e.to_string(),
        ),
    }
}

fn version(v: PolicyVersion) -> Response {
    json(
        StatusCode::OK,
        serde_json::json!({ "version": v.to_string() }).to_string(),
        true,
    )
}

async fn reload(State(app): State<Arc<App>>) -> Response {
    let a = app.clone();
    match tokio::task::spawn_blocking(move || a.reload_policies()).await {
        Ok(Ok(v)) => version(v),
        Ok(Err(e)) => refused(&e),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            OAuthCode::ServerError.as_str(),
            "task failed",
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowBody {
    dir: PathBuf,
}

async fn shadow_set(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let b: ShadowBody = match read_json(&app, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let dir = b.dir;
    let a = app.clone();
    // A candidate that breaks a required profile is refused here, as a
    // reload of it would be: promoting it is the only way it goes in force.
    let loaded = tokio::task::spawn_blocking(move || {
        let set = policies::load_dir(&dir).map_err(ReloadError::Load)?;
        let reports = policies::unmet(&set, a.required_profiles());
        match reports.is_empty() {
            true => Ok(set),
            false => Err(ReloadError::ProfileNotMet {
                version: set.version(),
                reports,
            }),
        }
    })
    .await;
    match loaded {
        Ok(Ok(set)) => {
            let v = app.engine.set_shadow(set);
            tracing::info!(candidate = %v, "shadow evaluation started");
            version(v)
        }
        Ok(Err(e)) => refused(&e),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            OAuthCode::ServerError.as_str(),
            "task failed",
        ),
    }
}

fn no_shadow() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no_shadow",
        "no candidate policy set is under shadow evaluation",
    )
}

async fn shadow_report(State(app): State<Arc<App>>) -> Response {
    let Some(report) = app.engine.shadow_report() else {
        return no_shadow();
    };
    let mut clients = serde_json::Map::new();
    let mut changed = 0u64;
    for row in &report.rows {
        if row.active != row.candidate {
            changed += row.count;
        }
        let entry = clients
            .entry(row.client.to_string())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(v) = entry {
            v.push(serde_json::json!({
                "active": row.active,
                "candidate": row.candidate,
                "count": row.count,
            }));
        }
    }
    let body = serde_json::json!({
        "active": report.active.to_string(),
        "candidate": report.candidate.to_string(),
        "since_ms": report.since.as_millis(),
        "changed": changed,
        "clients": clients,
    });
    json(StatusCode::OK, body.to_string(), true)
}

async fn promote(State(app): State<Arc<App>>) -> Response {
    match app.engine.promote_shadow() {
        Some(v) => {
            tracing::info!(version = %v, "shadow candidate promoted");
            version(v)
        }
        None => no_shadow(),
    }
}

async fn shadow_drop(State(app): State<Arc<App>>) -> Response {
    if app.engine.drop_shadow() {
        tracing::info!("shadow candidate dropped");
        StatusCode::NO_CONTENT.into_response()
    } else {
        no_shadow()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(&app.engine, &app.profiles);
    let mut r = (StatusCode::OK, text).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(super::metrics::CONTENT_TYPE),
    );
    r
}
