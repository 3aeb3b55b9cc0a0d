//! What a node needs to join a cluster: the Redis URL, the cluster's name and its timings.

use std::time::Duration;

/// Why a [`RedisConfig`] cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The engine URL is not a `redis://HOST:PORT[/DB]` URL.
    #[error("invalid engine URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The cluster name is empty, too long or has characters other than `A-Z a-z 0-9 - _ .`.
    #[error(
        "invalid cluster name {0:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' and '.'"
    )]
    InvalidClusterName(String),
    /// The engine was started outside a tokio runtime.
    #[error("the Redis engine must be started inside a tokio runtime")]
    NoRuntime,
}

/// How one node joins a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// Prefixes every key and channel, so several clusters can share one Redis.
    pub cluster_name: String,
    /// How often the node tells the cluster it is alive.
    pub heartbeat: Duration,
    /// A node whose last heartbeat is older than this is lost: its presence is removed.
    pub stale_after: Duration,
    /// The longest one Redis command may take before the operation fails as unavailable.
    pub command_timeout: Duration,
}

impl RedisConfig {
    /// The default cluster name.
    pub const DEFAULT_CLUSTER_NAME: &'static str = "switchboard";

    /// A node of cluster `cluster_name` on the Redis at `url`, with default timings (heartbeat
    /// every second, lost after 5 s without one, commands bounded by 2 s).
    pub fn new(url: impl Into<String>, cluster_name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cluster_name: cluster_name.into(),
            heartbeat: Duration::from_secs(1),
            stale_after: Duration::from_secs(5),
            command_timeout: Duration::from_secs(2),
        }
    }

    /// Checks the URL and the cluster name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.cluster_name;
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(ConfigError::InvalidClusterName(name.clone()));
        }
        let invalid = |reason: &str| ConfigError::InvalidUrl {
            url: redacted(&self.url),
            reason: reason.to_owned(),
        };
        if !self.url.starts_with("redis://") {
            return Err(invalid("only redis:// URLs are supported"));
        }
        redis::Client::open(self.url.as_str()).map_err(|error| invalid(&error.to_string()))?;
        Ok(())
    }
}

/// `url` without its credentials (`redis://user:secret@host` becomes `redis://***@host`), for
/// error messages and logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest
        .get(..authority_end)
        .and_then(|authority| authority.rfind('@'))
    {
        Some(at) => format!("{scheme}://***{}", rest.get(at..).unwrap_or_default()),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_messages() {
        assert_eq!(redacted("redis://u:pw@h:1/2"), "redis://***@h:1/2");
        assert_eq!(redacted("redis://:pw@h"), "redis://***@h");
        assert_eq!(redacted("redis://h:1/a@b"), "redis://h:1/a@b");
        assert_eq!(redacted("nonsense"), "nonsense");
        let error = RedisConfig::new("redis://u:secret@", "a").validate();
        assert!(!format!("{error:?}").contains("secret"), "{error:?}");
    }

    #[test]
    fn validates_urls_and_cluster_names() {
        assert!(
            RedisConfig::new("redis://127.0.0.1:6379/2", "a-b_c.d")
                .validate()
                .is_ok()
        );
        assert!(matches!(
            RedisConfig::new("http://x", "a").validate(),
            Err(ConfigError::InvalidUrl { .. })
        ));
        assert!(matches!(
            RedisConfig::new("redis://127.0.0.1:6379", "a{b}").validate(),
            Err(ConfigError::InvalidClusterName(_))
        ));
        assert!(matches!(
            RedisConfig::new("redis://127.0.0.1:6379", "").validate(),
            Err(ConfigError::InvalidClusterName(_))
        ));
    }
}
