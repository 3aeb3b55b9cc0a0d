//! `--protocol ip-chat`: its flags are `switchboard_ip_chat::Config` (feature `cli`).

use switchboard_ip_chat::{Config, IpChat};

use crate::CliError;
use crate::runtime::Server;

pub(crate) async fn serve(mut config: Config, server: Server) -> Result<(), CliError> {
    config.max_state_bytes = server.max_state_bytes;
    server.run(IpChat::new(config)).await
}
