//! The server's configuration: a TOML file, then environment variables
//! (`SMARTMSG_` + the key, `__` between levels: `SMARTMSG_LISTEN`,
//! `SMARTMSG_SENDER__URL`), then command-line flags. Unknown keys are
//! refused, naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::sender::WebhookConfig;

/// Everything `smartmsg serve` is configured with. Every field has a
/// default; see `docs/serve.md` for each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ServeConfig {
    /// Where to listen. Default `127.0.0.1:8080` (loopback only).
    pub listen: SocketAddr,
    /// The data directory (event log, snapshots, delay queue, state).
    /// Default `smartmsg-data`.
    pub data_dir: PathBuf,
    /// Where the event log and the delay queue live. Default: embedded,
    /// in `data_dir`.
    pub backend: BackendConfig,
    /// Where planned messages go.
    pub sender: SenderConfig,
    /// Reaction sources the runtime polls, besides `POST /v1/reactions`.
    /// Default none.
    pub sources: Vec<SourceConfig>,
    /// Bearer tokens and their scopes. None: every request is allowed
    /// (fit for a loopback address only; the server warns).
    pub tokens: Vec<TokenConfig>,
    /// Request limits.
    pub limits: HttpLimits,
    /// The runtime's longest sleep between steps (ms). Default 200.
    pub poll_interval_ms: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("smartmsg-data"),
            backend: BackendConfig::Embedded,
            sender: SenderConfig::default(),
            sources: Vec::new(),
            tokens: Vec::new(),
            limits: HttpLimits::default(),
            poll_interval_ms: 200,
        }
    }
}

/// Where planned messages go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum SenderConfig {
    /// One JSON Lines file per batch in `dir` (default `outbox`, relative
    /// to the working directory).
    Outbox {
        /// The directory.
        dir: PathBuf,
    },
    /// POST each batch to a URL (see [`WebhookConfig`]).
    Webhook(WebhookConfig),
    /// One Kafka record per message on `topic` (key: the message id).
    /// Needs a `smartmsg` built with the `distributed` feature.
    Kafka {
        /// `bootstrap.servers`.
        bootstrap: String,
        /// The topic.
        topic: String,
    },
}

/// Where the event log and the delay queue live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum BackendConfig {
    /// Everything in `data_dir`: the segment-file log, the redb timer
    /// wheel, redb snapshots and pipeline state.
    Embedded,
    /// The event log on Kafka and the delay queue on RabbitMQ; the
    /// pipelines' state store stays in `data_dir` (redb), snapshots are
    /// off. Needs a `smartmsg` built with the `distributed` feature.
    Distributed(DistributedConfig),
    /// One instance of a cluster: the campaigns are split into shards,
    /// each shard's log on Kafka, its delay queue on RabbitMQ, its
    /// reactions in its partition of a Kafka topic, the read models in
    /// PostgreSQL; Kafka's consumer-group protocol gives each instance its
    /// shards. Needs a `smartmsg` built with the `distributed` feature.
    Cluster(ClusterConfig),
}

/// The services of [`BackendConfig::Cluster`] and this instance's place
/// in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// The cluster's name, the same on every instance: it names the
    /// shards' logs (`<name>.shard-<s>`), the ownership group, the queues
    /// and the PostgreSQL schema. Default `smartmsg`.
    pub name: String,
    /// The number of shards, the same on every instance and fixed for the
    /// cluster's life (more shards than instances lets the work spread).
    /// Default 8.
    pub shards: u32,
    /// Kafka `bootstrap.servers`. Default `127.0.0.1:9092`.
    pub kafka_bootstrap: String,
    /// Replication factor of the shards' log topics when they are created.
    /// Default 1 (a single broker; use 3 on a real cluster, and create the
    /// reactions and ownership topics beforehand with it too).
    pub replication_factor: i32,
    /// The AMQP URL. Default `amqp://127.0.0.1:5672/%2f`.
    pub rabbitmq_url: String,
    /// The PostgreSQL connection string of the read models. Default
    /// `postgres://postgres@127.0.0.1:5432/postgres`.
    pub postgres_url: String,
    /// The URL other instances forward a shard's requests to, when this
    /// instance runs it. Default `http://<listen>`; set it when `listen`
    /// is `0.0.0.0` or behind a proxy.
    pub advertise: Option<String>,
    /// This instance's name in the ownership group (logs and the shard
    /// owners' table show it). Default: the advertised address.
    pub member: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            name: "smartmsg".into(),
            shards: 8,
            kafka_bootstrap: "127.0.0.1:9092".into(),
            replication_factor: 1,
            rabbitmq_url: "amqp://127.0.0.1:5672/%2f".into(),
            postgres_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            advertise: None,
            member: None,
        }
    }
}

impl ClusterConfig {
    /// The reactions topic: one partition per shard.
    pub fn reactions_topic(&self) -> String {
        format!("smartmsg.{}.reactions", self.name)
    }

    /// The PostgreSQL schema of the read models and the owners' table.
    pub fn schema(&self) -> String {
        let mut s: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        s.insert_str(0, "smartmsg_");
        s.truncate(48);
        s
    }
}

/// The Kafka log and RabbitMQ queue of [`BackendConfig::Distributed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct DistributedConfig {
    /// Kafka `bootstrap.servers`. Default `127.0.0.1:9092`.
    pub kafka_bootstrap: String,
    /// The log's name (its topic and transactional id derive from it).
    /// Default `smartmsg`.
    pub log_name: String,
    /// Partitions of the log's topic when it is created. Default 4.
    pub partitions: u32,
    /// Replication factor when the topic is created. Default 1 (a single
    /// broker; use 3 in production).
    pub replication_factor: i32,
    /// The AMQP URL. Default `amqp://127.0.0.1:5672/%2f`.
    pub rabbitmq_url: String,
    /// The prefix of the queue's exchanges and queues. Default `smartmsg`.
    pub queue_prefix: String,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            kafka_bootstrap: "127.0.0.1:9092".into(),
            log_name: "smartmsg".into(),
            partitions: 4,
            replication_factor: 1,
            rabbitmq_url: "amqp://127.0.0.1:5672/%2f".into(),
            queue_prefix: "smartmsg".into(),
        }
    }
}

/// A reaction source the runtime polls (its cursor is kept in the log, so
/// keep `name` stable across restarts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum SourceConfig {
    /// JSON Lines files appearing in `dir` (see `JsonLinesSource`).
    JsonLines {
        /// The source's name.
        name: String,
        /// The directory.
        dir: PathBuf,
    },
    /// A Kafka topic of reaction messages. Needs a `smartmsg` built with
    /// the `distributed` feature.
    Kafka {
        /// The source's name.
        name: String,
        /// `bootstrap.servers`.
        bootstrap: String,
        /// The topic.
        topic: String,
    },
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig::Outbox {
            dir: PathBuf::from("outbox"),
        }
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read campaigns, batches, dead letters, metrics.
    Read,
    /// Also create and command campaigns, upload audiences, post
    /// reactions.
    Write,
    /// Also remove users' data.
    Admin,
}

/// A bearer token and its scope.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TokenConfig {
    /// The token (sent as `Authorization: Bearer <token>`).
    pub token: String,
    /// What it may do.
    pub scope: Scope,
}

impl TokenConfig {
    /// A token with its scope.
    pub fn new(token: impl Into<String>, scope: Scope) -> Self {
        Self {
            token: token.into(),
            scope,
        }
    }
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens never appear in logs.
        f.debug_struct("TokenConfig")
            .field("token", &"<redacted>")
            .field("scope", &self.scope)
            .finish()
    }
}

/// Request limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct HttpLimits {
    /// Largest JSON body (commands, one reaction). Default 1 MiB.
    pub max_json_bytes: usize,
    /// Largest JSON Lines body of reactions. Default 16 MiB.
    pub max_reactions_bytes: usize,
    /// Most reactions in one request. Default 20,000.
    pub max_reactions_per_request: usize,
    /// Largest audience upload. Default 2 GiB (streamed to disk).
    pub max_audience_bytes: u64,
    /// Most users in an audience. Default 50,000,000.
    pub max_audience_rows: u64,
    /// Most messages per page of a batch. Default 1,000.
    pub max_page: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_json_bytes: 1 << 20,
            max_reactions_bytes: 16 << 20,
            max_reactions_per_request: 20_000,
            max_audience_bytes: 2 << 30,
            max_audience_rows: 50_000_000,
            max_page: 1_000,
        }
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl ServeConfig {
    /// The defaults, then `file` (if given), then the environment's
    /// `SMARTMSG_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, Env::prefixed("SMARTMSG_").split("__"))
    }

    fn load_with(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        // Defaults come from `#[serde(default)]` (a merged default would
        // mix the fields of two sender kinds).
        let mut f = Figment::new();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!("{}: no such file", path.display())));
            }
            f = f.merge(Toml::file(path));
        }
        // Variables the server does not own (the tests' and scripts', see
        // docs/services.md) are not configuration. A new one must be added
        // here: an unknown `SMARTMSG_*` variable is an error.
        let env = env.ignore(&[
            "KAFKA_BOOTSTRAP",
            "RABBITMQ_URL",
            "POSTGRES_URL",
            "POSTGRES_DIR",
            "RABBITMQ_START_TIMEOUT",
            "TANSU_START_TIMEOUT",
            "RABBITMQCTL",
            "RABBITMQ_HOME",
            "FAULT_SEED",
            "FUZZ_SEED",
            "FUZZ_INPUTS",
            "FUZZ_SECONDS",
            "SKIP_PYTHON",
            "BIN",
            "CRASH_KILLS",
            "CRASH_SEED",
            "SERVE_KILLS",
            "SKIP_SERVICES",
            "SKIP_LINT",
            "SKIP_BROWSER",
            "KEEP_SERVICES",
        ]);
        f.merge(env).extract().map_err(|e| {
            let msg: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
            ConfigError(msg.join("; "))
        })
    }

    /// The configuration as TOML: every option with its value (what
    /// `smartmsg serve --print-config` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_build_refuses_brokers_naming_the_feature() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        std::fs::write(
            &f,
            "[backend]\nkind = \"distributed\"\nkafka_bootstrap = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let c = ServeConfig::load_with(Some(&f), Env::prefixed("SMARTMSG_TEST_NONE_")).unwrap();
        assert!(matches!(c.backend, BackendConfig::Distributed(ref d) if d.partitions == 4));
        let Err(e) = crate::http::embedded_backend(&c) else {
            panic!("opened a distributed backend without the feature");
        };
        assert!(e.to_string().contains("--features distributed"), "{e}");
        let c = ServeConfig {
            sender: SenderConfig::Kafka {
                bootstrap: "127.0.0.1:1".into(),
                topic: "t".into(),
            },
            data_dir: dir.path().join("d"),
            ..ServeConfig::default()
        };
        let Err(e) = crate::http::embedded_backend(&c) else {
            panic!("a Kafka sender without the feature");
        };
        assert!(e.to_string().contains("sender.kind"), "{e}");
        std::fs::write(&f, "[backend]\nkind = \"distributed\"\nkafka = 1\n").unwrap();
        let e = ServeConfig::load_with(Some(&f), Env::prefixed("SMARTMSG_TEST_NONE_")).unwrap_err();
        assert!(e.to_string().contains("kafka"), "{e}");
    }

    #[test]
    fn files_and_environment_override_the_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:9000\"\n[sender]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/x\"\n[[tokens]]\ntoken = \"t1\"\nscope = \"write\"\n",
        )
        .unwrap();
        let c = ServeConfig::load_with(Some(&f), Env::prefixed("SMARTMSG_TEST_NONE_")).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert!(matches!(c.sender, SenderConfig::Webhook(ref w) if w.url.ends_with("/x")));
        assert_eq!(c.tokens[0].scope, Scope::Write);
        assert!(
            !format!("{:?}", c.tokens[0]).contains("t1"),
            "tokens never printed"
        );
        std::fs::write(&f, "[limits]\nmax_page = 5\nmax_pages = 6\n").unwrap();
        let e = ServeConfig::load_with(Some(&f), Env::prefixed("SMARTMSG_TEST_NONE_")).unwrap_err();
        assert!(e.to_string().contains("max_pages"), "{e}");
        let e = ServeConfig::load_with(Some(&dir.path().join("nope.toml")), Env::prefixed("X_"))
            .unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
    }
}
