//! The HTTP API under `/api/v1`, described by `openapi.json` (served as is).
//! Every answer is JSON except the event stream and the clip; every input
//! error is a 4xx `{"error": ..., "field": ...}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::db::{self, Db, JobRow, NewJob, Token};
use crate::request::{field_of_serde_error, JobRequest};
use crate::worker::Shutdown;
use crate::{ApiLimits, Runner, Store};

const OPENAPI: &str = include_str!("openapi.json");

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub runner: Arc<dyn Runner>,
    pub store: Arc<Store>,
    pub limits: Arc<ApiLimits>,
    pub shutdown: Shutdown,
}

pub fn router(state: AppState) -> Router {
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
        .fallback(not_found)
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
}

/// Database and file errors: the client gets a 500 without details, the log
/// gets the cause.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
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

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint (see /api/v1/openapi.json)",
    )
}

async fn health() -> Json<Value> {
    Json(json!({ "ok": true, "version": env!("CARGO_PKG_VERSION") }))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
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
    let value = read_json_body(&state, request).await?;
    let row = accept_job(&state, &token.id, value).await?;
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

/// A request body as JSON, within the body limit.
pub(crate) async fn read_json_body(state: &AppState, request: Request) -> ApiResult<Value> {
    let limits = &state.limits;
    let bytes = axum::body::to_bytes(request.into_body(), limits.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::field(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body",
                format!(
                    "the request body is larger than {} bytes",
                    limits.max_body_bytes
                ),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            "body",
            format!("not valid JSON: {e}"),
        )
    })
}

/// Checks a job (fields, the token's limits, what this machine can run) and
/// queues it for `token_id`: the API's submissions and the gallery's.
pub(crate) async fn accept_job(
    state: &AppState,
    token_id: &str,
    value: Value,
) -> ApiResult<JobRow> {
    let limits = &state.limits;
    if !value.is_object() {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "body",
            "expected a JSON object with the job's fields",
        ));
    }
    let job: JobRequest = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        ApiError::field(
            StatusCode::BAD_REQUEST,
            &field_of_serde_error(&path, &message),
            message,
        )
    })?;
    // The decoded still is only checked here; the job keeps the base64 text.
    job.validate(&limits.job)
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, &e.field, e.message))?;

    let active = state.db.active_jobs(token_id).await?;
    if active >= limits.max_active_per_token {
        return Err(ApiError {
            retry_after: Some(10),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{active} jobs queued or running for this token: at most {} at once",
                    limits.max_active_per_token
                ),
            )
        });
    }
    let now = db::now_ms();
    let per_minute = limits.submissions_per_minute;
    let recent = state
        .db
        .submissions_since(token_id, now - 60_000, per_minute)
        .await?;
    if recent.len() as i64 >= per_minute {
        // A slot frees when the oldest of the last `per_minute` submissions turns a minute old.
        let frees_at = recent.last().copied().unwrap_or(now) + 60_000;
        let wait_s = ((frees_at - now).max(0) as u64).div_ceil(1000).max(1);
        return Err(ApiError {
            retry_after: Some(wait_s),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "at most {} submissions a minute for this token",
                    limits.submissions_per_minute
                ),
            )
        });
    }

    // Model and style names are checked against what this machine has.
    let runner = state.runner.clone();
    let checked = job.clone();
    tokio::task::spawn_blocking(move || runner.check(&checked))
        .await
        .map_err(|e| anyhow::anyhow!("checking the job: {e}"))?
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, &e.field, e.message))?;

    let id = format!("{:x}{}", now, crate::random_hex(6));
    let request_json = serde_json::to_string(&job).map_err(anyhow::Error::from)?;
    state
        .db
        .insert_job(&NewJob {
            id: &id,
            token_id,
            request: &request_json,
            image: job.image.as_deref(),
            format: job.format(),
        })
        .await?;
    Ok(state
        .db
        .job(&id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("job {id} vanished after insert"))?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let token = authenticate(&state.db, &headers).await?;
    let Query(query) = query.map_err(|e| {
        let message = e.body_text();
        let field = field_of_serde_error("", &message);
        let field = if field == "body" {
            "query".to_string()
        } else {
            field
        };
        ApiError::field(StatusCode::BAD_REQUEST, &field, message)
    })?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "limit",
            "expected 1 to 200",
        ));
    }
    if let Some(s) = &query.state {
        if ![
            db::QUEUED,
            db::RUNNING,
            db::FINISHED,
            db::FAILED,
            db::CANCELLED,
        ]
        .contains(&s.as_str())
        {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "state",
                "expected queued, running, finished, failed or cancelled",
            ));
        }
    }
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
    let token = authenticate(&state.db, &headers).await?;
    let id = job_id(path)?;
    let job = owned_job(&state, &token, &id).await?;
    Ok(Json(job_json(&state.db, &job).await?))
}

async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let token = authenticate(&state.db, &headers).await?;
    let id = job_id(path)?;
    let job = owned_job(&state, &token, &id).await?;
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
    let token = authenticate(&state.db, &headers).await?;
    let id = job_id(path)?;
    let job = owned_job(&state, &token, &id).await?;
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
    let token = authenticate(&state.db, &headers).await?;
    let id = job_id(path)?;
    owned_job(&state, &token, &id).await?;
    Ok(job_events(state, id))
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
            if job.state == db::RUNNING && job.total > 0 && job.step != last_step {
                last_step = job.step;
                let preview = if job.preview != last_preview { job.preview.clone() } else { None };
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
    let token = authenticate(&state.db, headers).await?;
    let id = job_id(path)?;
    let job = owned_job(state, &token, &id).await?;
    let name = if recipe { &job.recipe } else { &job.clip };
    let Some(name) = name.as_ref().filter(|_| job.state == db::FINISHED) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the job is {}: it has no clip", job.state),
        ));
    };
    let bytes = read_stored(state, name).await?;
    let bytes = if recipe { public_recipe(bytes) } else { bytes };
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
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_DISPOSITION, disposition)
        .body(Body::from(bytes))
        .map_err(|e| anyhow::anyhow!("building the response: {e}"))?)
}

/// A file of the clip store (a clip or a recipe) by its stored name.
pub(crate) async fn read_stored(state: &AppState, name: &str) -> anyhow::Result<Vec<u8>> {
    let file = state.store.clips.join(name);
    tokio::fs::read(&file)
        .await
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))
}

/// Removes a file of the clip store; one already gone is not an error.
pub(crate) async fn delete_stored(state: &AppState, name: &str) -> anyhow::Result<()> {
    let file = state.store.clips.join(name);
    match tokio::fs::remove_file(&file).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::anyhow!("removing {}: {e}", file.display()))
        }
        _ => Ok(()),
    }
}

/// The recipe names the uploaded still by its temporary path on the worker,
/// which means nothing to a client and is gone: say it was uploaded.
pub(crate) fn public_recipe(bytes: Vec<u8>) -> Vec<u8> {
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut recipe) if recipe.get("image").is_some_and(Value::is_string) => {
            recipe["image"] = json!("(uploaded)");
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
