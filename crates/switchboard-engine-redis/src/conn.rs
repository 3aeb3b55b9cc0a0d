//! The node's command connection: one multiplexed connection (commands of every task share it,
//! pipelined), replaced when it breaks, each command bounded by the configured timeout.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};
use switchboard_core::engine::{EngineError, EngineResult};
use switchboard_core::sync::lock;

/// A connection to Redis for commands, reconnected on demand.
pub(crate) struct Commands {
    client: Client,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    current: Mutex<Option<MultiplexedConnection>>,
    /// One connection attempt at a time; the others wait for its result.
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands").finish_non_exhaustive()
    }
}

impl Commands {
    pub(crate) fn new(client: Client, timeout: Duration) -> Self {
        Self {
            client,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
            connect_timeout: timeout,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// The live connection, connecting if there is none.
    pub(crate) async fn get(&self) -> EngineResult<MultiplexedConnection> {
        if let Some(conn) = lock(&self.current).clone() {
            return Ok(conn);
        }
        let _one = self.connecting.lock().await;
        if let Some(conn) = lock(&self.current).clone() {
            return Ok(conn);
        }
        let conn = tokio::time::timeout(
            self.connect_timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&self.config),
        )
        .await
        .map_err(|_| EngineError::Unavailable("connecting to redis timed out".into()))?
        .map_err(|error| unavailable(&error))?;
        *lock(&self.current) = Some(conn.clone());
        Ok(conn)
    }

    /// Turns a command's failure into an engine error, forgetting the connection if it broke.
    pub(crate) fn fail(&self, error: &RedisError) -> EngineError {
        if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_unrecoverable_error()
        {
            *lock(&self.current) = None;
        }
        if error.code() == Some("OOM") {
            return EngineError::Full("redis is out of memory (maxmemory)");
        }
        unavailable(error)
    }
}

fn unavailable(error: &RedisError) -> EngineError {
    EngineError::Unavailable(format!("redis: {error}"))
}
