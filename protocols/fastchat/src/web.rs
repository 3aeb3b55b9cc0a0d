//! The browser demo page served at `GET /` (assets compiled into the binary from `web/`).

use switchboard_core::web::{Asset, serve_assets};
use switchboard_core::{HttpRequest, HttpResponse};

const ASSETS: &[Asset] = &[
    Asset::html("/", include_str!("../web/index.html")),
    Asset::js("/app.js", include_str!("../web/app.js")),
    Asset::css("/style.css", include_str!("../web/style.css")),
    // The protocol's AsyncAPI document, kept in docs/asyncapi/ (checked against real frames by
    // e2e/contract/asyncapi.test.mjs).
    Asset::asyncapi(include_str!("../../../docs/asyncapi/fastchat.json")),
];

/// The page, its assets and `/asyncapi.json` (405 for methods other than GET/HEAD); `None`
/// for any other path.
pub(crate) fn serve(request: &HttpRequest) -> Option<HttpResponse> {
    serve_assets(request, ASSETS)
}
