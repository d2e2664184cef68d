//! # Odd requests
//!
//! Two checks wrapped around every route, so that no handler has to remember them:
//!
//! - **The URI first.** A path whose percent-decoded bytes are not UTF-8, or hold a NUL, is a
//!   400 naming `path`; a query string likewise (a NUL names its parameter, non-UTF-8 names
//!   `query`). Path segments and query parameters reach handlers only once they are text
//!   PostgreSQL can store.
//! - **Every error is JSON.** A 4xx or 5xx answer that is not already JSON (axum's own
//!   rejections: a body over the limit, a path that does not parse, a wrong method on a
//!   route's extractor...) is rewritten as `{"error": <its text>, "field": null}`, with its
//!   status and its `Allow`, `Retry-After` and `WWW-Authenticate` headers kept.

use super::error::ApiError;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use gantry_shared::api::ErrorBody;

/// The longest error text kept from a non-JSON error body.
const MAX_ERROR_TEXT: usize = 16 * 1024;

/// The middleware (`axum::middleware::from_fn`).
pub async fn json_errors(req: Request, next: Next) -> Response {
    if let Err(e) = check_uri(req.uri()) {
        return e.into_response();
    }
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&resp) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, MAX_ERROR_TEXT).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let error = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut out = (status, axum::Json(ErrorBody { error, field: None })).into_response();
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

fn is_json(resp: &Response<Body>) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The path and query string as text: UTF-8 once percent-decoded, and no NUL.
fn check_uri(uri: &axum::http::Uri) -> Result<(), ApiError> {
    match String::from_utf8(percent_decode(uri.path().as_bytes(), false)) {
        Err(_) => {
            return Err(ApiError::bad(
                "path",
                "the path is not valid UTF-8 once percent-decoded",
            ));
        }
        Ok(p) if p.contains('\0') => {
            return Err(ApiError::bad("path", gantry_shared::nul::MESSAGE));
        }
        Ok(_) => {}
    }
    let Some(query) = uri.query() else {
        return Ok(());
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Ok(k), Ok(v)) = (
            String::from_utf8(percent_decode(k.as_bytes(), true)),
            String::from_utf8(percent_decode(v.as_bytes(), true)),
        ) else {
            return Err(ApiError::bad(
                "query",
                "the query string is not valid UTF-8 once percent-decoded",
            ));
        };
        if k.contains('\0') {
            return Err(ApiError::bad("query", gantry_shared::nul::MESSAGE));
        }
        if v.contains('\0') {
            return Err(ApiError::bad(k, gantry_shared::nul::MESSAGE));
        }
    }
    Ok(())
}

/// `%XX` to its byte (a malformed escape stays as it is); `+` to a space in a query.
fn percent_decode(raw: &[u8], plus_is_space: bool) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' if i + 2 < raw.len() => match (hex(raw[i + 1]), hex(raw[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_checks() {
        assert_eq!(percent_decode(b"a%20b+c", true), b"a b c");
        assert_eq!(percent_decode(b"%", false), b"%");
        assert_eq!(percent_decode(b"%4", false), b"%4");
        assert_eq!(percent_decode(b"%zz%41", false), b"%zzA");
        let uri = |s: &str| s.parse::<axum::http::Uri>().unwrap();
        assert!(check_uri(&uri("/api/tasks/abc?limit=5")).is_ok());
        assert!(check_uri(&uri("/api/tasks/%FF")).is_err());
        assert!(check_uri(&uri("/api/tasks/a%00b")).is_err());
        match check_uri(&uri("/api/tasks?state=a%00")) {
            Err(ApiError::BadRequest { field, .. }) => assert_eq!(field.as_deref(), Some("state")),
            other => panic!("{other:?}"),
        }
        assert!(check_uri(&uri("/api/tasks?limit=%C3")).is_err());
    }
}
