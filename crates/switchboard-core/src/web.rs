//! Serving a protocol's demo page: static files compiled into the binary.

use crate::{HttpRequest, HttpResponse};

/// One static file of a demo page, usually `include_str!`-ed from the crate's `web/` folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Request path, e.g. `/` or `/app.js`.
    pub path: &'static str,
    /// `Content-Type` header value.
    pub content_type: &'static str,
    /// The file.
    pub body: &'static str,
}

impl Asset {
    /// An HTML document.
    pub const fn html(path: &'static str, body: &'static str) -> Self {
        Self {
            path,
            content_type: "text/html; charset=utf-8",
            body,
        }
    }

    /// A JavaScript file.
    pub const fn js(path: &'static str, body: &'static str) -> Self {
        Self {
            path,
            content_type: "text/javascript; charset=utf-8",
            body,
        }
    }

    /// A stylesheet.
    pub const fn css(path: &'static str, body: &'static str) -> Self {
        Self {
            path,
            content_type: "text/css; charset=utf-8",
            body,
        }
    }

    /// The protocol's AsyncAPI document, served at `/asyncapi.json` (every protocol keeps its
    /// document in the repository's `docs/asyncapi/` and `include_str!`s it, so the file is the
    /// only copy).
    pub const fn asyncapi(body: &'static str) -> Self {
        Self {
            path: "/asyncapi.json",
            content_type: "application/json",
            body,
        }
    }
}

/// Answers a request for one of `assets` (`/index.html` is another name for `/`): 200 for `GET`
/// and `HEAD`, 405 for any other method. `None` for any other path, so the protocol's own routes
/// (and finally the runtime's 404) get their turn.
pub fn serve_assets(request: &HttpRequest, assets: &[Asset]) -> Option<HttpResponse> {
    let path = if request.path == "/index.html" {
        "/"
    } else {
        request.path.as_str()
    };
    let asset = assets.iter().find(|asset| asset.path == path)?;
    if request.method != "GET" && request.method != "HEAD" {
        return Some(HttpResponse::json_error(405, "method not allowed"));
    }
    Some(HttpResponse::new(200, asset.content_type, asset.body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str) -> HttpRequest {
        HttpRequest {
            method: method.into(),
            path: path.into(),
            query: None,
            body: Default::default(),
            host: None,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            caller: crate::Caller::Open,
        }
    }

    #[test]
    fn serves_known_paths_and_refuses_other_methods() {
        let assets = [Asset::html("/", "<p>hi</p>"), Asset::js("/app.js", "1")];
        let page = serve_assets(&request("GET", "/index.html"), &assets).unwrap();
        assert_eq!(
            (page.status, page.content_type),
            (200, "text/html; charset=utf-8")
        );
        assert_eq!(
            serve_assets(&request("HEAD", "/app.js"), &assets)
                .unwrap()
                .status,
            200
        );
        assert_eq!(
            serve_assets(&request("POST", "/"), &assets).unwrap().status,
            405
        );
        assert!(serve_assets(&request("GET", "/nope"), &assets).is_none());
    }
}
