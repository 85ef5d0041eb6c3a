//! Errors as `application/problem+json` (RFC 9457).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;

/// One error of a request: what, where (the field), why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`about:blank` for plain HTTP
    /// status problems).
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong this time.
    pub detail: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Row errors of an upload (line and reason), the first ones.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub errors: Vec<RowError>,
    /// How many rows were bad in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_count: Option<u64>,
}

/// A bad row of an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RowError {
    /// The line (1-based; the header is line 1 of a CSV file).
    pub line: u64,
    /// Why it was refused.
    pub reason: String,
}

impl Problem {
    /// A problem of `status` with `detail`.
    pub fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("https://smartmsg.invalid/problems/{kind}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            field: None,
            errors: Vec::new(),
            error_count: None,
        }
    }

    /// Names the field at fault.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// 400, a request that does not parse or has a bad value.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// 409, the request conflicts with the campaign's state.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// 422, a well-formed request the campaign refuses.
    pub fn unprocessable(kind: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, kind, detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut r = (status, body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        r
    }
}

impl From<RuntimeError> for Problem {
    fn from(e: RuntimeError) -> Self {
        match &e {
            RuntimeError::UnknownCampaign(_) => Problem::not_found(e.to_string()),
            RuntimeError::BadCampaignId { .. } => Problem::bad_request(e.to_string()).field("id"),
            RuntimeError::CampaignExists(_) => Problem::conflict(e.to_string()),
            RuntimeError::Spec(_) => Problem::unprocessable("invalid-campaign", e.to_string()),
            RuntimeError::Audience(_) => Problem::unprocessable("invalid-audience", e.to_string()),
            RuntimeError::Policy(_) => {
                Problem::unprocessable("invalid-policy", e.to_string()).field("policy")
            }
            RuntimeError::Refused { .. } => {
                Problem::new(StatusCode::CONFLICT, "refused", e.to_string())
            }
            RuntimeError::ReservedCommandId(_) => {
                Problem::bad_request(e.to_string()).field("Idempotency-Key")
            }
            RuntimeError::VersionMismatch { .. } => Problem::new(
                StatusCode::PRECONDITION_FAILED,
                "stale-version",
                e.to_string(),
            ),
            RuntimeError::Stopped => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopped",
                "the runtime is not running",
            ),
            _ => {
                tracing::error!(error = %e, "request failed");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the request failed inside the server; see its log",
                )
            }
        }
    }
}
