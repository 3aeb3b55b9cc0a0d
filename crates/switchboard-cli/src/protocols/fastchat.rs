//! `--protocol fastchat`: its flags are `switchboard_fastchat::Config` (feature `cli`).

use switchboard_fastchat::{Config, FastChat};

use crate::CliError;
use crate::runtime::Server;

/// fastchat brings its own keepalive: the runtime's `--ping-interval` and `--idle-timeout` do not
/// apply; a socket silent for ping interval + pong timeout is dropped.
pub(crate) async fn serve(mut config: Config, server: Server) -> Result<(), CliError> {
    config.max_state_bytes = server.max_state_bytes;
    if config.idle_timeout().is_zero() {
        return Err(CliError::Failed(
            "--fastchat-ping-interval + --fastchat-pong-timeout must be more than 0".into(),
        ));
    }
    // The rate-limit tables are charged up front; a budget they fill would refuse every user.
    let fixed = config.fixed_state_bytes();
    if fixed >= config.max_state_bytes {
        return Err(CliError::Failed(format!(
            "--max-state-bytes ({}) must be more than fastchat's rate-limit tables ({fixed} bytes); \
             raise it or lower --fastchat-max-users / --fastchat-max-clients",
            config.max_state_bytes
        )));
    }
    server.run(FastChat::new(config)).await
}
