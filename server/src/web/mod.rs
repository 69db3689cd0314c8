//! The community gallery: server-rendered pages over the service's jobs and
//! clips, with accounts. No build step: the CSS and the small script are
//! compiled into the binary.
//!
//! Security rules, all enforced here: every form post (sign-up and login
//! included) carries the CSRF token (double-submit: an HttpOnly
//! SameSite=Strict cookie whose value each form repeats), every write needs a
//! session besides; members act only on their own jobs; every piece
//! of user text is escaped ([`html::esc`]); every response carries a CSP
//! without inline script, `frame-ancestors 'none'` and `nosniff`.

pub(crate) mod html;
mod pages;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::accounts::{RateLimiter, User};
use crate::api::{ApiError, AppState};

pub(crate) const SESSION_COOKIE: &str = "motif_session";
pub(crate) const CSRF_COOKIE: &str = "motif_csrf";

/// Gallery settings of `motif serve`.
#[derive(Debug, Clone)]
pub struct WebOptions {
    /// How long a login lasts.
    pub session: Duration,
    /// Failed logins to one account name allowed per `login_window`.
    pub login_failures: usize,
    /// Failed logins from one client address, to any names, allowed per
    /// `login_window`: the per-name limit alone lets one client try a
    /// password against every account.
    pub login_failures_per_ip: usize,
    pub login_window: Duration,
    /// Sign-ups (forms that reach the password hash) from one client
    /// address allowed per `signup_window`.
    pub signups_per_address: usize,
    pub signup_window: Duration,
    /// Clips on one gallery page.
    pub page_size: usize,
}

impl Default for WebOptions {
    fn default() -> Self {
        WebOptions {
            session: Duration::from_secs(14 * 24 * 3600),
            login_failures: 5,
            login_failures_per_ip: 20,
            login_window: Duration::from_secs(15 * 60),
            signups_per_address: 10,
            signup_window: Duration::from_secs(3600),
            page_size: 24,
        }
    }
}

#[derive(Clone)]
pub(crate) struct WebState {
    pub app: AppState,
    pub options: Arc<WebOptions>,
    /// Failed logins per account name.
    pub limiter: Arc<RateLimiter>,
    /// Failed logins per client address ([`crate::accounts::client_key`]).
    pub ip_limiter: Arc<RateLimiter>,
    /// Sign-ups per client address.
    pub signup_limiter: Arc<RateLimiter>,
}

/// The API's routes and the gallery's, with the security headers on every answer.
pub(crate) fn app(api: Router, state: AppState, options: WebOptions) -> Router {
    let retry_after = state.retry_after;
    let web = WebState {
        app: state,
        limiter: Arc::new(RateLimiter::new(
            options.login_failures,
            options.login_window,
        )),
        ip_limiter: Arc::new(RateLimiter::new(
            options.login_failures_per_ip,
            options.login_window,
        )),
        signup_limiter: Arc::new(RateLimiter::new(
            options.signups_per_address,
            options.signup_window,
        )),
        options: Arc::new(options),
    };
    pages::routes()
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(
            web.clone(),
            error_page_frame,
        ))
        .layer(middleware::from_fn(csrf_cookie))
        .with_state(web)
        .merge(api)
        .layer(middleware::from_fn(security_headers))
        .layer(middleware::map_response(move |response: Response| {
            retry_unavailable(response, retry_after)
        }))
}

/// A 503 (the database unreachable) says when to try again, on every path.
async fn retry_unavailable(mut response: Response, retry_after: u64) -> Response {
    if response.status() == StatusCode::SERVICE_UNAVAILABLE
        && !response.headers().contains_key(header::RETRY_AFTER)
    {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    }
    response
}

/// Paths of the API and the Discord endpoint, whose clients read JSON.
fn is_api_path(path: &str) -> bool {
    path == "/api/v1"
        || path.starts_with("/api/v1/")
        || path == "/discord"
        || path.starts_with("/discord/")
}

/// Any path no route serves: the API's JSON 404 under the API's prefixes,
/// where clients parse the answer, and the gallery's 404 page elsewhere.
async fn no_route(uri: Uri) -> Response {
    let path = uri.path();
    if is_api_path(path) {
        crate::api::not_found().await.into_response()
    } else {
        PageError::new(
            StatusCode::NOT_FOUND,
            format!("There is no page at {path}."),
        )
        .into_response()
    }
}

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// The visitor's CSRF secret, from their cookie or new on this response.
#[derive(Clone)]
struct Csrf(String);

/// Gives every visitor a CSRF cookie; forms repeat its value.
async fn csrf_cookie(mut request: Request, next: Next) -> Response {
    // The API's 404s come through here (the gallery's fallback answers
    // them); its clients get no cookie.
    if is_api_path(request.uri().path()) {
        return next.run(request).await;
    }
    let existing = cookie(request.headers(), CSRF_COOKIE)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()));
    let (value, new) = match existing {
        Some(v) => (v, false),
        None => (crate::random_hex(32), true),
    };
    request.extensions_mut().insert(Csrf(value.clone()));
    let mut response = next.run(request).await;
    if new {
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{CSRF_COOKIE}={value}; Path=/; HttpOnly; Secure; SameSite=Strict"
        )) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

/// What an error page says, left on its response by [`PageError`], which is
/// made where the visitor is not known.
#[derive(Clone)]
struct ErrorNotice {
    title: String,
    message: String,
}

fn error_body(title: &str, message: &str) -> String {
    format!(
        r#"<section class="narrow notice"><h1>{}</h1><p>{}</p><p><a href="/">Back to the gallery</a></p></section>"#,
        html::esc(title),
        html::esc(message)
    )
}

/// Draws error pages again in the visitor's frame, as every other page is:
/// a member keeps their name, links and logout form.
async fn error_page_frame(State(state): State<WebState>, request: Request, next: Next) -> Response {
    let session = cookie(request.headers(), SESSION_COOKIE);
    let csrf = request
        .extensions()
        .get::<Csrf>()
        .map(|c| c.0.clone())
        .unwrap_or_default();
    let mut response = next.run(request).await;
    let Some(notice) = response.extensions_mut().remove::<ErrorNotice>() else {
        return response;
    };
    let user = match session {
        Some(secret) => state.app.db.session_user(&secret).await.ok().flatten(),
        None => None,
    };
    let frame = html::Frame {
        user: user.as_ref(),
        csrf: &csrf,
    };
    let page = html::page(
        &frame,
        &notice.title,
        &error_body(&notice.title, &notice.message),
    );
    response.headers_mut().remove(header::CONTENT_LENGTH);
    *response.body_mut() = Body::from(page);
    response
}

/// A cookie's value from the request.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Equal strings, compared in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Who is asking: the member of a live session (if any) and the CSRF secret.
pub(crate) struct Visitor {
    pub user: Option<User>,
    pub csrf: String,
}

impl Visitor {
    pub fn frame(&self) -> html::Frame<'_> {
        html::Frame {
            user: self.user.as_ref(),
            csrf: &self.csrf,
        }
    }

    /// Refuses a write whose CSRF token is missing or wrong.
    pub fn check_csrf(&self, given: Option<&str>) -> Result<(), PageError> {
        match given {
            Some(g) if same_secret(g, &self.csrf) => Ok(()),
            Some(_) => Err(PageError::new(
                StatusCode::FORBIDDEN,
                "The form's security token is wrong. Reload the page and try again.",
            )),
            None => Err(PageError::new(
                StatusCode::FORBIDDEN,
                "The form's security token is missing. Reload the page and try again.",
            )),
        }
    }

    /// The member, or 401 for a visitor without a live session.
    pub fn member(&self) -> Result<&User, PageError> {
        self.user.as_ref().ok_or_else(|| {
            PageError::new(
                StatusCode::UNAUTHORIZED,
                "Log in first (or your session has expired).",
            )
        })
    }
}

impl FromRequestParts<WebState> for Visitor {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &WebState) -> Result<Self, PageError> {
        let csrf = parts
            .extensions
            .get::<Csrf>()
            .map(|c| c.0.clone())
            .unwrap_or_default();
        let user = match cookie(&parts.headers, SESSION_COOKIE) {
            Some(secret) => state.app.db.session_user(&secret).await?,
            None => None,
        };
        Ok(Visitor { user, csrf })
    }
}

/// An error shown as a page (for form posts and page loads), in the
/// visitor's frame once [`error_page_frame`] has seen it.
#[derive(Debug)]
pub(crate) struct PageError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl PageError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        PageError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn not_found() -> Self {
        PageError::new(StatusCode::NOT_FOUND, "No such clip.")
    }
}

impl From<anyhow::Error> for PageError {
    fn from(e: anyhow::Error) -> Self {
        if crate::db::is_unavailable(&e) {
            eprintln!("motif serve: database unreachable: {e:#}");
            return PageError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "The server cannot reach its database right now. Please try again shortly.",
            );
        }
        eprintln!("motif serve: internal error: {e:#}");
        PageError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong on the server.",
        )
    }
}

/// The same status and message as JSON, for the create page's script.
impl From<PageError> for ApiError {
    fn from(e: PageError) -> Self {
        ApiError::new(e.status, e.message)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        // Drawn for nobody here; [`error_page_frame`] draws it again for the
        // visitor on the gallery's routes.
        let frame = html::Frame {
            user: None,
            csrf: "",
        };
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = error_body(title, &self.message);
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html::page(&frame, title, &body),
        )
            .into_response();
        response.extensions_mut().insert(ErrorNotice {
            title: title.to_string(),
            message: self.message,
        });
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
