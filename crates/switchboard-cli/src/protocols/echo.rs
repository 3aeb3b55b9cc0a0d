//! `--protocol echo`: no options of its own; `--max-frame-bytes` overrides its 16 MiB limit.

use switchboard_echo::Echo;

use crate::CliError;
use crate::runtime::Server;

pub(crate) async fn serve(server: Server) -> Result<(), CliError> {
    server.run(Echo::new()).await
}
