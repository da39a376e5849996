//! The web dashboard's static files, compiled into the binary and served
//! by every agent at `/ui/` on the API's port.
//!
//! The files are plain HTML, CSS and JavaScript written by hand (no build
//! step, nothing fetched from elsewhere: clusters are often air-gapped).
//! They hold no data: every view reads the API with the token the user
//! pastes, so these routes are open (`auth::access`). Each answer carries a
//! strict Content-Security-Policy (this origin only, no inline code), so a
//! name or message that reaches the page can never run as script.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use crate::ApiError;

/// Every file: its name under `/ui/`, its media type and its bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("index.html", "text/html; charset=utf-8", include_bytes!("../ui/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../ui/app.js")),
    ("i18n.js", "text/javascript; charset=utf-8", include_bytes!("../ui/i18n.js")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../ui/style.css")),
];

/// Scripts, styles, images and API calls from this origin only; no frames,
/// no plugins, no forms posting elsewhere, no `<base>` rewriting.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// `GET /ui`: the dashboard lives at `/ui/` (relative asset paths).
pub async fn ui_root() -> Redirect {
    Redirect::permanent("/ui/")
}

/// `GET /ui/`: the page.
pub async fn ui_index() -> Response {
    asset("index.html")
}

/// `GET /ui/{asset}`: one of the files, else 404 TND-1005.
pub async fn ui_asset(Path(name): Path<String>) -> Response {
    asset(&name)
}

fn asset(name: &str) -> Response {
    let Some((_, mime, body)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return ApiError::RouteNotFound { method: "GET".into(), path: format!("/ui/{name}") }.into_response();
    };
    let mut resp = (StatusCode::OK, *body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // The files change with the binary: a browser checks again each time
    // rather than run an old script against a newer API.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_asset_has_its_type_and_the_security_headers() {
        for (name, mime, _) in ASSETS {
            let r = asset(name);
            assert_eq!(r.status(), StatusCode::OK, "{name}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], *mime);
            assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert!(r.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("script-src 'self'"));
        }
        assert_eq!(asset("../Cargo.toml").status(), StatusCode::NOT_FOUND);
        assert_eq!(asset("").status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere() {
        let html = std::str::from_utf8(ASSETS[0].2).unwrap();
        assert!(!html.contains("<script>") && !html.contains("style="), "inline code is refused by the CSP");
        for (name, _, body) in ASSETS {
            // SVG's namespace is a name, not a place anything is loaded from.
            let text = std::str::from_utf8(body).unwrap().replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://") && !text.contains("https://"), "{name} refers to another origin");
        }
    }
}
