//! `--protocol teambot-sim`: the teambot server simulator (scenario, chaos, scorecard); its
//! flags are `switchboard_teambot::sim::SimConfig` (feature `cli`).
#![allow(
    clippy::print_stdout,
    reason = "the final scorecard is the command's output"
)]

use std::sync::Arc;

use switchboard_teambot::sim::{SimConfig, TeambotSim};

use crate::CliError;
use crate::runtime::Server;

pub(crate) async fn serve(mut config: SimConfig, server: Server) -> Result<(), CliError> {
    // The simulator's team sockets carry its own one-time `?token=`s, which the runtime would
    // take for JWTs; a test server has no users to sign for anyway.
    if server.config.auth.is_some() {
        return Err(CliError::Failed(
            "--auth-jwt-* is not supported with --protocol teambot-sim (it authenticates team \
             sockets with its own one-time tokens)"
                .into(),
        ));
    }
    config.max_state_bytes = server.max_state_bytes;
    let sim = Arc::new(TeambotSim::new(config));
    let watcher = sim.clone();
    // The scenario starts with the first global connection; when it ends, print the scorecard.
    // The server keeps serving GET /scorecard until SIGINT/SIGTERM.
    tokio::spawn(async move {
        let card = watcher.finished().await;
        match serde_json::to_string_pretty(&card) {
            Ok(json) => println!("{json}"),
            Err(error) => tracing::warn!(%error, "could not encode the scorecard"),
        }
    });
    server.run_shared(sim).await
}
