//! `--protocol reqack`: its flags are `switchboard_reqack::Config` (feature `cli`; every limit is
//! documented in docs/protocols/reqack.md).

use switchboard_reqack::{Config, ReqAck};

use crate::CliError;
use crate::runtime::Server;

pub(crate) async fn serve(mut config: Config, server: Server) -> Result<(), CliError> {
    config.max_state_bytes = server.max_state_bytes;
    server.run(ReqAck::new(config)).await
}
