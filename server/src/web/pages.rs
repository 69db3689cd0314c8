//! The gallery's pages and form actions.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::LazyLock;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, RequestExt, Router};
use serde_json::{json, Value};

use super::html::{age, csrf_field, esc, options, page, post_button, url_param};
use super::{PageError, Visitor, WebState, SESSION_COOKIE};
use crate::accounts::{self, web_token_id, User};
use crate::api::{self, ApiError};
use crate::db::{self, now_ms, JobRow};
use crate::gallery::{Clip, Search, Sort};

/// The camera moves by name, for the create form and the gallery filter.
static CAMERAS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    (motif_recipe::CameraMove::ALL.iter())
        .map(|c| c.name())
        .collect()
});

const STYLE_CSS: &str = include_str!("../../assets/style.css");
const APP_JS: &str = include_str!("../../assets/app.js");

/// The style presets' names, for the create form and the gallery filter.
/// The presets live with the CLI (`assets/styles.json`, read by
/// `src/catalog.rs`); the server crate only needs their names.
static STYLES: LazyLock<Vec<String>> = LazyLock::new(|| {
    match serde_json::from_str::<Value>(include_str!("../../../assets/styles.json")) {
        Ok(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
});

/// The viewer's aspect buttons.
const ASPECTS: [&str; 4] = ["16:9", "9:16", "1:1", "4:5"];
const RECIPE_ORDER: [&str; 15] = [
    "prompt",
    "negative",
    "style",
    "camera",
    "motion",
    "aspect",
    "seed",
    "steps",
    "width",
    "height",
    "frames",
    "fps",
    "guidance",
    "scheduler",
    "model",
];
const MAX_REPORT_CHARS: usize = 500;

pub(super) fn routes() -> Router<WebState> {
    Router::new()
        .route("/", get(gallery))
        .route("/clips/{id}", get(clip_page))
        .route("/clips/{id}/video", get(clip_video))
        .route("/clips/{id}/like", post(like))
        .route("/clips/{id}/report", post(report))
        .route("/clips/{id}/hide", post(hide))
        .route("/jobs/{id}/publish", post(publish))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/delete", post(delete))
        .route("/create", get(create_page))
        .route("/create/jobs", post(create_job))
        .route("/create/jobs/{id}/events", get(create_events))
        .route("/me", get(me))
        .route("/me/tokens", post(new_token))
        .route("/me/tokens/{id}/revoke", post(revoke_token))
        .route("/admin/reports", get(reports))
        .route("/signup", get(signup_page).post(signup))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/style.css", get(style_css))
        .route("/assets/app.js", get(app_js))
}

type PageResult = Result<Response, PageError>;

fn html_page(visitor: &Visitor, title: &str, body: &str) -> Response {
    Html(page(&visitor.frame(), title, body)).into_response()
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

fn bad_request(message: impl Into<String>) -> PageError {
    PageError::new(StatusCode::BAD_REQUEST, message)
}

/// The fields of a urlencoded form body.
fn form(body: &Bytes) -> Result<HashMap<String, String>, PageError> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .map(|pairs| pairs.into_iter().collect())
        .map_err(|e| bad_request(format!("unreadable form: {e}")))
}

/// A form post by any visitor (sign-up and login included): its fields, once
/// the CSRF token checks out. An unreadable form is 400, a missing or wrong
/// token 403.
struct CheckedForm {
    visitor: Visitor,
    fields: HashMap<String, String>,
}

impl FromRequest<WebState> for CheckedForm {
    type Rejection = Response;

    async fn from_request(mut request: Request, state: &WebState) -> Result<Self, Response> {
        let visitor: Visitor = request
            .extract_parts_with_state(state)
            .await
            .map_err(IntoResponse::into_response)?;
        let body = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let fields = form(&body).map_err(IntoResponse::into_response)?;
        visitor
            .check_csrf(fields.get("csrf").map(String::as_str))
            .map_err(IntoResponse::into_response)?;
        Ok(CheckedForm { visitor, fields })
    }
}

/// A form post by a member: a [`CheckedForm`] whose visitor has a live
/// session, else 401. The token is checked first, so a forged post is 403
/// whether or not its visitor is signed in.
struct MemberForm {
    visitor: Visitor,
    user: User,
    fields: HashMap<String, String>,
}

impl FromRequest<WebState> for MemberForm {
    type Rejection = Response;

    async fn from_request(request: Request, state: &WebState) -> Result<Self, Response> {
        let CheckedForm { visitor, fields } = CheckedForm::from_request(request, state).await?;
        let user = visitor
            .member()
            .map_err(IntoResponse::into_response)?
            .clone();
        Ok(MemberForm {
            visitor,
            user,
            fields,
        })
    }
}

fn may_see(clip: &Clip, user: Option<&User>) -> bool {
    !clip.hidden || user.is_some_and(|u| u.admin || u.id == clip.user_id)
}

/// A published clip this visitor may see.
async fn visible_clip(state: &WebState, visitor: &Visitor, id: &str) -> Result<Clip, PageError> {
    match state.app.db.clip(id).await? {
        Some(c) if may_see(&c, visitor.user.as_ref()) => Ok(c),
        _ => Err(PageError::not_found()),
    }
}

/// A job of this member. Another member's job is "forbidden" where its clip
/// is public anyway, else "not found", so that unpublished jobs stay unseen.
async fn own_job(state: &WebState, user: &User, id: &str) -> Result<JobRow, PageError> {
    let db = &state.app.db;
    let job = db.job(id).await?.ok_or_else(PageError::not_found)?;
    if db.job_owner(id).await?.as_deref() == Some(user.id.as_str()) {
        return Ok(job);
    }
    match db.clip(id).await? {
        Some(c) if may_see(&c, Some(user)) => Err(PageError::new(
            StatusCode::FORBIDDEN,
            "This clip belongs to another member.",
        )),
        _ => Err(PageError::not_found()),
    }
}

fn request_of(job: &JobRow) -> serde_json::Map<String, Value> {
    match serde_json::from_str::<Value>(&job.request) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

fn text_of(map: &serde_json::Map<String, Value>, key: &str) -> String {
    match map.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

// ---------------------------------------------------------------- gallery

fn clip_card(clip: &Clip, now: i64) -> String {
    let id = esc(&clip.job_id);
    let mut tags = String::new();
    for t in [&clip.style, &clip.camera] {
        if !t.is_empty() {
            let _ = write!(tags, r#"<span class="tag">{}</span>"#, esc(t));
        }
    }
    format!(
        r#"<a class="card" href="/clips/{id}">
<video class="hover-play" src="/clips/{id}/video" muted loop playsinline preload="metadata"></video>
<div class="card-meta"><p class="prompt">{prompt}</p>
<p class="byline"><span>{author}</span><span>{age}</span><span class="likes">♥ {likes}</span>{hidden}</p>
<p class="tags">{tags}</p></div></a>"#,
        prompt = esc(&clip.prompt),
        author = esc(&clip.author),
        age = esc(&age(clip.published_ms, now)),
        likes = clip.likes,
        hidden = if clip.hidden {
            r#"<span class="tag warn">hidden</span>"#
        } else {
            ""
        },
    )
}

async fn gallery(
    State(state): State<WebState>,
    visitor: Visitor,
    Query(query): Query<HashMap<String, String>>,
) -> PageResult {
    let q = query
        .get("q")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if q.chars().count() > 200 {
        return Err(bad_request("the search is longer than 200 characters"));
    }
    let words: Vec<String> = q.split_whitespace().take(8).map(str::to_string).collect();
    let pick = |key: &str, allowed: &[&str]| -> Result<Option<String>, PageError> {
        match query.get(key).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(v) if allowed.contains(&v) => Ok(Some(v.to_string())),
            Some(v) => Err(bad_request(format!("unknown {key} `{v}`"))),
        }
    };
    let styles: Vec<&str> = STYLES.iter().map(String::as_str).collect();
    let style = pick("style", &styles)?;
    let camera = pick("camera", &CAMERAS)?;
    let sort = match query.get("sort").map(String::as_str) {
        None | Some("") | Some("new") => Sort::Newest,
        Some("liked") => Sort::MostLiked,
        Some(v) => return Err(bad_request(format!("unknown order `{v}` (new or liked)"))),
    };
    let page_number: i64 = match query.get("page") {
        None => 1,
        Some(p) => p
            .parse()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| bad_request("page: expected a number from 1"))?,
    };
    let page_size = state.options.page_size as i64;
    let search = Search {
        words,
        style: style.clone(),
        camera: camera.clone(),
        sort,
        offset: (page_number - 1) * page_size,
        limit: page_size + 1,
        include_hidden: visitor.user.as_ref().is_some_and(|u| u.admin),
    };
    let mut clips = state.app.db.search_clips(&search).await?;
    let more = clips.len() as i64 > page_size;
    clips.truncate(page_size as usize);

    let now = now_ms();
    let sort_options = format!(
        r#"<option value="new"{}>Newest</option><option value="liked"{}>Most liked</option>"#,
        if sort == Sort::Newest {
            " selected"
        } else {
            ""
        },
        if sort == Sort::MostLiked {
            " selected"
        } else {
            ""
        },
    );
    let mut body = format!(
        r#"<section class="hero"><h1>Clips from the community</h1><p>Hover to play. Open one to see exactly how it was made, then remix it.</p></section>
<form class="filters" method="get" action="/" role="search">
<input type="search" name="q" value="{q}" placeholder="Search prompts…" aria-label="Search prompts">
<select name="style" aria-label="Style">{styles}</select>
<select name="camera" aria-label="Camera">{cameras}</select>
<select name="sort" aria-label="Order">{sort_options}</select>
<button type="submit">Search</button>
</form>"#,
        q = esc(&q),
        styles = options("Any style", &styles, style.as_deref()),
        cameras = options("Any camera", &CAMERAS, camera.as_deref()),
    );
    if clips.is_empty() {
        body.push_str(
            r#"<p class="empty">No clips here yet. <a href="/create">Make the first one.</a></p>"#,
        );
    } else {
        body.push_str(r#"<div class="grid">"#);
        for c in &clips {
            body.push_str(&clip_card(c, now));
        }
        body.push_str("</div>");
    }
    // Paging links keep the search.
    let link = |n: i64| {
        let mut l = format!("/?page={n}");
        for (k, v) in [
            ("q", Some(q.as_str())),
            ("style", style.as_deref()),
            ("camera", camera.as_deref()),
            ("sort", (sort == Sort::MostLiked).then_some("liked")),
        ] {
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                let _ = write!(l, "&{k}={}", url_param(v));
            }
        }
        l
    };
    body.push_str(r#"<nav class="pager">"#);
    if page_number > 1 {
        let _ = write!(
            body,
            r#"<a rel="prev" href="{}">← Newer</a>"#,
            esc(&link(page_number - 1))
        );
    }
    if more {
        let _ = write!(
            body,
            r#"<a rel="next" href="{}">More →</a>"#,
            esc(&link(page_number + 1))
        );
    }
    body.push_str("</nav>");
    Ok(html_page(&visitor, "Gallery", &body))
}

// ---------------------------------------------------------------- a clip

async fn clip_page(
    State(state): State<WebState>,
    visitor: Visitor,
    Path(id): Path<String>,
) -> PageResult {
    let clip = visible_clip(&state, &visitor, &id).await?;
    let job = state
        .app
        .db
        .job(&id)
        .await?
        .ok_or_else(PageError::not_found)?;
    let frame = visitor.frame();
    let recipe: Value = match &job.recipe {
        Some(name) => match api::read_stored(&state.app, name).await {
            Ok(bytes) => serde_json::from_slice(&api::public_recipe(bytes)).unwrap_or(Value::Null),
            Err(e) => {
                eprintln!("motif serve: clip page {id}: {e:#}");
                Value::Null
            }
        },
        None => Value::Null,
    };
    let mut rows = String::new();
    if let Value::Object(map) = &recipe {
        // The fields of the create form first, in its order, then the rest.
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort_by_key(|k| {
            RECIPE_ORDER
                .iter()
                .position(|o| o == k)
                .unwrap_or(RECIPE_ORDER.len())
        });
        for k in keys {
            let v = &map[k];
            if v.is_null() || k == "format" || k == "motif_version" {
                continue;
            }
            if matches!(v, Value::Array(a) if a.is_empty()) {
                continue;
            }
            let text = match v {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            let _ = write!(rows, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&text));
        }
    }
    let mut actions = String::new();
    let _ = write!(
        actions,
        r#"<a class="button primary" href="/create?remix={}">Remix</a>"#,
        esc(&url_param(&id))
    );
    match &visitor.user {
        Some(user) => {
            let liked = state.app.db.likes_clip(&id, &user.id).await?;
            actions.push_str(&post_button(
                &frame,
                &format!("/clips/{id}/like"),
                if liked { "♥ Liked" } else { "♡ Like" },
                if liked { "liked" } else { "" },
            ));
            if user.id == clip.user_id {
                actions.push_str(&post_button(
                    &frame,
                    &format!("/jobs/{id}/delete"),
                    "Delete",
                    "danger",
                ));
            }
            if user.admin {
                let _ = write!(
                    actions,
                    r#"<form method="post" action="/clips/{}/hide" class="inline">{}<input type="hidden" name="hidden" value="{}"><button type="submit" class="danger">{}</button></form>"#,
                    esc(&id),
                    csrf_field(&visitor.csrf),
                    if clip.hidden { 0 } else { 1 },
                    if clip.hidden { "Unhide" } else { "Hide" }
                );
            }
        }
        None => actions.push_str(r#"<a class="button" href="/login">Log in to like</a>"#),
    }
    let report = match &visitor.user {
        Some(user) if user.id != clip.user_id => format!(
            r#"<details class="report"><summary>Report this clip</summary><form method="post" action="/clips/{}/report">{}<textarea name="reason" maxlength="{MAX_REPORT_CHARS}" required placeholder="What is wrong with it?"></textarea><button type="submit">Send report</button></form></details>"#,
            esc(&id),
            csrf_field(&visitor.csrf)
        ),
        _ => String::new(),
    };
    let body = format!(
        r#"<article class="clip-page">
<div class="stage"><video id="clip" src="/clips/{id}/video" controls autoplay muted loop playsinline></video></div>
<aside class="details">
<h1 class="prompt">{prompt}</h1>
<p class="byline"><span>by <strong>{author}</strong></span><span>{age}</span><span class="likes" id="likes">♥ {likes}</span>{hidden}</p>
<div class="actions">{actions}</div>
<h2>Recipe</h2>
<table class="recipe">{rows}</table>
<p><a href="/clips/{id}/video" download>Download the clip</a></p>
{report}
</aside>
</article>"#,
        id = esc(&id),
        prompt = esc(&clip.prompt),
        author = esc(&clip.author),
        age = esc(&age(clip.published_ms, now_ms())),
        likes = clip.likes,
        hidden = match (clip.hidden, clip.listed) {
            (true, _) => r#"<span class="tag warn">hidden</span>"#,
            (false, false) => {
                r#"<span class="tag" title="Shown on Discord; in the gallery once its author publishes it">unlisted</span>"#
            }
            (false, true) => "",
        },
    );
    Ok(html_page(&visitor, &clip.prompt, &body))
}

/// The clip file: anyone for a visible published clip, its owner and admins always.
async fn clip_video(
    State(state): State<WebState>,
    visitor: Visitor,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> PageResult {
    let db = &state.app.db;
    let job = db.job(&id).await?.ok_or_else(PageError::not_found)?;
    let allowed = match db.clip(&id).await? {
        Some(c) if may_see(&c, visitor.user.as_ref()) => true,
        _ => match &visitor.user {
            Some(u) => u.admin || db.job_owner(&id).await?.as_deref() == Some(u.id.as_str()),
            None => false,
        },
    };
    let name = match (&job.clip, allowed) {
        (Some(name), true) if job.state == db::FINISHED => name.clone(),
        _ => return Err(PageError::not_found()),
    };
    let bytes = api::read_stored(&state.app, &name).await?;
    let content_type = match job.format.as_str() {
        "gif" => "image/gif",
        "webp" => "image/webp",
        _ => "video/mp4",
    };
    Ok(ranged(bytes, content_type, &headers))
}

/// The one range `bytes=A-B`, `bytes=A-` or `bytes=-N` of a header, as asked.
enum ByteRange {
    /// No usable Range header (absent, several ranges, not bytes): the
    /// whole file, as RFC 9110 allows.
    Whole,
    /// Bytes `start..=end`.
    Part(usize, usize),
    /// A range that starts past the end of the file (or an empty suffix): 416.
    Unsatisfiable,
}

fn byte_range(headers: &HeaderMap, len: usize) -> ByteRange {
    let Some((a, b)) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .filter(|v| !v.contains(','))
        .and_then(|v| v.split_once('-'))
    else {
        return ByteRange::Whole;
    };
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => match suffix.parse::<usize>() {
            Ok(0) => return ByteRange::Unsatisfiable,
            Ok(n) => (len.saturating_sub(n), len.saturating_sub(1)),
            Err(_) => return ByteRange::Whole,
        },
        (a, b) => {
            let Ok(start) = a.parse::<usize>() else {
                return ByteRange::Whole;
            };
            let end = match b {
                "" => usize::MAX,
                b => match b.parse::<usize>() {
                    Ok(end) if end >= start => end,
                    // A last byte before the first is not a range: ignored.
                    _ => return ByteRange::Whole,
                },
            };
            (start, end.min(len.saturating_sub(1)))
        }
    };
    if len == 0 || start >= len {
        ByteRange::Unsatisfiable
    } else {
        ByteRange::Part(start, end)
    }
}

/// The bytes, or the one range `bytes=A-B` asked for (players seek with it);
/// 416 for a range past the end.
fn ranged(bytes: Vec<u8>, content_type: &str, headers: &HeaderMap) -> Response {
    let len = bytes.len();
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "private, max-age=60");
    let response = match byte_range(headers, len) {
        ByteRange::Part(start, end) => builder
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
            .body(Body::from(bytes[start..=end].to_vec())),
        ByteRange::Unsatisfiable => builder
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{len}"))
            .body(Body::empty()),
        ByteRange::Whole => builder.status(StatusCode::OK).body(Body::from(bytes)),
    };
    response.unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn like(
    State(state): State<WebState>,
    Path(id): Path<String>,
    MemberForm { visitor, user, .. }: MemberForm,
) -> PageResult {
    visible_clip(&state, &visitor, &id).await?;
    state.app.db.toggle_like(&id, &user.id).await?;
    Ok(see_other(&format!("/clips/{}", url_param(&id))))
}

async fn report(
    State(state): State<WebState>,
    Path(id): Path<String>,
    MemberForm {
        visitor,
        user,
        fields,
    }: MemberForm,
) -> PageResult {
    let clip = visible_clip(&state, &visitor, &id).await?;
    if clip.user_id == user.id {
        return Err(bad_request("you cannot report your own clip"));
    }
    let reason = fields.get("reason").map(|r| r.trim()).unwrap_or("");
    if reason.is_empty() || reason.chars().count() > MAX_REPORT_CHARS {
        return Err(bad_request(format!(
            "a report says what is wrong in 1 to {MAX_REPORT_CHARS} characters"
        )));
    }
    state.app.db.report(&id, &user.id, reason).await?;
    let body = format!(
        r#"<section class="narrow notice"><h1>Thank you</h1><p>The admins will look at this clip.</p><p><a href="/clips/{}">Back to the clip</a></p></section>"#,
        esc(&id)
    );
    Ok(html_page(&visitor, "Reported", &body))
}

async fn hide(
    State(state): State<WebState>,
    Path(id): Path<String>,
    MemberForm {
        visitor,
        user,
        fields,
    }: MemberForm,
) -> PageResult {
    let clip = visible_clip(&state, &visitor, &id).await?;
    if !user.admin {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "Only admins hide clips; report it instead.",
        ));
    }
    let hidden = fields.get("hidden").map(String::as_str) != Some("0");
    state.app.db.set_hidden(&clip.job_id, hidden).await?;
    Ok(see_other(&format!("/clips/{}", url_param(&id))))
}

async fn publish(
    State(state): State<WebState>,
    Path(id): Path<String>,
    MemberForm { user, .. }: MemberForm,
) -> PageResult {
    let job = own_job(&state, &user, &id).await?;
    if job.state != db::FINISHED || job.clip.is_none() {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            format!(
                "The job is {}: only a finished clip can be published.",
                job.state
            ),
        ));
    }
    state.app.db.publish_job(&job, &user.id).await?;
    Ok(see_other(&format!("/clips/{}", url_param(&id))))
}

async fn cancel(
    State(state): State<WebState>,
    Path(id): Path<String>,
    MemberForm { user, .. }: MemberForm,
) -> PageResult {
    let job = own_job(&state, &user, &id).await?;
    if job.state != db::QUEUED && job.state != db::RUNNING {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            format!("The job is already {}.", job.state),
        ));
    }
    state.app.db.cancel(&id).await?;
    Ok(see_other("/me"))
}

async fn delete(
    State(state): State<WebState>,
    Path(id): Path<String>,
    MemberForm { user, .. }: MemberForm,
) -> PageResult {
    let job = own_job(&state, &user, &id).await?;
    if job.state == db::QUEUED || job.state == db::RUNNING {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            "The job is still running: cancel it first.",
        ));
    }
    if let Some((clip, recipe)) = state.app.db.delete_job(&id).await? {
        for name in [clip, recipe].into_iter().flatten() {
            if let Err(e) = api::delete_stored(&state.app, &name).await {
                eprintln!("motif serve: deleting job {id}: {e:#}");
            }
        }
    }
    Ok(see_other("/me"))
}

// ---------------------------------------------------------------- create

/// The create form's field values (remix fills them from a clip's recipe).
fn create_form(
    csrf: &str,
    values: &serde_json::Map<String, Value>,
    remix_of: Option<&Clip>,
) -> String {
    let v = |k: &str| esc(&text_of(values, k));
    let styles: Vec<&str> = STYLES.iter().map(String::as_str).collect();
    let style = text_of(values, "style");
    let camera = text_of(values, "camera");
    let aspect = text_of(values, "aspect");
    let remix_note = match remix_of {
        Some(c) => format!(
            r#"<p class="remix-note">Remixing <a href="/clips/{}">{}</a> by {}</p>"#,
            esc(&c.job_id),
            esc(&c.prompt),
            esc(&c.author)
        ),
        None => String::new(),
    };
    format!(
        r#"<section class="create">
<form id="create-form" class="panel" autocomplete="off">
<h1>Create</h1>
{remix_note}
<input type="hidden" name="csrf" value="{csrf}">
<label>Prompt<textarea name="prompt" id="prompt" required maxlength="1000" rows="3" placeholder="a yellow star spinning over the sea at night">{prompt}</textarea></label>
<label>Negative prompt<input name="negative" id="negative" value="{negative}" maxlength="1000" placeholder="blurry, low quality"></label>
<div class="row">
<label>Style<select name="style" id="style">{styles}</select></label>
<label>Camera<select name="camera" id="camera">{cameras}</select></label>
</div>
<div class="row">
<label>Aspect<select name="aspect" id="aspect">{aspects}</select></label>
<label>Motion<input name="motion" id="motion" type="number" min="0" max="4" step="0.25" value="{motion}" placeholder="default"></label>
</div>
<div class="row">
<label>Seed<input name="seed" id="seed" type="number" min="0" step="1" value="{seed}" placeholder="random"></label>
<label>Steps<input name="steps" id="steps" type="number" min="1" max="100" value="{steps}" placeholder="default"></label>
</div>
<details{open}><summary>Size</summary>
<div class="row three">
<label>Width<input name="width" id="width" type="number" min="8" max="1024" step="8" value="{width}" placeholder="auto"></label>
<label>Height<input name="height" id="height" type="number" min="8" max="1024" step="8" value="{height}" placeholder="auto"></label>
<label>Frames<input name="frames" id="frames" type="number" min="1" max="64" value="{frames}" placeholder="default"></label>
</div>
</details>
<label>Animate a still (optional)<input name="image" id="image" type="file" accept="image/png,image/jpeg,image/webp"></label>
<label>Last frame (first-last-frame models only)<input name="last_image" id="last_image" type="file" accept="image/png,image/jpeg,image/webp"></label>
<button type="submit" class="primary" id="generate">Generate</button>
<p class="error" id="form-error" role="alert"></p>
</form>
<div class="result panel" id="result">
<div class="placeholder" id="placeholder">Your clip appears here, frame by frame while it denoises.</div>
<img id="preview" alt="Live preview" hidden>
<progress id="progress" max="1" value="0" hidden></progress>
<p id="status" class="status"></p>
<video id="result-video" controls autoplay muted loop playsinline hidden></video>
<form method="post" id="publish-form" hidden>{csrf_field}<button type="submit" class="primary" id="publish">Publish to the gallery</button></form>
</div>
</section>"#,
        csrf = esc(csrf),
        csrf_field = csrf_field(csrf),
        prompt = v("prompt"),
        negative = v("negative"),
        styles = options("None", &styles, Some(style.as_str())),
        cameras = options("Still", &CAMERAS, Some(camera.as_str())),
        aspects = options("Model default", &ASPECTS, Some(aspect.as_str())),
        motion = v("motion"),
        seed = v("seed"),
        steps = v("steps"),
        width = v("width"),
        height = v("height"),
        frames = v("frames"),
        open = if values.contains_key("width") || values.contains_key("frames") {
            " open"
        } else {
            ""
        },
    )
}

async fn create_page(
    State(state): State<WebState>,
    visitor: Visitor,
    Query(query): Query<HashMap<String, String>>,
) -> PageResult {
    if visitor.user.is_none() {
        return Ok(see_other("/login"));
    }
    let mut values = serde_json::Map::new();
    let mut remix_of = None;
    if let Some(id) = query.get("remix") {
        let clip = visible_clip(&state, &visitor, id).await?;
        let job = state
            .app
            .db
            .job(id)
            .await?
            .ok_or_else(PageError::not_found)?;
        values = request_of(&job);
        // The recipe holds the seed the clip was made with when the job left it random.
        if !values.contains_key("seed") {
            if let Some(name) = &job.recipe {
                if let Ok(bytes) = api::read_stored(&state.app, name).await {
                    if let Ok(recipe) = serde_json::from_slice::<Value>(&bytes) {
                        if let Some(seed) = recipe.get("seed").filter(|s| s.is_u64()) {
                            values.insert("seed".into(), seed.clone());
                        }
                    }
                }
            }
        }
        remix_of = Some(clip);
    }
    let body = create_form(&visitor.csrf, &values, remix_of.as_ref());
    Ok(html_page(&visitor, "Create", &body))
}

/// The create page's script submits here: JSON in, JSON out, the CSRF token in
/// `X-CSRF-Token`. Same checks and limits as `POST /api/v1/jobs`.
async fn create_job(
    State(state): State<WebState>,
    visitor: Visitor,
    request: Request,
) -> Result<Response, ApiError> {
    let given = request
        .headers()
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    visitor.check_csrf(given.as_deref())?;
    let user = visitor.member()?;
    let job = api::read_job(&state.app, request).await?;
    let job = api::accept_job(&state.app, &web_token_id(&user.id), job).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": job.id }))).into_response())
}

async fn create_events(
    State(state): State<WebState>,
    visitor: Visitor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let user = visitor.member()?;
    match state.app.db.job_owner(&id).await? {
        Some(owner) if owner == user.id => {
            Ok(api::job_events(state.app.clone(), id).into_response())
        }
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "no such job")),
    }
}

// ---------------------------------------------------------------- members

async fn me(State(state): State<WebState>, visitor: Visitor) -> PageResult {
    let Some(user) = &visitor.user else {
        return Ok(see_other("/login"));
    };
    let frame = visitor.frame();
    let jobs = state.app.db.user_jobs(&user.id, 100).await?;
    let now = now_ms();
    let mut rows = String::new();
    for job in &jobs {
        let request: serde_json::Map<String, Value> = match serde_json::from_str(&job.request) {
            Ok(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let id = &job.id;
        let mut actions = String::new();
        if job.published {
            let _ = write!(actions, r#"<a href="/clips/{}">View</a>"#, esc(id));
        } else if job.state == db::FINISHED {
            actions.push_str(&post_button(
                &frame,
                &format!("/jobs/{id}/publish"),
                "Publish",
                "primary",
            ));
        }
        if job.state == db::QUEUED || job.state == db::RUNNING {
            actions.push_str(&post_button(
                &frame,
                &format!("/jobs/{id}/cancel"),
                "Cancel",
                "",
            ));
        } else {
            actions.push_str(&post_button(
                &frame,
                &format!("/jobs/{id}/delete"),
                "Delete",
                "danger",
            ));
        }
        let preview = if job.state == db::FINISHED {
            format!(
                r#"<video class="hover-play thumb" src="/clips/{}/video" muted loop playsinline preload="metadata"></video>"#,
                esc(id)
            )
        } else {
            String::new()
        };
        let _ = write!(
            rows,
            r#"<tr><td>{preview}</td><td class="prompt">{prompt}</td><td><span class="state {state}">{state}</span>{error}</td><td>{age}</td><td class="actions">{actions}</td></tr>"#,
            prompt = esc(&text_of(&request, "prompt")),
            state = esc(&job.state),
            error = job
                .error
                .as_deref()
                .map(|e| format!(r#"<br><small>{}</small>"#, esc(e)))
                .unwrap_or_default(),
            age = esc(&age(job.created_ms, now)),
        );
    }
    let tokens = state.app.db.user_tokens(&user.id).await?;
    let mut token_rows = String::new();
    for (id, created) in &tokens {
        let _ = write!(
            token_rows,
            "<li><code>{}</code> created {} {}</li>",
            esc(id),
            esc(&age(*created, now)),
            post_button(
                &frame,
                &format!("/me/tokens/{id}/revoke"),
                "Revoke",
                "danger"
            )
        );
    }
    let body = format!(
        r#"<section class="wide"><h1>My clips</h1>
{table}
<h2>API tokens</h2>
<p>For scripts and the viewer: <code>Authorization: Bearer TOKEN</code> on <a href="/api/v1/openapi.json">/api/v1</a>. A token is shown once.</p>
<ul class="tokens">{token_rows}</ul>
{new_token}
</section>"#,
        table = if rows.is_empty() {
            r#"<p class="empty">Nothing yet. <a href="/create">Create a clip.</a></p>"#.to_string()
        } else {
            format!(
                r#"<table class="jobs"><thead><tr><th></th><th>Prompt</th><th>State</th><th>When</th><th></th></tr></thead><tbody>{rows}</tbody></table>"#
            )
        },
        new_token = post_button(&frame, "/me/tokens", "New API token", ""),
    );
    Ok(html_page(&visitor, "My clips", &body))
}

async fn new_token(
    State(state): State<WebState>,
    MemberForm { visitor, user, .. }: MemberForm,
) -> PageResult {
    let max = state.app.limits.max_tokens_per_member;
    let Some(token) = state.app.db.create_user_token_within(&user, max).await? else {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            format!(
                "You have {max} API tokens already, the most a member may hold: revoke one first."
            ),
        ));
    };
    let body = format!(
        r#"<section class="narrow notice"><h1>Your new API token</h1><p>Copy it now: only its hash is kept.</p><p><code class="token" id="token">{}</code></p><p><a href="/me">Back</a></p></section>"#,
        esc(&token)
    );
    let mut response = html_page(&visitor, "New API token", &body);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Revokes one of the member's API tokens; the API refuses it from then on.
/// Another member's token, or one already revoked, is "not found".
async fn revoke_token(
    State(state): State<WebState>,
    Path(id): Path<String>,
    MemberForm { user, .. }: MemberForm,
) -> PageResult {
    if !state.app.db.revoke_user_token(&user.id, &id).await? {
        return Err(PageError::new(StatusCode::NOT_FOUND, "No such API token."));
    }
    Ok(see_other("/me"))
}

async fn reports(State(state): State<WebState>, visitor: Visitor) -> PageResult {
    let user = visitor.member()?;
    if !user.admin {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "Reports are for admins.",
        ));
    }
    let frame = visitor.frame();
    let now = now_ms();
    let mut rows = String::new();
    for r in state.app.db.reports(200).await? {
        let _ = write!(
            rows,
            r#"<tr><td><a href="/clips/{id}">{prompt}</a>{hidden}</td><td>{reason}</td><td>{reporter}</td><td>{age}</td><td>{action}</td></tr>"#,
            id = esc(&r.job_id),
            prompt = esc(&r.prompt),
            hidden = if r.hidden {
                r#" <span class="tag warn">hidden</span>"#
            } else {
                ""
            },
            reason = esc(&r.reason),
            reporter = esc(&r.reporter),
            age = esc(&age(r.created_ms, now)),
            action = if r.hidden {
                String::new()
            } else {
                post_button(
                    &frame,
                    &format!("/clips/{}/hide", r.job_id),
                    "Hide",
                    "danger",
                )
            },
        );
    }
    let body = format!(
        r#"<section class="wide"><h1>Reports</h1>{}</section>"#,
        if rows.is_empty() {
            r#"<p class="empty">No reports.</p>"#.to_string()
        } else {
            format!(
                r#"<table class="jobs"><thead><tr><th>Clip</th><th>Reason</th><th>By</th><th>When</th><th></th></tr></thead><tbody>{rows}</tbody></table>"#
            )
        }
    );
    Ok(html_page(&visitor, "Reports", &body))
}

// ---------------------------------------------------------------- accounts

fn account_form(visitor: &Visitor, signup: bool, name: &str, error: Option<&str>) -> String {
    let (title, action, button, other) = if signup {
        (
            "Sign up",
            "/signup",
            "Create account",
            r#"Already a member? <a href="/login">Log in</a>"#,
        )
    } else {
        (
            "Log in",
            "/login",
            "Log in",
            r#"New here? <a href="/signup">Sign up</a>"#,
        )
    };
    format!(
        r#"<section class="narrow panel account"><h1>{title}</h1>
<form method="post" action="{action}">{csrf}
<label>Name<input name="name" id="name" value="{name}" required autocomplete="username" minlength="3" maxlength="32"></label>
<label>Password<input name="password" id="password" type="password" required autocomplete="{auto}" minlength="{min}" maxlength="{max}"></label>
<p class="error" role="alert">{error}</p>
<button type="submit" class="primary" id="submit">{button}</button>
</form><p class="muted">{other}</p></section>"#,
        csrf = csrf_field(&visitor.csrf),
        name = esc(name),
        auto = if signup {
            "new-password"
        } else {
            "current-password"
        },
        min = accounts::MIN_PASSWORD_CHARS,
        max = accounts::MAX_PASSWORD_CHARS,
        error = esc(error.unwrap_or("")),
    )
}

fn account_page(
    visitor: &Visitor,
    signup: bool,
    name: &str,
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    let title = if signup { "Sign up" } else { "Log in" };
    (
        status,
        html_page(visitor, title, &account_form(visitor, signup, name, error)),
    )
        .into_response()
}

async fn signup_page(visitor: Visitor) -> Response {
    account_page(&visitor, true, "", None, StatusCode::OK)
}

async fn login_page(visitor: Visitor) -> Response {
    account_page(&visitor, false, "", None, StatusCode::OK)
}

/// Starts a session: the cookie, then to the gallery.
async fn start_session(state: &WebState, user: &User) -> PageResult {
    let secret = state
        .app
        .db
        .create_session(&user.id, state.options.session)
        .await?;
    let cookie = format!(
        "{SESSION_COOKIE}={secret}; Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age={}",
        state.options.session.as_secs()
    );
    let mut response = see_other("/");
    response.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| anyhow::anyhow!("session cookie: {e}"))?,
    );
    Ok(response)
}

/// An answer that tells the client when to come back.
fn with_retry_after(mut response: Response, seconds: u64) -> Response {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// The form's page again with 503: every password-hashing slot is taken
/// (`--max-password-hashes`). A hash takes tens of milliseconds, so a second
/// is long enough to wait.
fn hashing_busy(visitor: &Visitor, signup: bool, name: &str) -> Response {
    let page = account_page(
        visitor,
        signup,
        name,
        Some("The server is busy checking other passwords: try again in a moment."),
        StatusCode::SERVICE_UNAVAILABLE,
    );
    with_retry_after(page, 1)
}

/// A sign-up, limited per client address (`--signups-per-address`) and by
/// the cap on password hashes in flight.
async fn signup(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    CheckedForm { visitor, fields }: CheckedForm,
) -> PageResult {
    let name = fields
        .get("name")
        .map(|s| s.trim())
        .unwrap_or("")
        .to_string();
    let password = fields.get("password").cloned().unwrap_or_default();
    if let Err(e) = accounts::check_name(&name).and(accounts::check_password(&password)) {
        return Ok(account_page(
            &visitor,
            true,
            &name,
            Some(e.as_str()),
            StatusCode::BAD_REQUEST,
        ));
    }
    // Reserved before the hash, so that parallel sign-ups cannot all pass the count.
    let client = accounts::client_key(peer.ip());
    let reservation = match state.signup_limiter.reserve(&client) {
        Ok(r) => r,
        Err(wait) => {
            let page = account_page(
                &visitor,
                true,
                &name,
                Some(
                    format!("Too many sign-ups from your address: try again in {wait} s.").as_str(),
                ),
                StatusCode::TOO_MANY_REQUESTS,
            );
            return Ok(with_retry_after(page, wait));
        }
    };
    let hash = match state.app.hashing.hash(password).await? {
        Ok(hash) => hash,
        Err(accounts::HashingBusy) => {
            // Nothing was done: the attempt does not count against the address.
            state.signup_limiter.release(reservation);
            return Ok(hashing_busy(&visitor, true, &name));
        }
    };
    match state.app.db.insert_user(&name, &hash, false).await? {
        Some(user) => start_session(&state, &user).await,
        None => Ok(account_page(
            &visitor,
            true,
            &name,
            Some("That name is taken."),
            StatusCode::CONFLICT,
        )),
    }
}

/// A login, limited by failures per account name and per client address.
/// The address is the TCP peer's: X-Forwarded-For is anyone's to write, so
/// behind a reverse proxy every client shares the proxy's limit. Each
/// attempt is reserved as a failure before its password is checked (and
/// given back if it succeeds), so parallel guesses cannot all pass the
/// count before the first failure is recorded.
async fn login(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    CheckedForm { visitor, fields }: CheckedForm,
) -> PageResult {
    let client = accounts::client_key(peer.ip());
    let name = fields
        .get("name")
        .map(|s| s.trim())
        .unwrap_or("")
        .to_string();
    let password = fields.get("password").cloned().unwrap_or_default();
    if name.is_empty() || name.len() > 64 || password.len() > 4 * accounts::MAX_PASSWORD_CHARS {
        return Ok(account_page(
            &visitor,
            false,
            "",
            Some("Wrong name or password."),
            StatusCode::UNAUTHORIZED,
        ));
    }
    let reserved = match state.limiter.reserve(&name) {
        Ok(by_name) => match state.ip_limiter.reserve(&client) {
            Ok(by_address) => Ok((by_name, by_address)),
            Err(wait) => {
                state.limiter.release(by_name);
                Err(wait)
            }
        },
        Err(wait) => Err(wait),
    };
    let (by_name, by_address) = match reserved {
        Ok(r) => r,
        Err(wait) => {
            let page = account_page(
                &visitor,
                false,
                &name,
                Some(format!("Too many failed logins: try again in {wait} s.").as_str()),
                StatusCode::TOO_MANY_REQUESTS,
            );
            return Ok(with_retry_after(page, wait));
        }
    };
    match accounts::login(&state.app.db, &state.app.hashing, &name, &password).await? {
        Err(accounts::HashingBusy) => {
            state.limiter.release(by_name);
            state.ip_limiter.release(by_address);
            Ok(hashing_busy(&visitor, false, &name))
        }
        Ok(Some(user)) => {
            state.limiter.clear(&name);
            // Only this attempt is given back: a success does not clear the
            // address's count, or one account of their own would let a
            // client reset it between guesses.
            state.ip_limiter.release(by_address);
            start_session(&state, &user).await
        }
        Ok(None) => Ok(account_page(
            &visitor,
            false,
            &name,
            Some("Wrong name or password."),
            StatusCode::UNAUTHORIZED,
        )),
    }
}

/// Ends the session; like every form post, only with the CSRF token.
async fn logout(State(state): State<WebState>, headers: HeaderMap, _: CheckedForm) -> PageResult {
    if let Some(secret) = super::cookie(&headers, SESSION_COOKIE) {
        state.app.db.delete_session(&secret).await?;
    }
    let mut response = see_other("/");
    response.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "motif_session=; Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age=0",
        ),
    );
    Ok(response)
}

// ---------------------------------------------------------------- assets

async fn style_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLE_CSS,
    )
        .into_response()
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}
