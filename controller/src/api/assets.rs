//! `GET /`, `/console.js`, `/i18n.js`, `/console.css`: the maintenance console's files
//! ([`crate::console`]) as API routes, behind the same [`Caller`] extractor as every route.

use actix_web::HttpResponse;

use super::Caller;

pub async fn page(_c: Caller) -> HttpResponse {
    crate::console::page()
}

pub async fn script(_c: Caller) -> HttpResponse {
    crate::console::script()
}

pub async fn strings(_c: Caller) -> HttpResponse {
    crate::console::strings()
}

pub async fn style(_c: Caller) -> HttpResponse {
    crate::console::style()
}
