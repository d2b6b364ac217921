//! The public listener: token, revocation and introspection endpoints,
//! metadata, JWKS, health. Errors follow RFC 6749 §5.2 exactly; nothing a
//! client sends (codes, tokens, secrets) is ever echoed or logged.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http_body_util::BodyExt as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::dpop::{DpopAlg, ProofError, ProofRequest};
use super::form::{self, Form};
use super::jwt::{AccessClaims, Confirmation};
use super::net::Peer;
use super::{App, MAX_BODY};
use refresh_guard::limits::MAX_CLIENT_ID_LEN;
use refresh_guard::{
    Accepted, AccessTokenFormat, Decision, ExchangeRequest, Generation, Jkt, OAuthError as Code,
    Pkce, PolicySet, RedeemRequest, UnknownClients,
};

/// `Retry-After` of a 503 for a shared store that did not answer: the
/// store probes Redis every 100 ms and reconnects by itself, so a second
/// is enough for a blip, and an outage answers again as cheaply.
pub(crate) const RETRY_AFTER_SECS: u32 = 1;

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/oauth2/token", post(token))
        .route("/oauth2/revoke", post(revoke))
        .route("/oauth2/introspect", post(introspect))
        .route("/.well-known/oauth-authorization-server", get(metadata_doc))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(app)
}

/// The RFC 8414 metadata document for `issuer` under the policy set `set`.
///
/// `authorization_endpoint` is the embedding system's login page (the
/// server hosts none): RFC 8414 §2 requires the field whenever a response
/// type is supported, so a document without it is incomplete (README
/// "Server"). `code_challenge_methods_supported` lists what the set accepts
/// at authorization: S256 always, `plain` when a client it governs has
/// `pkce = s256_or_plain` or `optional` (README "Policy knobs").
/// `dpop_signing_alg_values_supported` lists the proof algorithms accepted
/// (RFC 9449 §5.1).
pub(crate) fn metadata(
    issuer: &str,
    authorization_endpoint: Option<&str>,
    dpop_algs: &[DpopAlg],
    set: &PolicySet,
) -> serde_json::Value {
    let mut doc = serde_json::json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}/oauth2/token"),
        "revocation_endpoint": format!("{issuer}/oauth2/revoke"),
        "introspection_endpoint": format!("{issuer}/oauth2/introspect"),
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": code_challenge_methods(set),
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "bearer"],
        "dpop_signing_alg_values_supported": dpop_algs.iter().map(|a| a.name()).collect::<Vec<_>>(),
    });
    if let Some(url) = authorization_endpoint {
        doc["authorization_endpoint"] = url.into();
    }
    doc
}

/// The PKCE methods (RFC 7636 §4.2) some client of `set` may use: every
/// `pkce` mode takes S256; `s256_or_plain` and `optional` also take
/// `plain`. `[defaults]` counts only when it governs unlisted clients.
fn code_challenge_methods(set: &PolicySet) -> Vec<&'static str> {
    let defaults = (set.unknown_clients() == UnknownClients::Defaults).then(|| set.defaults());
    let plain = defaults
        .into_iter()
        .chain(set.clients().into_iter().map(|(_, p)| p))
        .any(|p| p.pkce() != Pkce::S256);
    if plain {
        vec!["S256", "plain"]
    } else {
        vec!["S256"]
    }
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, body: String, no_store: bool) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if no_store {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    }
    r
}

/// An OAuth error response (RFC 6749 §5.2).
/// The code is the library's [`refresh_guard::OAuthError`], shared with
/// the engine's denials.
pub(crate) struct OAuthError {
    pub(crate) status: StatusCode,
    pub(crate) error: Code,
    pub(crate) description: Cow<'static, str>,
    /// Answer with `WWW-Authenticate: Basic` (RFC 6749 §5.2: the client
    /// tried HTTP Basic).
    pub(crate) basic: bool,
    /// A `DPoP-Nonce` to send (RFC 9449 §8).
    pub(crate) dpop_nonce: Option<String>,
    /// Seconds for `Retry-After` (RFC 9110 §10.2.3).
    pub(crate) retry_after: Option<u32>,
}

impl OAuthError {
    pub(crate) fn new(
        status: StatusCode,
        error: Code,
        description: impl Into<Cow<'static, str>>,
    ) -> OAuthError {
        OAuthError {
            status,
            error,
            description: description.into(),
            basic: false,
            dpop_nonce: None,
            retry_after: None,
        }
    }

    /// 503 `temporarily_unavailable` with `Retry-After`: the shared store
    /// did not answer, nothing changed, and the same request may be sent
    /// again (the store reconnects by itself; README "Several instances of
    /// the server").
    pub(crate) fn unavailable(description: impl Into<Cow<'static, str>>) -> OAuthError {
        OAuthError {
            retry_after: Some(RETRY_AFTER_SECS),
            ..OAuthError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::TemporarilyUnavailable,
                description,
            )
        }
    }

    /// The answer to an engine error: 503 when the shared store did not
    /// answer, else 500 (and the failure is noted).
    pub(crate) fn engine(app: &App, what: &str, e: &refresh_guard::Error) -> OAuthError {
        app.engine_failed(what, e);
        if app.is_unavailable(e) {
            OAuthError::unavailable("the shared store is unavailable; retry shortly")
        } else {
            OAuthError::server()
        }
    }

    pub(crate) fn request(description: impl Into<Cow<'static, str>>) -> OAuthError {
        OAuthError::new(StatusCode::BAD_REQUEST, Code::InvalidRequest, description)
    }

    fn client(description: &'static str, basic: bool) -> OAuthError {
        OAuthError {
            basic,
            ..OAuthError::new(StatusCode::UNAUTHORIZED, Code::InvalidClient, description)
        }
    }

    pub(crate) fn server() -> OAuthError {
        OAuthError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::ServerError,
            "the server could not complete the request",
        )
    }

    fn missing(name: &'static str) -> OAuthError {
        OAuthError::request(format!("missing parameter: {name}"))
    }

    pub(crate) fn respond(self, app: &App, endpoint: &'static str) -> Response {
        app.metrics.error(endpoint, self.error.as_str());
        let body = serde_json::json!({
            "error": self.error.as_str(),
            "error_description": self.description,
        });
        let mut r = json(self.status, body.to_string(), true);
        if self.basic {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"refresh-guard\", charset=\"UTF-8\""),
            );
        }
        if let Some(n) = self.dpop_nonce {
            set_dpop_nonce(&mut r, n);
        }
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }

    /// The answer to a refused proof: `use_dpop_nonce` for a missing or
    /// stale nonce (RFC 9449 §8), 503 when the replay cache is full (the
    /// server's state, not the proof's fault), else `invalid_dpop_proof`
    /// naming the check (RFC 9449 §5).
    fn proof(e: ProofError) -> OAuthError {
        match e {
            ProofError::Nonce { .. } => {
                OAuthError::new(StatusCode::BAD_REQUEST, Code::UseDpopNonce, e.to_string())
            }
            ProofError::ReplayCacheFull => OAuthError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::ServerError,
                e.to_string(),
            ),
            ProofError::ReplayUnavailable => OAuthError::unavailable(e.to_string()),
            _ => OAuthError::new(
                StatusCode::BAD_REQUEST,
                Code::InvalidDpopProof,
                e.to_string(),
            ),
        }
    }
}

/// Read a request body of at most [`MAX_BODY`] bytes within the body
/// timeout: 413 if longer, 408 if too slow.
pub(crate) async fn read_body(
    app: &App,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, OAuthError> {
    let too_large = || {
        OAuthError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::InvalidRequest,
            "request body is larger than 16 KiB",
        )
    };
    if let Some(len) = headers.get(header::CONTENT_LENGTH)
        && len
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_none_or(|n| n > MAX_BODY as u64)
    {
        return Err(too_large());
    }
    let read = async {
        let mut body = body;
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| OAuthError::request("the request body could not be read"))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > MAX_BODY {
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    match tokio::time::timeout(app.body_timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(OAuthError::new(
            StatusCode::REQUEST_TIMEOUT,
            Code::InvalidRequest,
            "the request body was not received in time",
        )),
    }
}

/// Read and parse a form body, requiring the form content type.
async fn read_form(app: &App, headers: &HeaderMap, body: Body) -> Result<Bytes, OAuthError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(OAuthError::request(
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    read_body(app, headers, body).await
}

fn parse_form(bytes: &Bytes) -> Result<Form<'_>, OAuthError> {
    form::parse(bytes).map_err(|e| OAuthError::request(e.to_string()))
}

/// An authenticated (or, for a public client, identified) client.
pub(crate) struct Client {
    pub(crate) id: String,
    /// Authenticated with a secret.
    pub(crate) confidential: bool,
}

/// A parsed `Authorization: Basic` credential (RFC 6749 §2.3.1: both parts
/// form-urlencoded before base64).
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let v = value.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(rest.trim()).ok()?;
    let text = std::str::from_utf8(&decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((
        form::decode_component(id).ok()?,
        form::decode_component(secret).ok()?,
    ))
}

fn is_scheme(value: &HeaderValue, scheme: &str) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(s, _)| s.eq_ignore_ascii_case(scheme))
}

/// Authenticate the client per its policy: `client_secret_sha256` set means
/// confidential (Basic or post, one method only), unset means public
/// (identified by `client_id`, no secret).
pub(crate) fn authenticate(
    app: &App,
    headers: &HeaderMap,
    form: &Form<'_>,
) -> Result<Client, OAuthError> {
    let basic = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(v) if is_scheme(v, "basic") => match basic_credentials(v) {
            Some(c) => Some(c),
            None => {
                return Err(OAuthError::client(
                    "malformed HTTP Basic client credentials",
                    true,
                ));
            }
        },
        Some(_) => {
            return Err(OAuthError::client(
                "unsupported client authentication method",
                false,
            ));
        }
    };
    let via_basic = basic.is_some();
    let (id, secret) = match basic {
        Some((id, secret)) => {
            if form.get("client_secret").is_some() {
                return Err(OAuthError::request(
                    "use one client authentication method, not both Basic and client_secret",
                ));
            }
            if form.get("client_id").is_some_and(|c| c != id) {
                return Err(OAuthError::request(
                    "client_id does not match the Authorization header",
                ));
            }
            (id, (!secret.is_empty()).then_some(secret))
        }
        None => match form.get("client_id") {
            Some(id) => (id.to_owned(), form.get("client_secret").map(str::to_owned)),
            None => return Err(OAuthError::missing("client_id")),
        },
    };
    if id.is_empty() || id.len() > MAX_CLIENT_ID_LEN {
        return Err(OAuthError::client("unknown client", via_basic));
    }
    let policies = app.engine.policies();
    // A client the set refuses (`unknown_clients = "refuse"`) that tried to
    // authenticate with the Authorization header is answered 401 with the
    // scheme, as RFC 6749 §5.2 requires of any failed Basic authentication;
    // without the header the engine's `unknown_client` denial (400
    // `invalid_client`) answers, since a 401 must name a scheme
    // (RFC 9110 §15.5.2).
    if via_basic && !policies.admits_client(&id) {
        return Err(OAuthError::client(
            "client is not registered with this server",
            true,
        ));
    }
    let expected = policies.policy(&id).client_secret_sha256().copied();
    match (expected, secret) {
        (Some(hash), Some(secret)) => {
            let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
            if bool::from(presented.ct_eq(&hash)) {
                Ok(Client {
                    id,
                    confidential: true,
                })
            } else {
                Err(OAuthError::client(
                    "client authentication failed",
                    via_basic,
                ))
            }
        }
        (Some(_), None) => Err(OAuthError::client(
            "client authentication required",
            via_basic,
        )),
        (None, None) => Ok(Client {
            id,
            confidential: false,
        }),
        (None, Some(_)) => Err(OAuthError::client(
            "client authentication failed",
            via_basic,
        )),
    }
}

/// Send `nonce` in `DPoP-Nonce` and let browser clients read it (RFC 9449
/// §8; a cross-origin fetch sees only exposed headers).
fn set_dpop_nonce(r: &mut Response, nonce: String) {
    if let Ok(v) = HeaderValue::from_str(&nonce) {
        let h = r.headers_mut();
        h.insert("dpop-nonce", v);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("DPoP-Nonce"),
        );
    }
}

fn required<'f>(form: &'f Form<'_>, name: &'static str) -> Result<&'f str, OAuthError> {
    form.get(name).ok_or_else(|| OAuthError::missing(name))
}

/// `requested` as a list of distinct scope tokens, if every one is in
/// `granted` (RFC 6749 §6: a refresh may narrow, never widen).
fn narrow_scope(requested: &str, granted: &str) -> Option<String> {
    let granted: Vec<&str> = granted.split_ascii_whitespace().collect();
    let mut out: Vec<&str> = Vec::new();
    for s in requested.split_ascii_whitespace() {
        if !granted.contains(&s) {
            return None;
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Some(out.join(" "))
}

async fn token(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match token_inner(&app, peer, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.respond(&app, "token"),
    }
}

async fn token_inner(
    app: &Arc<App>,
    peer: Peer,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, OAuthError> {
    let bytes = read_form(app, headers, body).await?;
    let form = parse_form(&bytes)?;
    let grant = required(&form, "grant_type")?;
    let client = authenticate(app, headers, &form)?;
    let ip = app.client_ip(peer.0, headers);
    if !matches!(grant, "authorization_code" | "refresh_token") {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            Code::UnsupportedGrantType,
            "grant_type must be authorization_code or refresh_token",
        ));
    }
    // The proof is checked in full before the code or token is looked at:
    // a refused proof, or a request for a nonce, spends nothing (RFC 9449
    // §4.3, §8). Every answer to a client that must send nonces carries a
    // fresh one.
    let now = app.engine.now().as_secs();
    let nonce_required = app.engine.policies().policy(&client.id).dpop_nonce();
    let nonce = nonce_required.then(|| app.dpop.nonce(now));
    let values: Vec<&[u8]> = headers
        .get_all("dpop")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let jkt = app
        .dpop
        .verify(&ProofRequest {
            values: &values,
            method: "POST",
            now,
            nonce_required,
        })
        .await
        .map_err(|e| OAuthError {
            dpop_nonce: nonce.clone(),
            ..OAuthError::proof(e)
        })?;
    let result = match grant {
        "authorization_code" => code_grant(app, &client, &form, ip, jkt).await,
        _ => refresh_grant(app, &client, &form, ip, jkt).await,
    };
    match (result, nonce) {
        (Ok(mut r), Some(n)) => {
            set_dpop_nonce(&mut r, n);
            Ok(r)
        }
        (Err(e), Some(n)) => Err(OAuthError {
            dpop_nonce: Some(n),
            ..e
        }),
        (r, None) => r,
    }
}

fn denied(d: &Decision) -> Option<OAuthError> {
    match d {
        Decision::Accept(_) => None,
        Decision::Deny(d) => Some(OAuthError::new(
            StatusCode::BAD_REQUEST,
            d.reason.oauth_error(),
            d.reason.description(),
        )),
    }
}

async fn code_grant(
    app: &Arc<App>,
    client: &Client,
    form: &Form<'_>,
    ip: Option<IpAddr>,
    jkt: Option<Jkt>,
) -> Result<Response, OAuthError> {
    let code = required(form, "code")?;
    let redirect_uri = required(form, "redirect_uri")?;
    let req = ExchangeRequest {
        code,
        code_verifier: form.get("code_verifier"),
        client: &client.id,
        redirect_uri,
        ip,
        dpop: jkt,
    };
    let decision = match app.engine.exchange_async(&req) {
        Ok(pending) => pending.await,
        Err(e) => Err(e),
    };
    let decision = decision.map_err(|e| OAuthError::engine(app, "code exchange", &e))?;
    app.metrics.decision(&client.id, &decision);
    if let Some(e) = denied(&decision) {
        return Err(e);
    }
    let Decision::Accept(a) = decision else {
        return Err(OAuthError::server());
    };
    issue(app, client, &a, None, jkt)
}

async fn refresh_grant(
    app: &Arc<App>,
    client: &Client,
    form: &Form<'_>,
    ip: Option<IpAddr>,
    jkt: Option<Jkt>,
) -> Result<Response, OAuthError> {
    let token = required(form, "refresh_token")?;
    // A narrower scope is checked before the redemption, so that an
    // invalid_scope answer leaves the token unspent. Another client's token
    // is left for the engine to deny (client binding comes first).
    let narrowed = match form.get("scope") {
        None => None,
        Some(requested) => match app.engine.introspect(token) {
            Some(info) if *info.client == *client.id => {
                match narrow_scope(requested, &info.scope) {
                    Some(s) => Some(s),
                    None => {
                        return Err(OAuthError::new(
                            StatusCode::BAD_REQUEST,
                            Code::InvalidScope,
                            "the requested scope exceeds the scope originally granted",
                        ));
                    }
                }
            }
            _ => Some(requested.to_owned()),
        },
    };
    let started = Instant::now();
    let decision = match app
        .engine
        .redeem_async(&RedeemRequest::new(token, &client.id).ip(ip).dpop(jkt))
    {
        Ok(pending) => pending.await,
        Err(e) => Err(e),
    };
    app.metrics.redeem_latency.observe(started.elapsed());
    let decision = decision.map_err(|e| OAuthError::engine(app, "refresh", &e))?;
    app.metrics.decision(&client.id, &decision);
    if let Some(e) = denied(&decision) {
        return Err(e);
    }
    let Decision::Accept(a) = decision else {
        return Err(OAuthError::server());
    };
    issue(app, client, &a, narrowed.as_deref(), jkt)
}

fn random_id() -> Result<String, OAuthError> {
    let mut b = [0u8; 16];
    super::datadir::fill_random(&mut b).map_err(|e| {
        tracing::error!(error = %e, "random number generator failed");
        OAuthError::server()
    })?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

/// The token response for a refresh token the engine just handed out.
/// Subject and scope come with the acceptance, read under the same lock
/// as the decision: looking the family up again could find it revoked and
/// swept by a concurrent request, and answer an error for a rotation the
/// engine has already made durable (the client's old token is then spent,
/// its new one never delivered).
///
/// With a verified proof the access token is bound to its key (`cnf.jkt`,
/// `token_type` `DPoP`, RFC 9449 §5, §6.1), whatever the `dpop` knob says:
/// the knob governs the refresh token's binding, which confidential
/// clients never get (RFC 9449 §5).
fn issue(
    app: &App,
    client: &Client,
    accepted: &Accepted,
    scope: Option<&str>,
    jkt: Option<Jkt>,
) -> Result<Response, OAuthError> {
    #[cfg(test)]
    tests::before_response(app, accepted);
    let policies = app.engine.policies();
    let policy = policies.policy(&client.id);
    // An opaque token is bound to a key only through its family
    // (introspection answers the family's `cnf`): for a proof whose key the
    // family does not hold (a confidential client's, RFC 9449 §5), the
    // binding must travel in the token, so a JWT is issued instead.
    if policy.access_token_format() == AccessTokenFormat::Opaque
        && jkt.is_none_or(|k| accepted.jkt() == Some(&k))
    {
        return issue_opaque(app, accepted, scope);
    }
    let granted = accepted.scope();
    let scope = match scope {
        // Checked against the family before the redemption; intersect all
        // the same so that nothing wider can ever be signed.
        Some(s) => narrow_scope(s, granted).unwrap_or_else(|| granted.to_owned()),
        None => granted.to_owned(),
    };
    let ttl = policy.access_token_ttl().as_secs().max(1);
    let now = app.engine.now().as_secs();
    let claims = AccessClaims {
        iss: app.issuer.clone(),
        sub: accepted.subject().to_owned(),
        aud: client.id.clone(),
        exp: now + ttl,
        iat: now,
        jti: random_id()?,
        client_id: client.id.clone(),
        scope,
        cnf: jkt.map(|k| Confirmation {
            jkt: k.to_base64url(),
        }),
    };
    let access_token = app.signer.sign(&claims);
    Ok(token_response(
        &access_token,
        ttl,
        accepted,
        &claims.scope,
        claims.cnf.is_some(),
    ))
}

/// The successful token response (RFC 6749 §5.1), serialized from a struct
/// rather than built as a `serde_json::Value` (a map of owned strings per
/// grant). Members in the order the `Value` wrote them.
/// `dpop`: the access token is bound to a DPoP key (RFC 9449 §5).
fn token_response(
    access_token: &str,
    ttl: u64,
    accepted: &Accepted,
    scope: &str,
    dpop: bool,
) -> Response {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        access_token: &'a str,
        expires_in: u64,
        refresh_token: &'a str,
        scope: &'a str,
        token_type: &'static str,
    }
    let body = Body {
        access_token,
        expires_in: ttl,
        refresh_token: accepted.token.as_str(),
        scope,
        token_type: if dpop { "DPoP" } else { "Bearer" },
    };
    // Serializing borrowed strings and an integer cannot fail.
    let text = serde_json::to_string(&body).unwrap_or_default();
    json(StatusCode::OK, text, true)
}

/// The token response with an opaque access token (README "Opaque access
/// tokens"): no signature, derived from the acceptance alone, so a
/// revocation racing the response cannot fail it (the token it carries is
/// then inactive from the start). The scope answered is what the token
/// grants, in the grant's order (RFC 6749 §3.3: order does not matter).
fn issue_opaque(
    app: &App,
    accepted: &Accepted,
    scope: Option<&str>,
) -> Result<Response, OAuthError> {
    let minted = app
        .engine
        .access_token(accepted, scope)
        .map_err(|e| OAuthError::engine(app, "access token", &e))?;
    let ttl = minted.expires_at.since(minted.issued_at).as_secs().max(1);
    Ok(token_response(
        minted.token.as_str(),
        ttl,
        accepted,
        minted.scope(),
        accepted.jkt().is_some(),
    ))
}

async fn revoke(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    match revoke_inner(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.respond(&app, "revoke"),
    }
}

async fn revoke_inner(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, OAuthError> {
    let bytes = read_form(app, headers, body).await?;
    let form = parse_form(&bytes)?;
    let client = authenticate(app, headers, &form)?;
    let token = required(&form, "token")?.to_owned();
    // `token_type_hint` is optional and only a hint (RFC 7009 §2.1): every
    // token says what it is by its form. A JWT access token is
    // self-contained and expires on its own. An opaque one of this client
    // lives only as long as its family, and nothing per token is stored
    // to end it alone, so revoking it revokes its family, refresh token
    // included (RFC 7009 §2.1 lets the server revoke "the respective
    // refresh token as well"; README "Opaque access tokens"). Any other
    // token is tried as a refresh token.
    let engine = app.engine.clone();
    let id = client.id.clone();
    let result = tokio::task::spawn_blocking(move || match engine.verify_access_token(&token) {
        Some(info) if info.client() == id => engine.revoke_family(info.family),
        Some(_) => Ok(false),
        None => engine.revoke_token(&token, Some(&id)),
    })
    .await
    .map_err(|_| OAuthError::server())?;
    match result {
        // 200 also for unknown, already revoked, or another client's
        // tokens (RFC 7009 §2.2). The body is empty, so it has no content
        // type: an empty `application/json` body is not JSON.
        Ok(_) => Ok(StatusCode::OK.into_response()),
        Err(e) => Err(OAuthError::engine(app, "revocation", &e)),
    }
}

async fn introspect(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    match introspect_inner(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.respond(&app, "introspect"),
    }
}

async fn introspect_inner(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, OAuthError> {
    let bytes = read_form(app, headers, body).await?;
    let form = parse_form(&bytes)?;
    // The caller: the admin token as a bearer, or a confidential client.
    let bearer = headers
        .get(header::AUTHORIZATION)
        .filter(|v| is_scheme(v, "bearer"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(_, t)| t.trim());
    let caller: Option<String> = match bearer {
        Some(t) if app.admin.matches(t) => None,
        Some(_) => {
            return Err(OAuthError::client("invalid bearer token", false));
        }
        None => {
            let client = authenticate(app, headers, &form)?;
            if !client.confidential {
                return Err(OAuthError::client(
                    "introspection requires a confidential client or the admin token",
                    false,
                ));
            }
            Some(client.id)
        }
    };
    let token = required(&form, "token")?;
    let visible = |client: &str| caller.as_deref().is_none_or(|c| c == client);
    let inactive = || json(StatusCode::OK, r#"{"active":false}"#.to_owned(), true);
    // `token_type_hint` (RFC 7662 §2.1) is only a hint, and every kind of
    // token here says what it is by its form (`rga_`, `rgt_`, a JWS), so
    // it is not needed to find the token and a wrong one changes nothing.
    if let Some(info) = app.engine.verify_access_token(token) {
        if !visible(info.client()) {
            return Ok(inactive());
        }
        let mut body = serde_json::json!({
            "active": true,
            "client_id": info.client(),
            "sub": info.subject(),
            "scope": info.scope(),
            "aud": info.client(),
            "exp": info.expires_at.as_secs(),
            "iat": info.issued_at.as_secs(),
            "iss": app.issuer,
            "token_type": if info.jkt.is_some() { "DPoP" } else { "Bearer" },
        });
        // Bound through its family (RFC 9449 §6.2).
        if let Some(jkt) = &info.jkt {
            body["cnf"] = serde_json::json!({ "jkt": jkt.to_base64url() });
        }
        return Ok(json(StatusCode::OK, body.to_string(), true));
    }
    if let Some(info) = app.engine.introspect(token) {
        if !info.active || !visible(&info.client) {
            return Ok(inactive());
        }
        let iat = if info.generation == Generation::FIRST {
            info.issued_at
        } else {
            // The current generation was minted by the last rotation.
            info.last_used
        };
        let mut body = serde_json::json!({
            "active": true,
            "client_id": &*info.client,
            "sub": &*info.subject,
            "scope": &*info.scope,
            "iat": iat.as_secs(),
            "iss": app.issuer,
            "token_type": "refresh_token",
        });
        if let Some(exp) = info.expires_at() {
            body["exp"] = exp.as_secs().into();
        }
        // The key the refresh token is bound to (RFC 9449 §6.2).
        if let Some(jkt) = info.jkt {
            body["cnf"] = serde_json::json!({ "jkt": jkt.to_base64url() });
        }
        return Ok(json(StatusCode::OK, body.to_string(), true));
    }
    if let Some(claims) = app.signer.verify(token, app.engine.now())
        && visible(&claims.client_id)
    {
        let mut body = serde_json::json!({
            "active": true,
            "client_id": claims.client_id,
            "sub": claims.sub,
            "scope": claims.scope,
            "aud": claims.aud,
            "exp": claims.exp,
            "iat": claims.iat,
            "iss": claims.iss,
            "jti": claims.jti,
            "token_type": if claims.cnf.is_some() { "DPoP" } else { "Bearer" },
        });
        if let Some(cnf) = &claims.cnf {
            // RFC 9449 §6.2: the resource server checks proofs against it.
            body["cnf"] = serde_json::json!({ "jkt": cnf.jkt });
        }
        return Ok(json(StatusCode::OK, body.to_string(), true));
    }
    Ok(inactive())
}

async fn metadata_doc(State(app): State<Arc<App>>) -> Response {
    json(StatusCode::OK, app.metadata(), false)
}

async fn jwks(State(app): State<Arc<App>>) -> Response {
    json(StatusCode::OK, app.jwks.clone(), false)
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    health(&app, false).await
}

/// `/healthz`: 503 naming the store once it has failed closed (a write
/// error such as a full disk: README "Durability"), asked of the store
/// itself, so it says so before any request meets the failure. The
/// operating system's error, which names files, only on the admin
/// listener (`detail`).
///
/// With a shared store (`--store`): 503 while Redis does not answer (the
/// engine's last command failed, or a PING now), `ok` again by itself
/// once it does; nothing latches.
pub(crate) async fn health(app: &App, detail: bool) -> Response {
    let mut body = serde_json::json!({
        "policy_version": app.engine.policies().version().to_string(),
        "durability": super::durability_name(&app.engine, app.is_shared()),
    });
    if app.is_shared() {
        let fault = app.shared_fault().await;
        body["status"] = if fault.is_none() { "ok" } else { "failing" }.into();
        body["store"] = if fault.is_none() { "ok" } else { "unavailable" }.into();
        if let Some(f) = fault {
            body["fault"] = "the shared store does not answer: every call that needs it \
                             is answered 503 until it does (no restart needed)"
                .into();
            if detail {
                body["detail"] = f.into();
            }
            return json(StatusCode::SERVICE_UNAVAILABLE, body.to_string(), true);
        }
        return json(StatusCode::OK, body.to_string(), true);
    }
    let failure = app.engine.store_failure();
    let healthy = app.is_healthy() && failure.is_none();
    body["status"] = if healthy { "ok" } else { "failing" }.into();
    body["store"] = if healthy { "ok" } else { "failed" }.into();
    if !healthy {
        body["fault"] = "the store failed closed: every change is refused until a restart \
                         (the cause is in the server log)"
            .into();
        if detail && let Some(e) = failure {
            body["detail"] = e.to_string().into();
        }
    }
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, body.to_string(), true)
}

pub(crate) async fn not_found() -> Response {
    json(
        StatusCode::NOT_FOUND,
        r#"{"error":"not_found"}"#.to_owned(),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    use refresh_guard::{IssueRequest, PolicySet, Timestamp};

    type Hook = fn(&App, &Accepted);

    thread_local! {
        /// Run by `issue` between the redemption and the response: a
        /// deterministic stand-in for a request racing in between.
        static BEFORE_RESPONSE: Cell<Option<Hook>> = const { Cell::new(None) };
    }

    pub(super) fn before_response(app: &App, accepted: &Accepted) {
        if let Some(hook) = BEFORE_RESPONSE.get() {
            hook(app, accepted);
        }
    }

    /// An app on a fresh data directory, in memory, admitting any client.
    fn app(name: &str) -> (App, std::path::PathBuf) {
        let data = std::env::temp_dir().join(format!("rg-oauth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let config = crate::Config {
            data: data.clone(),
            durability: refresh_guard::Durability::None,
            policy_set: Some(PolicySet::builder().build().unwrap()),
            ..crate::Config::default()
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        (crate::build_app(config, addr).unwrap(), data)
    }

    /// A revocation and a sweep racing a refresh between its redemption and
    /// its response turned the rotation the engine had already made (the
    /// presented token spent) into a 400: the response looked the family up
    /// again instead of using the acceptance. Now it is a 200 with the
    /// family's subject and the narrowed scope.
    #[test]
    fn refresh_racing_a_revoke_and_sweep_still_answers_its_rotation() {
        let (app, data) = app("race");
        let app = Arc::new(app);
        let t1 = app
            .engine
            .issue(&IssueRequest {
                client: "app",
                subject: "user-42",
                scope: "openid profile",
                ip: None,
            })
            .unwrap()
            .accepted()
            .unwrap()
            .token;
        BEFORE_RESPONSE.set(Some(|app, a| {
            assert!(app.engine.revoke_family(a.family).unwrap());
            // Past the revoked family's retention: the sweep removes it.
            let later = Timestamp::from_secs(app.engine.now().as_secs() + 400 * 86_400);
            app.engine.at(later).sweep(1 << 20).unwrap();
            assert!(app.engine.introspect(a.token.as_str()).is_none(), "swept");
        }));
        let body = format!(
            "grant_type=refresh_token&refresh_token={}&scope=openid",
            t1.as_str()
        );
        let client = Client {
            id: "app".to_owned(),
            confidential: false,
        };
        let response = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async {
                let form = form::parse(body.as_bytes()).unwrap();
                let r = match refresh_grant(&app, &client, &form, None, None).await {
                    Ok(r) => r,
                    Err(e) => e.respond(&app, "token"),
                };
                let status = r.status();
                let bytes = r.into_body().collect().await.unwrap().to_bytes();
                (status, bytes)
            });
        BEFORE_RESPONSE.set(None);
        let _ = std::fs::remove_dir_all(&data);
        assert_eq!(response.0, StatusCode::OK, "{:?}", response.1);
        let json: serde_json::Value = serde_json::from_slice(&response.1).unwrap();
        assert_eq!(json["scope"], "openid", "narrowed as asked");
        assert_ne!(json["refresh_token"], t1.as_str(), "rotated");
        let access = json["access_token"].as_str().unwrap();
        let payload = access.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims["sub"], "user-42");
    }

    #[test]
    fn scope_narrowing() {
        assert_eq!(narrow_scope("b a b", "a b c").as_deref(), Some("b a"));
        assert_eq!(narrow_scope("a d", "a b c"), None);
        assert_eq!(narrow_scope("", "a").as_deref(), Some(""));
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let v = HeaderValue::from_str(&format!(
            "Basic {}",
            STANDARD.encode("my%3Aapp:p%40ss+word")
        ))
        .unwrap();
        assert_eq!(
            basic_credentials(&v),
            Some(("my:app".into(), "p@ss word".into()))
        );
        assert_eq!(
            basic_credentials(&HeaderValue::from_static("Basic !!")),
            None
        );
        assert_eq!(
            basic_credentials(&HeaderValue::from_static("Bearer abc")),
            None
        );
    }
}
