//! The maintenance console: an HTML page, its script (`console.js`), its strings in Simplified
//! Chinese and English (`i18n.js`, one table) and its style sheet (`console.css`), built into the
//! binary (`include_str!`, no Node build) and served by the API listener at `/`, `/console.js`,
//! `/i18n.js` and `/console.css`. The page carries no inline script or style, so its
//! Content-Security-Policy needs no `unsafe-inline`. It logs in with a bearer token (kept in the
//! tab's sessionStorage) and polls the JSON API every two seconds; the language (Chinese by
//! default when the browser asks for it) is remembered in localStorage.
//!
//! This module holds the files and their answers; the API's route table serves them
//! (`api/assets.rs`), so the console knows nothing of the API's types.

use actix_web::HttpResponse;

/// The page.
pub const PAGE: &str = include_str!("console.html");
/// The page's script.
pub const SCRIPT: &str = include_str!("console.js");
/// Every string the console shows, per language: a line `window.I18N = {"zh-CN": {...}, "en": {...}};`
/// with a JSON object between the prefix and the final `;` (a test reads it as JSON).
pub const STRINGS: &str = include_str!("i18n.js");
/// The page's style sheet.
pub const STYLE: &str = include_str!("console.css");

/// The page's policy: everything from this origin, nothing inline, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; frame-ancestors 'none'";

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Content-Security-Policy", CSP))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("X-Frame-Options", "DENY"))
        // The console and the binary change together: a browser asks again after an upgrade.
        .insert_header(("Cache-Control", "no-cache"))
        .body(body)
}

/// The page's answer.
pub fn page() -> HttpResponse {
    asset("text/html; charset=utf-8", PAGE)
}

/// The script's answer.
pub fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// The strings' answer.
pub fn strings() -> HttpResponse {
    asset("text/javascript; charset=utf-8", STRINGS)
}

/// The style sheet's answer.
pub fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE)
}
