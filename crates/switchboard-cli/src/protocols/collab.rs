//! `--protocol collab`: its flags are `switchboard_collab::Config` (feature `cli`). The WebSocket
//! frame limit defaults to what a full-text change of a maximal document needs
//! (6 × `--collab-max-document-bytes` + 64 KiB); `--max-frame-bytes` overrides it.

use switchboard_collab::{Collab, Config};

use crate::CliError;
use crate::runtime::Server;

pub(crate) async fn serve(mut config: Config, server: Server) -> Result<(), CliError> {
    config.max_state_bytes = server.max_state_bytes;
    server.run(Collab::new(config)).await
}
