//! Bearer tokens with scopes.

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::config::{Scope, TokenConfig};
use super::problem::Problem;
use super::AppState;

/// The scope a request needs: reads need `read`; removing data needs
/// `admin`; anything else that changes something needs `write`.
pub fn needed(method: &Method, path: &str) -> Scope {
    let reads = method == Method::GET || method == Method::HEAD;
    let evaluation = path.starts_with("/v1/evaluations") && method == Method::POST;
    if method == Method::DELETE {
        Scope::Admin
    } else if reads || evaluation {
        Scope::Read
    } else {
        Scope::Write
    }
}

/// The scope of the request's token, or the problem to answer with.
pub fn check(tokens: &[TokenConfig], header: Option<&str>, want: Scope) -> Result<(), Problem> {
    if tokens.is_empty() {
        return Ok(());
    }
    let unauthorized = |d: &str| Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", d);
    let Some(h) = header else {
        return Err(unauthorized("no bearer token"));
    };
    let Some(token) = h.strip_prefix("Bearer ") else {
        return Err(unauthorized(
            "the Authorization header is not a bearer token",
        ));
    };
    // Compare every token whole (no early exit on the first byte).
    let found = tokens
        .iter()
        .filter(|t| constant_time_eq(t.token.as_bytes(), token.as_bytes()))
        .map(|t| t.scope)
        .max();
    match found {
        None => Err(unauthorized("unknown token")),
        Some(s) if s < want => Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the token's scope is {s:?}; this needs {want:?}").to_lowercase(),
        )),
        Some(_) => Ok(()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `path` is open to anyone: `/health`, `/ready`, `/openapi.json`
/// and the dashboard page.
pub fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/ready" | "/openapi.json" | "/" | "/dashboard"
    )
}

/// The middleware: `/health`, `/ready`, `/openapi.json` and the dashboard
/// page are open; everything else needs a token of the right scope (when
/// tokens are configured).
pub async fn require(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !is_open(path) {
        let want = needed(req.method(), path);
        let h = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Err(p) = check(&state.tokens, h, want) {
            metrics::counter!("smartmsg_http_denied_total").increment(1);
            return p.into_response();
        }
    }
    next.run(req).await
}
