//! The browser demo client served at `GET /`: plain HTML, CSS and JavaScript compiled into the
//! binary (no files to deploy, no CDN). Code runs in a Web Worker in the browser, never here.

use switchboard_core::{HttpRequest, HttpResponse};

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const OT_JS: &str = include_str!("../web/ot.js");
const RUNNER_JS: &str = include_str!("../web/runner.js");
const STYLE_CSS: &str = include_str!("../web/style.css");

/// Answers `GET`/`HEAD` for the demo page and its assets; `None` for every other request.
pub(crate) fn serve(request: &HttpRequest) -> Option<HttpResponse> {
    if request.method != "GET" && request.method != "HEAD" {
        return None;
    }
    let (content_type, body) = match request.path.as_str() {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "/app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "/ot.js" => ("text/javascript; charset=utf-8", OT_JS),
        "/runner.js" => ("text/javascript; charset=utf-8", RUNNER_JS),
        "/style.css" => ("text/css; charset=utf-8", STYLE_CSS),
        _ => return None,
    };
    Some(HttpResponse::new(200, content_type, body))
}
