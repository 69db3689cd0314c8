//! The HTTP API under `/api/v1`, described by `openapi.json` (served with
//! the style and model names of this server filled in).
//! Every answer is JSON except the event stream and the clip; every input
//! error is a 4xx `{"error": ..., "field": ...}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};

use crate::accounts::PasswordHashing;
use crate::db::{self, Db, JobRow, NewJob, Token};
use crate::quota::{Admission, JobQuota};
use crate::request::{JobRequest, Names};
use crate::worker::Shutdown;
use crate::{ApiLimits, Runner, Store};

const OPENAPI: &str = include_str!("openapi.json");

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    /// The served OpenAPI document ([`openapi_document`]).
    pub openapi: axum::body::Bytes,
    pub names: Arc<Names>,
    pub runner: Arc<dyn Runner>,
    pub store: Arc<Store>,
    pub limits: Arc<ApiLimits>,
    /// The cap on password hashes in flight (sign-up, login).
    pub hashing: Arc<PasswordHashing>,
    pub shutdown: Shutdown,
    /// Seconds a client told 503 (database unreachable) waits before trying
    /// again: the acquire timeout it just waited.
    pub retry_after: u64,
}

pub fn router(state: AppState) -> Router {
    // `submit` reads the body itself under this limit; the multipart parser
    // would otherwise stop at axum's default of 2 MB.
    let body_limit = DefaultBodyLimit::max(state.limits.max_body_bytes);
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/jobs", post(submit).get(list))
        .route("/api/v1/jobs/{id}", get(show))
        .route("/api/v1/jobs/{id}/cancel", post(cancel))
        .route("/api/v1/jobs/{id}/publish", post(publish))
        .route("/api/v1/jobs/{id}/events", get(events))
        .route("/api/v1/jobs/{id}/clip", get(clip))
        .route("/api/v1/jobs/{id}/recipe", get(recipe))
        .layer(body_limit)
        .with_state(state)
}

/// An error answer: status, message, the field at fault, and for 429 when to retry.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    pub(crate) fn field(status: StatusCode, field: &str, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.to_string()),
            ..ApiError::new(status, message)
        }
    }

    fn not_found() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "no such job")
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The message, after the field it is about if any.
    pub(crate) fn describe(&self) -> String {
        match &self.field {
            Some(f) => format!("{f}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

/// Database and file errors: the client gets a 500 without details (a 503
/// while the database is unreachable: `web::app` adds its `Retry-After`),
/// the log gets the cause.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        if db::is_unavailable(&e) {
            eprintln!("motif serve: database unreachable: {e:#}");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unreachable right now; try again shortly",
            );
        }
        eprintln!("motif serve: internal error: {e:#}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = &self.field {
            body["field"] = json!(f);
        }
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Any path under the API's prefixes that no route serves (see `web::app`,
/// which sends other paths to the gallery's 404 page).
pub(crate) async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint (see /api/v1/openapi.json)",
    )
}

/// Up, and how busy password hashing is (the cap of `--max-password-hashes`
/// is what keeps sign-up floods from taking the memory).
async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "ok": true,
        "version": env!("CARGO_PKG_VERSION"),
        "password_hashing": state.hashing.report(),
    }))
}

async fn openapi(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], state.openapi).into_response()
}

/// `openapi.json` with `style` and `model` narrowed to the names this server
/// accepts, so that every request the document allows is one the server
/// takes (schemathesis checks exactly that), and `JobRecipe` — the recipe
/// part of a multipart submission — derived from `JobRequest`.
pub fn openapi_document(names: &Names) -> anyhow::Result<String> {
    let mut doc: Value = serde_json::from_str(OPENAPI)?;
    let schemas = &mut doc["components"]["schemas"];
    let request = &mut schemas["JobRequest"];
    for (field, known) in [("style", &names.styles), ("model", &names.models)] {
        // With nothing installed the name pattern stays: an empty enum is not valid OpenAPI.
        if known.is_empty() {
            continue;
        }
        let property = &mut request["properties"][field];
        let description = property["description"].clone();
        *property = json!({ "type": "string", "enum": known, "description": description });
    }
    let mut recipe = request.clone();
    if let Some(o) = recipe.as_object_mut() {
        // The stills are the `image` and `last_image` parts; `strength`
        // and `last_image` go with `image` there.
        o.remove("not");
        o.insert(
            "description".into(),
            json!("The job's fields as in JobRequest, without `image` and `last_image`"),
        );
    }
    if let Some(p) = recipe["properties"].as_object_mut() {
        p.remove("image");
        p.remove("last_image");
    }
    schemas["JobRecipe"] = recipe;
    Ok(serde_json::to_string_pretty(&doc)?)
}

/// The token of `Authorization: Bearer TOKEN`.
async fn authenticate(db: &Db, headers: &HeaderMap) -> ApiResult<Token> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        unauthorized(
            "missing `Authorization: Bearer TOKEN` (create one with `motif admin create-token`)",
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| unauthorized("the Authorization header is not readable text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("expected `Authorization: Bearer TOKEN`"))?;
    db.token_by_hash(&crate::hash_token(token))
        .await?
        .ok_or_else(|| unauthorized("unknown API token"))
}

fn job_id(path: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let Path(id) =
        path.map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "id", e.body_text()))?;
    Ok(id)
}

/// The job if this token may see it: its own, or its member's (queued from
/// the gallery or another of their tokens); anyone else's is "not found".
async fn owned_job(state: &AppState, token: &Token, id: &str) -> ApiResult<JobRow> {
    let Some(job) = state.db.job(id).await? else {
        return Err(ApiError::not_found());
    };
    if token.admin || job.token_id == token.id {
        return Ok(job);
    }
    match &token.user_id {
        Some(user) if state.db.job_owner(id).await?.as_ref() == Some(user) => Ok(job),
        _ => Err(ApiError::not_found()),
    }
}

/// The preamble of every `/jobs/{id}` handler: the caller's token, and the
/// job of the path if that token may see it.
async fn caller_job(
    state: &AppState,
    headers: &HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<(Token, JobRow)> {
    let token = authenticate(&state.db, headers).await?;
    let id = job_id(path)?;
    let job = owned_job(state, &token, &id).await?;
    Ok((token, job))
}

async fn job_json(db: &Db, job: &JobRow) -> ApiResult<Value> {
    let queue_position = if job.state == db::QUEUED {
        Some(db.queue_position(job).await?)
    } else {
        None
    };
    let request: Value = serde_json::from_str(&job.request).unwrap_or(Value::Null);
    let base = format!("/api/v1/jobs/{}", job.id);
    let done = job.state == db::FINISHED && job.clip.is_some();
    Ok(json!({
        "id": job.id,
        "state": job.state,
        "queue_position": queue_position,
        "step": job.step,
        "total": job.total,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "error": job.error,
        "format": job.format,
        "request": request,
        "created_ms": job.created_ms,
        "started_ms": job.started_ms,
        "finished_ms": job.finished_ms,
        "links": {
            "self": base,
            "events": format!("{base}/events"),
            "clip": done.then(|| format!("{base}/clip")),
            "recipe": done.then(|| format!("{base}/recipe")),
        },
    }))
}

async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult<Response> {
    let token = authenticate(&state.db, &headers).await?;
    let job = read_job(&state, request).await?;
    let row = accept_job(&state, &token.id, job).await?;
    let body = job_json(&state.db, &row).await?;
    let location = HeaderValue::from_str(&format!("/api/v1/jobs/{}", row.id))
        .map_err(|e| anyhow::anyhow!("location header: {e}"))?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response())
}

/// A submitted job: a JSON body, or multipart/form-data with a `recipe`
/// JSON part and `image` and `last_image` file parts; within the body limit.
pub(crate) async fn read_job(state: &AppState, request: Request) -> ApiResult<JobRequest> {
    let limits = &state.limits;
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let (parts, body) = request.into_parts();
    let bytes = read_body(body, limits.max_body_bytes).await?;
    if multipart {
        job_from_multipart(Request::from_parts(parts, Body::from(bytes))).await
    } else {
        parse_job(&bytes, "body")
    }
}

/// Checks a job (fields, what this machine can run, its member's limits) and
/// queues it for `token_id`: the API's submissions and the gallery's.
pub(crate) async fn accept_job(
    state: &AppState,
    token_id: &str,
    job: JobRequest,
) -> ApiResult<JobRow> {
    let limits = &state.limits;
    // The decoded stills are only checked here; the job keeps the base64 text.
    job.validate(&limits.job)
        .and_then(|_| state.names.check(&job))
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, &e.field, e.reason))?;

    // Model and style names are checked against what this machine has, and
    // the size the clip will have against the server's bound, before the
    // member's lock is taken: the check may read the disk.
    let runner = state.runner.clone();
    let checked = job.clone();
    let size = tokio::task::spawn_blocking(move || runner.check(&checked))
        .await
        .map_err(|e| anyhow::anyhow!("checking the job: {e}"))?
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, &e.field, e.reason))?;
    limits
        .job
        .check_size(&job, size)
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, &e.field, e.reason))?;

    let id = format!("{:x}{}", db::now_ms(), crate::random_hex(6));
    let request_json = serde_json::to_string(&job).map_err(anyhow::Error::from)?;
    let quota = JobQuota {
        max_active: limits.max_active_per_member,
        per_minute: limits.submissions_per_minute,
    };
    let new_job = NewJob {
        id: &id,
        token_id,
        request: &request_json,
        image: job.image.as_deref(),
        last_image: job.last_image.as_deref(),
        format: job.format().extension(),
    };
    match state.db.insert_job_within_quota(&new_job, quota).await? {
        Admission::Accepted => {}
        Admission::TooManyActive { active } => {
            return Err(ApiError {
                retry_after: Some(10),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{active} jobs queued or running for this member: at most {} at once",
                        limits.max_active_per_member
                    ),
                )
            })
        }
        Admission::TooManyRecent { wait_s } => {
            return Err(ApiError {
                retry_after: Some(wait_s),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "at most {} submissions a minute for this member",
                        limits.submissions_per_minute
                    ),
                )
            })
        }
    }
    Ok(state
        .db
        .job(&id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("job {id} vanished after insert"))?)
}

/// The request body, up to `limit` bytes. The rest of a longer body is read
/// and dropped (up to a bound) before the 413: a client still sending when
/// the server answers and closes would see a reset connection instead of
/// the answer.
async fn read_body(body: Body, limit: usize) -> ApiResult<axum::body::Bytes> {
    let too_large = || {
        ApiError::field(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body",
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                "body",
                format!("reading the body: {e}"),
            )
        })?;
        received += chunk.len();
        if received > limit {
            let drain = async {
                while received <= 4 * limit {
                    match stream.next().await {
                        Some(Ok(c)) => received += c.len(),
                        _ => break,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes.into())
}

/// A job's JSON fields; `what` names the body or the multipart part they came in.
fn parse_job(bytes: &[u8], what: &str) -> ApiResult<JobRequest> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            what,
            format!("not valid JSON: {e}"),
        )
    })?;
    JobRequest::from_value(value).map_err(|e| {
        let field = if e.field == "body" { what } else { &e.field };
        ApiError::field(StatusCode::BAD_REQUEST, field, e.reason)
    })
}

/// A `multipart/form-data` submission: a `recipe` part with the job's JSON
/// fields, an `image` part with the still and, for a first-last-frame
/// model, a `last_image` part with the last frame, as a browser form or `curl -F`
/// sends them. The still joins the job as if it had come base64 in the JSON,
/// so both ways share every check after this.
async fn job_from_multipart(request: Request) -> ApiResult<JobRequest> {
    let malformed = |e: String| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            "body",
            format!("not valid multipart/form-data: {e}"),
        )
    };
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| malformed(e.body_text()))?;
    let (mut recipe, mut image, mut last_image) = (None, None, None);
    while let Some(part) = form
        .next_field()
        .await
        .map_err(|e| malformed(e.body_text()))?
    {
        let name = part.name().unwrap_or_default().to_string();
        let slot = match name.as_str() {
            "recipe" => &mut recipe,
            "image" => &mut image,
            "last_image" => &mut last_image,
            _ => {
                let field = if name.is_empty() {
                    "body"
                } else {
                    name.as_str()
                };
                return Err(ApiError::field(
                    StatusCode::BAD_REQUEST,
                    field,
                    format!("unknown part `{name}`: expected `recipe` (the job's JSON), `image` (the still) and `last_image` (the still the clip ends on)"),
                ));
            }
        };
        if slot.is_some() {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                &name,
                format!("the `{name}` part is given twice"),
            ));
        }
        *slot = Some(part.bytes().await.map_err(|e| malformed(e.body_text()))?);
    }
    let recipe = recipe.ok_or_else(|| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            "recipe",
            "missing the `recipe` part (the job's JSON fields)",
        )
    })?;
    let mut job = parse_job(&recipe, "recipe")?;
    for (field, part, slot) in [
        ("image", image, &mut job.image),
        ("last_image", last_image, &mut job.last_image),
    ] {
        if let Some(still) = part {
            if slot.is_some() {
                return Err(ApiError::field(
                    StatusCode::BAD_REQUEST,
                    field,
                    format!(
                        "the still is given twice: as the `{field}` part and inside the recipe"
                    ),
                ));
            }
            *slot = Some(base64::engine::general_purpose::STANDARD.encode(&still));
        }
    }
    Ok(job)
}

/// `GET /api/v1/jobs`'s query: `state` and `limit`, each checked by name.
struct ListQuery {
    state: Option<String>,
    limit: i64,
}

impl ListQuery {
    fn parse(pairs: Vec<(String, String)>) -> ApiResult<ListQuery> {
        let bad = |field: &str, message: &str| {
            ApiError::field(StatusCode::BAD_REQUEST, field, message.to_string())
        };
        let mut query = ListQuery {
            state: None,
            limit: 50,
        };
        for (key, value) in pairs {
            match key.as_str() {
                "limit" => {
                    query.limit = (value.parse::<i64>().ok())
                        .filter(|l| (1..=200).contains(l))
                        .ok_or_else(|| bad("limit", "expected 1 to 200"))?
                }
                "state" => {
                    let known = [
                        db::QUEUED,
                        db::RUNNING,
                        db::FINISHED,
                        db::FAILED,
                        db::CANCELLED,
                    ];
                    if !known.contains(&value.as_str()) {
                        return Err(bad(
                            "state",
                            "expected queued, running, finished, failed or cancelled",
                        ));
                    }
                    query.state = Some(value);
                }
                other => {
                    return Err(bad(
                        other,
                        &format!("unknown query parameter `{other}`: expected state or limit"),
                    ))
                }
            }
        }
        Ok(query)
    }
}

async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let token = authenticate(&state.db, &headers).await?;
    let Query(pairs) =
        query.map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "query", e.body_text()))?;
    let query = ListQuery::parse(pairs)?;
    let limit = query.limit;
    let owner = (!token.admin).then_some(token.id.as_str());
    let rows = state
        .db
        .list_jobs(owner, query.state.as_deref(), limit)
        .await?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        jobs.push(job_json(&state.db, row).await?);
    }
    Ok(Json(json!({ "jobs": jobs })))
}

async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let (_, job) = caller_job(&state, &headers, path).await?;
    Ok(Json(job_json(&state.db, &job).await?))
}

async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let (_, job) = caller_job(&state, &headers, path).await?;
    let id = job.id.clone();
    if ![db::QUEUED, db::RUNNING].contains(&job.state.as_str()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the job is already {}", job.state),
        ));
    }
    let job = state
        .db
        .cancel(&id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(job_json(&state.db, &job).await?))
}

/// Shows a finished clip in the gallery, for the member who owns both the
/// token and the job.
async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let (token, job) = caller_job(&state, &headers, path).await?;
    let id = job.id.clone();
    let Some(user) = &token.user_id else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this token belongs to no gallery member (`motif admin create-token --user NAME`)",
        ));
    };
    if state.db.job_owner(&id).await?.as_ref() != Some(user) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the job belongs to another member",
        ));
    }
    if job.state != db::FINISHED || job.clip.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the job is {}: only a finished clip can be published",
                job.state
            ),
        ));
    }
    state.db.publish_job(&job, user).await?;
    Ok(Json(json!({ "id": id, "page": format!("/clips/{id}") })))
}

async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let (_, job) = caller_job(&state, &headers, path).await?;
    Ok(job_events(state, job.id))
}

/// The event stream of a job the caller may see: state changes, progress with
/// preview frames, and the end.
pub(crate) fn job_events(
    state: AppState,
    id: String,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = async_stream::stream! {
        // Progress lives in the database (a remote worker writes it there), so
        // the stream polls the job and sends what changed.
        let mut last_state = String::new();
        let mut last_position = None;
        let mut last_step = -1;
        let mut last_preview: Option<String> = None;
        loop {
            let job = match state.db.job(&id).await {
                Ok(Some(j)) => j,
                Ok(None) => break,
                Err(e) => {
                    eprintln!("motif serve: events of {id}: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let position = if job.state == db::QUEUED {
                state.db.queue_position(&job).await.ok()
            } else {
                None
            };
            if job.state != last_state || position != last_position {
                last_state = job.state.clone();
                last_position = position;
                yield Ok(Event::default().event("state").data(
                    json!({"state": job.state, "queue_position": position, "attempts": job.attempts}).to_string(),
                ));
            }
            // A finished job's step is its total: a job that ends between two
            // polls still reports its last step before `done`.
            let progressing = job.state == db::RUNNING || job.state == db::FINISHED;
            if progressing && job.total > 0 && job.step != last_step {
                last_step = job.step;
                // The finished job's last step carries its latest preview
                // whatever was sent before: it is the step a late or slow
                // reader sees last.
                let changed = job.preview != last_preview || job.state == db::FINISHED;
                let preview = if changed { job.preview.clone() } else { None };
                last_preview = job.preview.clone();
                yield Ok(Event::default().event("progress").data(
                    json!({"step": job.step, "total": job.total, "preview": preview}).to_string(),
                ));
            }
            if [db::FINISHED, db::FAILED, db::CANCELLED].contains(&job.state.as_str()) {
                let base = format!("/api/v1/jobs/{}", job.id);
                let finished = job.state == db::FINISHED;
                yield Ok(Event::default().event("done").data(
                    json!({
                        "state": job.state,
                        "error": job.error,
                        "clip": finished.then(|| format!("{base}/clip")),
                        "recipe": finished.then(|| format!("{base}/recipe")),
                    })
                    .to_string(),
                ));
                break;
            }
            if state.shutdown.is_set() {
                break;
            }
            state.shutdown.sleep(Duration::from_millis(250)).await;
        }
    };
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A finished job's file from the clip store.
async fn stored_file(
    state: &AppState,
    headers: &HeaderMap,
    path: Result<Path<String>, PathRejection>,
    recipe: bool,
) -> ApiResult<Response> {
    let (_, job) = caller_job(state, headers, path).await?;
    let name = if recipe { &job.recipe } else { &job.clip };
    let Some(name) = name.as_ref().filter(|_| job.state == db::FINISHED) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the job is {}: it has no clip", job.state),
        ));
    };
    let object = state.store.get(name).await?;
    let content_type = if recipe {
        "application/json"
    } else {
        match job.format.as_str() {
            "gif" => "image/gif",
            "webp" => "image/webp",
            _ => "video/mp4",
        }
    };
    let disposition = format!(
        "attachment; filename=\"motif-{}.{}\"",
        job.id,
        if recipe { "json" } else { job.format.as_str() }
    );
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_DISPOSITION, disposition);
    let response = if recipe {
        let bytes = object.bytes().await.map_err(anyhow::Error::from)?;
        response.body(Body::from(public_recipe(bytes.to_vec())))
    } else {
        // Streamed from the store (a bucket, for remote workers) without
        // holding the clip in memory.
        response
            .header(header::CONTENT_LENGTH, object.meta.size)
            .body(Body::from_stream(object.into_stream()))
    };
    Ok(response.map_err(|e| anyhow::anyhow!("building the response: {e}"))?)
}

/// A file of the clip store (a clip or a recipe) by its stored name, whole.
pub(crate) async fn read_stored(state: &AppState, name: &str) -> anyhow::Result<Vec<u8>> {
    let object = state.store.get(name).await?;
    let bytes = object
        .bytes()
        .await
        .map_err(|e| anyhow::anyhow!("reading {name} from {}: {e}", state.store.location))?;
    Ok(bytes.to_vec())
}

/// Removes a file of the clip store; one already gone is not an error.
pub(crate) async fn delete_stored(state: &AppState, name: &str) -> anyhow::Result<()> {
    match state.store.delete(name).await {
        Err(e)
            if matches!(
                e.downcast_ref::<object_store::Error>(),
                Some(object_store::Error::NotFound { .. })
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The recipe names the uploaded stills by their temporary paths on the
/// worker, which mean nothing to a client and are gone: say they were
/// uploaded (the gallery and a remix see that a still was used).
pub(crate) fn public_recipe(bytes: Vec<u8>) -> Vec<u8> {
    let stills = ["image", "last_image"];
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut recipe)
            if stills
                .iter()
                .any(|f| recipe.get(f).is_some_and(Value::is_string)) =>
        {
            for field in stills {
                if recipe.get(field).is_some_and(Value::is_string) {
                    recipe[field] = json!("(uploaded)");
                }
            }
            serde_json::to_vec_pretty(&recipe).unwrap_or(bytes)
        }
        _ => bytes,
    }
}

async fn clip(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    stored_file(&state, &headers, path, false).await
}

async fn recipe(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    stored_file(&state, &headers, path, true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_document_lists_the_names_and_derives_the_recipe_part() {
        let names = Names {
            styles: vec!["anime".into()],
            models: vec!["default".into(), "org/model".into()],
        };
        let doc: Value = serde_json::from_str(&openapi_document(&names).unwrap()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let request = &schemas["JobRequest"];
        assert_eq!(
            request["properties"]["model"]["enum"],
            json!(["default", "org/model"])
        );
        assert_eq!(request["properties"]["style"]["enum"], json!(["anime"]));
        assert!(request["properties"]["image"].is_object());
        assert!(request["not"].is_object(), "strength goes with image");
        let recipe = &schemas["JobRecipe"];
        assert_eq!(recipe["properties"]["style"]["enum"], json!(["anime"]));
        assert!(recipe["properties"].get("image").is_none());
        assert!(request["properties"]["last_image"].is_object());
        assert!(recipe["properties"].get("last_image").is_none());
        assert!(recipe.get("not").is_none());
        let multipart = &doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]
            ["multipart/form-data"]["schema"];
        assert_eq!(
            multipart["properties"]["recipe"]["$ref"],
            "#/components/schemas/JobRecipe"
        );
        // With no model installed, the name pattern stands in for an (invalid) empty enum.
        let none = openapi_document(&Names::default()).unwrap();
        assert!(!none.contains("\"enum\": []"));
    }
}
