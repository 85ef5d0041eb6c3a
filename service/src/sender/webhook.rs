//! [`WebhookSender`]: batches POSTed to an HTTP endpoint.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use smartmsg_domain::OutgoingBatch;

use super::{records, MessageRecord, SendError, Sender};

/// How a [`WebhookSender`] talks to its endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct WebhookConfig {
    /// The endpoint (`http://…`; `https://…` with the `rustls` feature).
    pub url: String,
    /// Sent as `Authorization: Bearer <token>` when set.
    pub bearer_token: Option<String>,
    /// Most messages per request; a batch goes as several requests
    /// (parts), each acknowledged on its own. Default 1,000.
    pub max_messages_per_request: usize,
    /// Per-request timeout. Default 10 s.
    pub timeout_ms: u64,
    /// Attempts per request before the batch is reported unavailable (the
    /// runtime then tries again later). Default 5.
    pub max_attempts: u32,
    /// First retry delay, doubling per attempt. Default 200 ms.
    pub retry_base_ms: u64,
    /// Longest retry delay. Default 10 s.
    pub retry_max_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            bearer_token: None,
            max_messages_per_request: 1_000,
            timeout_ms: 10_000,
            max_attempts: 5,
            retry_base_ms: 200,
            retry_max_ms: 10_000,
        }
    }
}

/// The body of one webhook request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookRequest {
    /// The campaign.
    pub campaign: String,
    /// The channel.
    pub channel: String,
    /// The batch.
    pub batch: u32,
    /// This request's part of the batch, from 0.
    pub part: u32,
    /// The batch's number of parts.
    pub parts: u32,
    /// The messages of this part.
    pub messages: Vec<MessageRecord>,
}

/// POSTs each batch as JSON ([`WebhookRequest`]) in parts of at most
/// [`WebhookConfig::max_messages_per_request`] messages. Every request
/// carries `Idempotency-Key: <campaign>/batch-<n>/part-<i>/<from>-<to>`
/// (the messages it holds, by index; the same on a retry and after a
/// restart) and every message its stable id, so the
/// receiver can drop repeats. A 2xx acknowledges the part. Connection
/// failures, timeouts, 408, 429 and 5xx are retried with exponential
/// backoff; other answers, redirects included (they are not followed),
/// refuse the batch ([`SendError::Rejected`]).
#[derive(Debug, Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    config: WebhookConfig,
}

impl WebhookSender {
    /// A sender with `config` (the URL is checked when sending).
    pub fn new(config: WebhookConfig) -> Result<Self, SendError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms.max(1)))
            // A followed 301/302/303 turns the POST into a GET without the
            // messages, whose 2xx would acknowledge an undelivered batch.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SendError::Unavailable {
                batch: String::new(),
                reason: format!("HTTP client: {e}"),
            })?;
        Ok(Self { client, config })
    }

    /// A sender to `url` with the default settings.
    pub fn to(url: impl Into<String>) -> Result<Self, SendError> {
        Self::new(WebhookConfig {
            url: url.into(),
            ..WebhookConfig::default()
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WebhookConfig {
        &self.config
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(20);
        let ms = self
            .config
            .retry_base_ms
            .saturating_mul(1 << shift)
            .min(self.config.retry_max_ms);
        Duration::from_millis(ms)
    }

    async fn post(&self, key: &str, body: &[u8]) -> Result<(), (bool, String)> {
        let mut req = self
            .client
            .post(&self.config.url)
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(body.to_vec());
        if let Some(t) = &self.config.bearer_token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let code = status.as_u16();
                let retry = code == 408 || code == 429 || status.is_server_error();
                let text = resp.text().await.unwrap_or_default();
                let text: String = text.chars().take(200).collect();
                Err((retry, format!("HTTP {code}: {text}")))
            }
            Err(e) => {
                // Connection refused, reset, timeout: the receiver may not
                // have it; a retry is safe (idempotency key).
                let mut reason = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    reason.push_str(": ");
                    reason.push_str(&s.to_string());
                    src = s.source();
                }
                Err((!e.is_builder(), reason))
            }
        }
    }
}

#[async_trait]
impl Sender for WebhookSender {
    fn name(&self) -> &str {
        "webhook"
    }

    async fn send(&self, batch: &OutgoingBatch) -> Result<(), SendError> {
        // Without TLS the client fails to connect to https:// endpoints,
        // which would look like an outage retried forever.
        let https = self
            .config
            .url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
        if https && cfg!(not(feature = "rustls")) {
            return Err(SendError::Rejected {
                batch: batch.key(),
                reason: "https:// endpoints need the `rustls` feature of smartmsg-service".into(),
            });
        }
        let all: Vec<MessageRecord> = records(batch).collect();
        let per = self.config.max_messages_per_request.max(1);
        let parts = all.len().div_ceil(per).max(1);
        for part in 0..parts {
            let messages = all
                .get(part * per..((part + 1) * per).min(all.len()))
                .unwrap_or_default()
                .to_vec();
            let req = WebhookRequest {
                campaign: batch.campaign.clone(),
                channel: batch.channel.clone(),
                batch: batch.batch,
                part: part as u32,
                parts: parts as u32,
                messages,
            };
            let body = serde_json::to_vec(&req).map_err(|e| SendError::Rejected {
                batch: batch.key(),
                reason: e.to_string(),
            })?;
            // The key names the messages the part holds, not only its
            // number: a batch re-sent with another part size after a
            // restart never reuses a key for other content.
            let from = part * per;
            let to = ((part + 1) * per).min(all.len());
            let key = format!("{}/part-{part}/{from}-{to}", batch.key());
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.post(&key, &body).await {
                    Ok(()) => break,
                    Err((false, reason)) => {
                        return Err(SendError::Rejected {
                            batch: batch.key(),
                            reason,
                        })
                    }
                    Err((true, reason)) if attempt >= self.config.max_attempts.max(1) => {
                        return Err(SendError::Unavailable {
                            batch: batch.key(),
                            reason: format!("after {attempt} attempts: {reason}"),
                        })
                    }
                    Err((true, reason)) => {
                        tracing::warn!(batch = %key, attempt, %reason, "webhook failed; retrying");
                        tokio::time::sleep(self.backoff(attempt)).await;
                    }
                }
            }
        }
        Ok(())
    }
}
