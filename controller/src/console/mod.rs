//! The maintenance console: one HTML page with its script and style built into the binary
//! (`include_str!`, no Node build), served at `/` by the API listener. It logs in with a bearer
//! token (kept in the tab's sessionStorage) and polls the JSON API every two seconds.

use actix_web::HttpResponse;

use crate::api::Caller;

const PAGE: &str = include_str!("console.html");

pub async fn page(_c: Caller) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((
            "Content-Security-Policy",
            "default-src 'self'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline'",
        ))
        .insert_header(("X-Frame-Options", "DENY"))
        .body(PAGE)
}
