//! The live simulator dashboard served at `GET /` (assets compiled into the binary from `web/`).

use switchboard_core::{HttpRequest, HttpResponse};

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

/// The demo page and its assets; `None` for any other path.
pub(crate) fn serve(request: &HttpRequest) -> Option<HttpResponse> {
    let (content_type, body) = match request.path.as_str() {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "/app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "/style.css" => ("text/css; charset=utf-8", STYLE_CSS),
        _ => return None,
    };
    if request.method != "GET" && request.method != "HEAD" {
        return Some(HttpResponse::json_error(405, "method not allowed"));
    }
    Some(HttpResponse::new(200, content_type, body))
}
