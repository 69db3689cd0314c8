//! `motif serve` and `motif worker` end to end: real server processes on
//! 127.0.0.1, a real SQLite file in a temporary data folder, a real
//! PostgreSQL for the scale-out cases (`MOTIF_TEST_DATABASE_URL`, which
//! `tools/test.sh` sets after starting Debian's PostgreSQL) and a real S3 stand-in
//! for the bucket store (moto's server, `MOTIF_TEST_MOTO`, which `tools/test.sh`
//! installs from PyPI). Generations are tiny (64x64, 4 frames, 2 steps) on
//! the bundled model.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{free_port, motif_command, temp_dir, unique, PgDatabase, Proc, Server, MOTIF};

fn create_token(store: &[&str], admin: bool) -> String {
    let mut args = vec!["admin", "create-token"];
    args.extend_from_slice(store);
    if admin {
        args.push("--admin");
    }
    let out = Command::new(MOTIF)
        .args(&args)
        .env_remove("MOTIF_DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "create-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.len() > 32, "token: {token}");
    token
}

/// Status, headers we look at, and JSON body of a response, 4xx/5xx included.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

fn answer(result: Result<ureq::Response, ureq::Error>) -> Answer {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = response.status();
    let retry_after = response.header("Retry-After").map(str::to_string);
    let content_type = response.content_type().to_string();
    let text = response.into_string().unwrap();
    assert_eq!(
        content_type, "application/json",
        "status {status}: not JSON: {text}"
    );
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    Answer {
        status,
        retry_after,
        body,
    }
}

fn post(server: &Server, path: &str, token: Option<&str>, body: &str) -> Answer {
    let mut req = ureq::post(&server.url(path)).set("Content-Type", "application/json");
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    answer(req.send_string(body))
}

/// A `multipart/form-data` body of (name, file name, content type, content)
/// parts, and its Content-Type header.
fn multipart(parts: &[(&str, Option<&str>, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "motif-test-7f3a9c";
    let mut body = Vec::new();
    for (name, file_name, content_type, content) in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes(),
        );
        if let Some(f) = file_name {
            body.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
        }
        body.extend_from_slice(format!("\r\nContent-Type: {content_type}\r\n\r\n").as_bytes());
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn post_multipart(server: &Server, token: &str, content_type: &str, body: &[u8]) -> Answer {
    answer(
        ureq::post(&server.url("/api/v1/jobs"))
            .set("Authorization", &format!("Bearer {token}"))
            .set("Content-Type", content_type)
            .send_bytes(body),
    )
}

/// A PNG still of `width` x `height`.
fn png_still(width: u32, height: u32) -> Vec<u8> {
    let mut png_bytes = Vec::new();
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, 200])
    })
    .write_to(
        &mut std::io::Cursor::new(&mut png_bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    png_bytes
}

fn get(server: &Server, path: &str, token: Option<&str>) -> Answer {
    let mut req = ureq::get(&server.url(path));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    answer(req.call())
}

fn tiny_job(prompt: &str, seed: u64) -> Value {
    json!({"prompt": prompt, "width": 64, "height": 64, "frames": 4, "steps": 2, "seed": seed})
}

fn submit(server: &Server, token: &str, job: &Value) -> String {
    let a = post(server, "/api/v1/jobs", Some(token), &job.to_string());
    assert_eq!(a.status, 202, "{}", a.body);
    a.body["id"].as_str().unwrap().to_string()
}

fn wait_for_state(
    server: &Server,
    token: &str,
    id: &str,
    states: &[&str],
    limit: Duration,
) -> Value {
    let start = Instant::now();
    loop {
        let a = get(server, &format!("/api/v1/jobs/{id}"), Some(token));
        assert_eq!(a.status, 200, "{}", a.body);
        if states.contains(&a.body["state"].as_str().unwrap()) {
            return a.body;
        }
        assert!(
            start.elapsed() < limit,
            "job {id} not {states:?} after {limit:?}: {}",
            a.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn download(server: &Server, token: &str, path: &str) -> (String, Vec<u8>) {
    let r = ureq::get(&server.url(path))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let content_type = r.content_type().to_string();
    let mut bytes = Vec::new();
    r.into_reader().read_to_end(&mut bytes).unwrap();
    (content_type, bytes)
}

/// Frames of a video file as ffprobe counts them (None: not a video it can read).
fn ffprobe_frames(path: &Path) -> Option<(String, u64)> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe (Debian's ffmpeg) must be installed");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (codec, frames) = text.split_once(',')?;
    Some((codec.to_string(), frames.parse().ok()?))
}

/// Checks a finished job's clip is a real H.264 MP4 with `frames` frames, and
/// its recipe; returns the clip.
fn check_clip(server: &Server, token: &str, id: &str, prompt: &str, frames: u64) -> Vec<u8> {
    let (content_type, bytes) = download(server, token, &format!("/api/v1/jobs/{id}/clip"));
    assert_eq!(content_type, "video/mp4");
    let file = temp_dir("clip").join("clip.mp4");
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(
        ffprobe_frames(&file),
        Some(("h264".to_string(), frames)),
        "{id}: not a {frames}-frame H.264 MP4"
    );
    let recipe = get(server, &format!("/api/v1/jobs/{id}/recipe"), Some(token));
    assert_eq!(recipe.status, 200);
    assert_eq!(recipe.body["format"], "motif-recipe-v1");
    assert_eq!(recipe.body["prompt"], prompt);
    bytes
}

/// Reads the job's event stream to its end: (event name, data) pairs.
fn read_events(server: &Server, token: &str, id: &str) -> Vec<(String, Value)> {
    let r = ureq::get(&server.url(&format!("/api/v1/jobs/{id}/events")))
        .set("Authorization", &format!("Bearer {token}"))
        .timeout(Duration::from_secs(300))
        .call()
        .unwrap();
    assert_eq!(r.content_type(), "text/event-stream");
    let mut events = Vec::new();
    let mut name = String::new();
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            events.push((name.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    events
}

#[test]
fn submit_watch_progress_and_download_the_clip() {
    let data = temp_dir("submit");
    let server = Server::start(&data, &["--workers", "1"]);
    let token = create_token(&["--data", data.to_str().unwrap()], false);

    let prompt = "a yellow star spinning over the sea at night";
    let id = submit(&server, &token, &tiny_job(prompt, 3));
    let events = read_events(&server, &token, &id);
    let steps: Vec<(i64, i64)> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, d)| (d["step"].as_i64().unwrap(), d["total"].as_i64().unwrap()))
        .collect();
    assert!(
        steps.iter().all(|&(_, total)| total == 2) && steps.last() == Some(&(2, 2)),
        "progress events: {steps:?}"
    );
    let previews: Vec<&str> = events
        .iter()
        .filter_map(|(n, d)| (n == "progress").then(|| d["preview"].as_str()).flatten())
        .collect();
    assert!(
        previews
            .iter()
            .any(|p| p.starts_with("data:image/png;base64,") && p.len() > 100),
        "no preview image in {events:?}"
    );
    let (last, done) = events.last().unwrap();
    assert_eq!(last, "done");
    assert_eq!(done["state"], "finished", "{done}");
    let job = get(&server, &format!("/api/v1/jobs/{id}"), Some(&token)).body;
    assert_eq!(job["state"], "finished");
    assert_eq!(job["attempts"], 1);
    check_clip(&server, &token, &id, prompt, 4);

    // A still uploaded as a file (multipart/form-data, as `curl -F` sends
    // it) animated into a GIF. (Base64 inside the JSON takes the same path
    // from the API on: see the bad-input and retry tests.)
    let mut recipe = tiny_job("a white bird", 5);
    recipe["strength"] = json!(0.7);
    recipe["format"] = json!("gif");
    let (content_type, body) = multipart(&[
        (
            "recipe",
            None,
            "application/json",
            recipe.to_string().as_bytes(),
        ),
        ("image", Some("still.png"), "image/png", &png_still(48, 32)),
    ]);
    let a = post_multipart(&server, &token, &content_type, &body);
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.body["id"].as_str().unwrap().to_string();
    assert_eq!(a.body["request"]["strength"], json!(0.7), "{}", a.body);
    let job = wait_for_state(
        &server,
        &token,
        &id,
        &["finished", "failed"],
        Duration::from_secs(240),
    );
    assert_eq!(job["state"], "finished", "{job}");
    let (content_type, bytes) = download(&server, &token, &format!("/api/v1/jobs/{id}/clip"));
    assert_eq!(content_type, "image/gif");
    assert!(bytes.starts_with(b"GIF89a"));
    let recipe = get(&server, &format!("/api/v1/jobs/{id}/recipe"), Some(&token)).body;
    assert_eq!(recipe["image"], "(uploaded)", "{recipe}");
    assert!(
        (recipe["strength"].as_f64().unwrap() - 0.7).abs() < 1e-6,
        "{recipe}"
    );
}

/// A worker keeps its model loaded between jobs: three jobs for the bundled
/// model load it once (the worker's log says so for every job).
#[test]
fn a_worker_loads_its_model_once_for_several_jobs() {
    let data = temp_dir("kept");
    let server = Server::start(&data, &["--workers", "1"]);
    let token = create_token(&["--data", data.to_str().unwrap()], false);
    let ids: Vec<String> = (1..=3)
        .map(|seed| submit(&server, &token, &tiny_job("a red ball", seed)))
        .collect();
    for id in &ids {
        wait_for_state(&server, &token, id, &["finished"], Duration::from_secs(300));
    }
    let log = std::fs::read_to_string(&server.proc.log).unwrap();
    assert_eq!(log.matches("model loaded:").count(), 1, "{log}");
    assert_eq!(log.matches("model kept loaded:").count(), 2, "{log}");
}

/// A JSON body's base64 (the API's `image` field).
fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn bad_input_gets_4xx_naming_the_field() {
    let data = temp_dir("bad");
    let server = Server::start(&data, &["--workers", "0"]);
    let token = create_token(&["--data", data.to_str().unwrap()], false);
    let long_prompt = "a".repeat(1001);
    let not_an_image = base64_encode(b"GIF? no: just some text that is not an image at all");
    let huge = "A".repeat(9 << 20);
    let cases: Vec<(String, u16, &str)> = vec![
        (
            r#"{"prompt": "a ball", "promt": "typo"}"#.into(),
            400,
            "promt",
        ),
        (r#"{"negative": "x"}"#.into(), 400, "prompt"),
        (r#"{"prompt": "a ball", "width": 12}"#.into(), 400, "width"),
        (
            r#"{"prompt": "a ball", "height": 4096}"#.into(),
            400,
            "height",
        ),
        (
            r#"{"prompt": "a ball", "width": "wide"}"#.into(),
            400,
            "width",
        ),
        (r#"{"prompt": "a ball", "frames": 0}"#.into(), 400, "frames"),
        (
            r#"{"prompt": "a ball", "steps": 1000}"#.into(),
            400,
            "steps",
        ),
        (r#"{"prompt": "a ball", "fps": -1}"#.into(), 400, "fps"),
        (
            r#"{"prompt": "a ball", "guidance": 1e9}"#.into(),
            400,
            "guidance",
        ),
        (r#"{"prompt": "a ball", "motion": 9}"#.into(), 400, "motion"),
        (
            r#"{"prompt": "a ball", "camera": "sideways"}"#.into(),
            400,
            "camera",
        ),
        (
            r#"{"prompt": "a ball", "scheduler": "fast"}"#.into(),
            400,
            "scheduler",
        ),
        (
            r#"{"prompt": "a ball", "format": "avi"}"#.into(),
            400,
            "format",
        ),
        (
            r#"{"prompt": "a ball", "aspect": "wide"}"#.into(),
            400,
            "aspect",
        ),
        (
            r#"{"prompt": "a ball", "style": "no-such-style"}"#.into(),
            400,
            "style",
        ),
        (
            r#"{"prompt": "a ball", "model": "no-such-model"}"#.into(),
            400,
            "model",
        ),
        (
            r#"{"prompt": "a ball", "model": "../../etc"}"#.into(),
            400,
            "model",
        ),
        (r#"{"prompt": "a ball", "seed": -3}"#.into(), 400, "seed"),
        (
            r#"{"prompt": "a ball", "strength": 0.5}"#.into(),
            400,
            "strength",
        ),
        (format!(r#"{{"prompt": "{long_prompt}"}}"#), 400, "prompt"),
        (
            format!(r#"{{"prompt": "a ball", "image": "{not_an_image}"}}"#),
            400,
            "image",
        ),
        (
            r#"{"prompt": "a ball", "image": "%%%"}"#.into(),
            400,
            "image",
        ),
        (
            format!(r#"{{"prompt": "a ball", "image": "{huge}"}}"#),
            413,
            "body",
        ),
        (r#"{"prompt": "a ball""#.into(), 400, "body"),
        ("[1, 2]".into(), 400, "body"),
        ("".into(), 400, "body"),
    ];
    for (body, status, field) in &cases {
        let a = post(&server, "/api/v1/jobs", Some(&token), body);
        let shown: String = body.chars().take(80).collect();
        assert_eq!(a.status, *status, "{shown}: {}", a.body);
        assert_eq!(a.body["field"], *field, "{shown}: {}", a.body);
        assert!(a.body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }

    // The same checks for a multipart submission, and its own: parts by name.
    let recipe = tiny_job("a ball", 1).to_string();
    let still = png_still(16, 16);
    let not_an_image = b"GIF? no: just some text that is not an image at all";
    // Over the 4 MiB still limit, within the 8 MiB body limit: the field is named.
    let big_still = vec![0x89u8; 5 << 20];
    let too_big = vec![0x89u8; 9 << 20];
    let bad_width = r#"{"prompt": "a ball", "width": 12}"#;
    let with_image = format!(
        r#"{{"prompt": "a ball", "image": "{}"}}"#,
        base64_encode(&still)
    );
    type Parts<'a> = Vec<(&'a str, Option<&'a str>, &'a str, &'a [u8])>;
    let json_part = "application/json";
    let multipart_cases: Vec<(Parts, u16, &str)> = vec![
        (
            vec![
                ("recipe", None, json_part, recipe.as_bytes()),
                ("image", Some("a.png"), "image/png", not_an_image),
            ],
            400,
            "image",
        ),
        (
            vec![
                ("recipe", None, json_part, recipe.as_bytes()),
                ("image", Some("a.png"), "image/png", b""),
            ],
            400,
            "image",
        ),
        (
            vec![
                ("recipe", None, json_part, recipe.as_bytes()),
                ("image", Some("a.png"), "image/png", &big_still),
            ],
            400,
            "image",
        ),
        (
            vec![
                ("recipe", None, json_part, recipe.as_bytes()),
                ("image", Some("a.png"), "image/png", &too_big),
            ],
            413,
            "body",
        ),
        (
            vec![("image", Some("a.png"), "image/png", &still)],
            400,
            "recipe",
        ),
        (
            vec![
                ("recipe", None, json_part, b"{\"prompt\": "),
                ("image", Some("a.png"), "image/png", &still),
            ],
            400,
            "recipe",
        ),
        (
            vec![
                ("recipe", None, json_part, bad_width.as_bytes()),
                ("image", Some("a.png"), "image/png", &still),
            ],
            400,
            "width",
        ),
        (
            vec![
                ("recipe", None, json_part, recipe.as_bytes()),
                ("photo", Some("a.png"), "image/png", &still),
            ],
            400,
            "photo",
        ),
        (
            vec![
                ("recipe", None, json_part, recipe.as_bytes()),
                ("recipe", None, json_part, recipe.as_bytes()),
            ],
            400,
            "recipe",
        ),
        (
            vec![
                ("recipe", None, json_part, with_image.as_bytes()),
                ("image", Some("a.png"), "image/png", &still),
            ],
            400,
            "image",
        ),
    ];
    for (parts, status, field) in &multipart_cases {
        let (content_type, body) = multipart(parts);
        let a = post_multipart(&server, &token, &content_type, &body);
        let names: Vec<&str> = parts.iter().map(|p| p.0).collect();
        assert_eq!(a.status, *status, "parts {names:?}: {}", a.body);
        assert_eq!(a.body["field"], *field, "parts {names:?}: {}", a.body);
    }
    // A multipart type without its boundary is not a body anyone can read.
    let a = post_multipart(&server, &token, "multipart/form-data", b"--x\r\n");
    assert_eq!(
        (a.status, a.body["field"].as_str()),
        (400, Some("body")),
        "{}",
        a.body
    );

    // Query and path input too.
    let a = get(&server, "/api/v1/jobs?limit=0", Some(&token));
    assert_eq!((a.status, a.body["field"].as_str()), (400, Some("limit")));
    let a = get(&server, "/api/v1/jobs?state=lost", Some(&token));
    assert_eq!((a.status, a.body["field"].as_str()), (400, Some("state")));
    let a = get(&server, "/api/v1/jobs?colour=red", Some(&token));
    assert_eq!(a.status, 400, "{}", a.body);
    let a = get(&server, "/api/v1/jobs/no-such-job", Some(&token));
    assert_eq!(a.status, 404);
    // Nothing of that was queued.
    let list = get(&server, "/api/v1/jobs", Some(&token));
    assert_eq!(list.body["jobs"].as_array().unwrap().len(), 0);
}

#[test]
fn tokens_see_and_cancel_only_their_own_jobs() {
    let data = temp_dir("auth");
    let server = Server::start(&data, &["--workers", "0"]);
    let store = ["--data", data.to_str().unwrap()];
    let (alice, bob, admin) = (
        create_token(&store, false),
        create_token(&store, false),
        create_token(&store, true),
    );
    let job = tiny_job("a red ball", 1).to_string();

    assert_eq!(post(&server, "/api/v1/jobs", None, &job).status, 401);
    assert_eq!(
        post(&server, "/api/v1/jobs", Some("motif_forged"), &job).status,
        401
    );
    assert_eq!(get(&server, "/api/v1/jobs", None).status, 401);

    let id = submit(&server, &alice, &tiny_job("a red ball", 1));
    let second = submit(&server, &alice, &tiny_job("a blue cube", 2));
    let queued = get(&server, &format!("/api/v1/jobs/{second}"), Some(&alice)).body;
    assert_eq!(queued["state"], "queued");
    assert_eq!(queued["queue_position"], 1, "{queued}");

    let path = format!("/api/v1/jobs/{id}");
    assert_eq!(get(&server, &path, Some(&bob)).status, 404);
    assert_eq!(
        get(&server, &format!("{path}/events"), Some(&bob)).status,
        404
    );
    assert_eq!(
        get(&server, &format!("{path}/clip"), Some(&bob)).status,
        404
    );
    assert_eq!(
        post(&server, &format!("{path}/cancel"), Some(&bob), "").status,
        404
    );
    assert_eq!(
        get(&server, "/api/v1/jobs", Some(&bob)).body["jobs"],
        json!([])
    );
    assert_eq!(
        get(&server, "/api/v1/jobs", Some(&alice)).body["jobs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Not finished: no clip yet.
    assert_eq!(
        get(&server, &format!("{path}/clip"), Some(&alice)).status,
        409
    );

    // The admin sees and cancels everyone's jobs.
    assert_eq!(get(&server, &path, Some(&admin)).body["state"], "queued");
    assert_eq!(
        get(&server, "/api/v1/jobs", Some(&admin)).body["jobs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let cancelled = post(&server, &format!("{path}/cancel"), Some(&admin), "");
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.body["state"], "cancelled");
    assert_eq!(
        post(&server, &format!("{path}/cancel"), Some(&alice), "").status,
        409
    );
    // Alice cancels her own.
    let a = post(
        &server,
        &format!("/api/v1/jobs/{second}/cancel"),
        Some(&alice),
        "",
    );
    assert_eq!(
        (a.status, a.body["state"].as_str()),
        (200, Some("cancelled"))
    );

    // The token is stored hashed: the database file does not contain it.
    let db = std::fs::read(data.join("motif.db")).unwrap();
    let wal = std::fs::read(data.join("motif.db-wal")).unwrap_or_default();
    for t in [&alice, &bob, &admin] {
        let needle = t.as_bytes();
        assert!(!db.windows(needle.len()).any(|w| w == needle));
        assert!(!wal.windows(needle.len()).any(|w| w == needle));
    }
}

#[test]
fn per_token_limits_answer_429_with_retry_after() {
    let data = temp_dir("limits");
    let server = Server::start(
        &data,
        &[
            "--workers",
            "0",
            "--max-active-per-token",
            "2",
            "--submissions-per-minute",
            "3",
        ],
    );
    let store = ["--data", data.to_str().unwrap()];
    let (token, other) = (create_token(&store, false), create_token(&store, false));
    let body = tiny_job("a green tree", 1).to_string();
    let first = submit(&server, &token, &tiny_job("a green tree", 1));
    submit(&server, &token, &tiny_job("a green tree", 2));
    // Two queued: the third is refused until one ends.
    let a = post(&server, "/api/v1/jobs", Some(&token), &body);
    assert_eq!(a.status, 429, "{}", a.body);
    assert!(a
        .retry_after
        .as_deref()
        .and_then(|s| s.parse::<u64>().ok())
        .is_some_and(|s| s >= 1));
    post(
        &server,
        &format!("/api/v1/jobs/{first}/cancel"),
        Some(&token),
        "",
    );
    submit(&server, &token, &tiny_job("a green tree", 3));
    let jobs = get(&server, "/api/v1/jobs?state=queued", Some(&token)).body;
    let queued = jobs["jobs"][0]["id"].as_str().unwrap().to_string();
    post(
        &server,
        &format!("/api/v1/jobs/{queued}/cancel"),
        Some(&token),
        "",
    );
    // Three submissions within the minute: the fourth waits for the window.
    let a = post(&server, "/api/v1/jobs", Some(&token), &body);
    assert_eq!(a.status, 429, "{}", a.body);
    let wait: u64 = a.retry_after.as_deref().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    // Another token is not affected.
    submit(&server, &other, &tiny_job("a green tree", 4));
}

#[test]
fn killed_server_restarts_and_finishes_every_job() {
    let data = temp_dir("kill-server");
    let mut server = Server::start(&data, &["--workers", "1"]);
    let token = create_token(&["--data", data.to_str().unwrap()], false);
    let first = submit(&server, &token, &tiny_job("a white bird", 7));
    let second = submit(&server, &token, &tiny_job("a blue fish", 8));
    wait_for_state(
        &server,
        &token,
        &first,
        &["running"],
        Duration::from_secs(60),
    );
    server.proc.kill();

    let server = Server::start(&data, &["--workers", "1"]);
    for (id, prompt) in [(&first, "a white bird"), (&second, "a blue fish")] {
        let job = wait_for_state(
            &server,
            &token,
            id,
            &["finished", "failed"],
            Duration::from_secs(240),
        );
        assert_eq!(job["state"], "finished", "{job}");
        check_clip(&server, &token, id, prompt, 4);
    }
    // The interrupted job ran again; the queued one once.
    let first_job = get(&server, &format!("/api/v1/jobs/{first}"), Some(&token)).body;
    assert_eq!(first_job["attempts"], 2, "{first_job}");
    let second_job = get(&server, &format!("/api/v1/jobs/{second}"), Some(&token)).body;
    assert_eq!(second_job["attempts"], 1, "{second_job}");
    // No temporary or orphaned clip was left: one clip and one recipe per job.
    let mut names: Vec<String> = std::fs::read_dir(data.join("clips"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".json"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
}

/// Waits until the job has done at least one denoising step.
fn wait_for_a_step(server: &Server, token: &str, id: &str) {
    let start = Instant::now();
    while get(server, &format!("/api/v1/jobs/{id}"), Some(token)).body["step"]
        .as_i64()
        .unwrap_or(0)
        < 1
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no step after 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn running_jobs_cancel_and_a_stopped_server_puts_its_job_back() {
    let data = temp_dir("cancel");
    let server = Server::start(&data, &["--workers", "1"]);
    let token = create_token(&["--data", data.to_str().unwrap()], false);
    // Long enough (40 steps) to be caught running.
    let mut long = tiny_job("a red ball bouncing", 11);
    long["steps"] = json!(40);

    let id = submit(&server, &token, &long);
    wait_for_a_step(&server, &token, &id);
    let a = post(
        &server,
        &format!("/api/v1/jobs/{id}/cancel"),
        Some(&token),
        "",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["cancel_requested"], true, "{}", a.body);
    let job = wait_for_state(
        &server,
        &token,
        &id,
        &["cancelled", "finished", "failed"],
        Duration::from_secs(30),
    );
    assert_eq!(job["state"], "cancelled", "{job}");
    assert!(job["step"].as_i64().unwrap() < 40, "{job}");
    assert_eq!(
        get(&server, &format!("/api/v1/jobs/{id}/clip"), Some(&token)).status,
        409
    );

    // SIGTERM: the worker stops within a step and hands its job back unspent.
    let id = submit(&server, &token, &long);
    wait_for_a_step(&server, &token, &id);
    let mut server = server;
    let pid = server.proc.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    while server.proc.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let server = Server::start(&data, &["--workers", "0"]);
    let job = get(&server, &format!("/api/v1/jobs/{id}"), Some(&token)).body;
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(job["attempts"], 0, "{job}");
}

#[test]
fn a_corrupt_still_fails_at_once_with_its_error() {
    let data = temp_dir("retry");
    let server = Server::start(&data, &["--workers", "1", "--max-attempts", "2"]);
    let token = create_token(&["--data", data.to_str().unwrap()], false);
    // A PNG whose header is sound (the API checks it) but whose pixels are cut
    // off: the worker's decoder would fail every time, so it is not retried.
    let mut png_bytes = Vec::new();
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 9]))
        .write_to(
            &mut std::io::Cursor::new(&mut png_bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    png_bytes.truncate(png_bytes.len() - 20);
    let mut job = tiny_job("a red ball", 1);
    job["image"] = json!(base64_encode(&png_bytes));
    let id = submit(&server, &token, &job);
    let job = wait_for_state(
        &server,
        &token,
        &id,
        &["failed", "finished"],
        Duration::from_secs(60),
    );
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    assert!(job["error"].as_str().unwrap().contains("image"), "{job}");
}

// ---- PostgreSQL ----

fn start_worker(url: &str, data: &Path, lease_seconds: &str) -> Proc {
    Proc::spawn(
        "motif-worker",
        &[
            "worker",
            "--database",
            url,
            "--data",
            data.to_str().unwrap(),
            "--lease-seconds",
            lease_seconds,
        ],
    )
}

#[test]
fn postgres_two_workers_share_one_queue() {
    let database = PgDatabase::create("share");
    let url = database.url.clone();
    let data = temp_dir("pg-share");
    let server = Server::start(&data, &["--workers", "0", "--database", &url]);
    let token = create_token(&["--database", &url], false);
    let jobs: Vec<(String, String)> = (0..4)
        .map(|i| {
            let prompt = format!("a red ball moving left, take {i}");
            (submit(&server, &token, &tiny_job(&prompt, i)), prompt)
        })
        .collect();
    let _workers = [
        start_worker(&url, &data, "10"),
        start_worker(&url, &data, "10"),
    ];
    for (id, prompt) in &jobs {
        let job = wait_for_state(
            &server,
            &token,
            id,
            &["finished", "failed"],
            Duration::from_secs(300),
        );
        assert_eq!(job["state"], "finished", "{job}");
        assert_eq!(job["attempts"], 1, "a job was claimed twice: {job}");
        check_clip(&server, &token, id, prompt, 4);
    }
    let clips = std::fs::read_dir(data.join("clips"))
        .unwrap()
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".json")
        })
        .count();
    assert_eq!(clips, 4, "one clip per job, none run twice");
}

#[test]
fn postgres_killed_worker_job_is_requeued_and_finishes() {
    let database = PgDatabase::create("kill");
    let url = database.url.clone();
    let data = temp_dir("pg-kill");
    let server = Server::start(&data, &["--workers", "0", "--database", &url]);
    let token = create_token(&["--database", &url], false);
    let id = submit(&server, &token, &tiny_job("a yellow star", 9));
    let mut doomed = start_worker(&url, &data, "3");
    wait_for_state(&server, &token, &id, &["running"], Duration::from_secs(60));
    doomed.kill();
    // Still running on paper until the lease lapses; then the next worker takes it.
    let _worker = start_worker(&url, &data, "3");
    let job = wait_for_state(
        &server,
        &token,
        &id,
        &["finished", "failed"],
        Duration::from_secs(240),
    );
    assert_eq!(job["state"], "finished", "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    check_clip(&server, &token, &id, "a yellow star", 4);
}

// ---- the S3 clip store ----

/// moto's S3 server on a port of its own for one test, killed when dropped:
/// an IAM user with S3 rights and a bucket, then signatures are enforced.
struct Moto {
    _proc: Proc,
    endpoint: String,
    key_id: String,
    secret: String,
}

/// The text of `<tag>...</tag>` in an XML answer.
fn xml_text(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    let end = xml[start..].find('<').unwrap() + start;
    xml[start..end].to_string()
}

fn moto(bucket: &str) -> Moto {
    let server = std::env::var("MOTIF_TEST_MOTO").unwrap_or_else(|_| {
        panic!(
            "MOTIF_TEST_MOTO is not set: the S3 store tests need moto's S3 server \
             (`bash tools/test.sh` installs it; locally: python3 -m pip install 'moto[server]' and \
             MOTIF_TEST_MOTO=$(command -v moto_server))"
        )
    });
    let port = free_port();
    let log = std::env::temp_dir().join(format!("moto-{}.log", unique()));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(&server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // The first four actions (below) go unsigned; moto checks every later
        // request's signature against its IAM users, as AWS does.
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("MOTIF_TEST_MOTO={server}: {e}"));
    eprintln!("moto: pid {}, log {}", child.id(), log.display());
    let proc = Proc {
        child,
        log,
        name: "moto".into(),
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "moto did not start within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // moto routes a request by the service named in its credential scope.
    let iam = |form: &[(&str, &str)]| -> String {
        ureq::post(&format!("{endpoint}/"))
            .set(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=AKIASETUP/20260101/us-east-1/iam/aws4_request, \
                 SignedHeaders=host, Signature=0",
            )
            .send_form(form)
            .unwrap_or_else(|e| panic!("moto IAM {form:?}: {e}"))
            .into_string()
            .unwrap()
    };
    iam(&[
        ("Action", "CreateUser"),
        ("UserName", "motif"),
        ("Version", "2010-05-08"),
    ]);
    iam(&[
        ("Action", "PutUserPolicy"),
        ("UserName", "motif"),
        ("PolicyName", "clips"),
        (
            "PolicyDocument",
            r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}"#,
        ),
        ("Version", "2010-05-08"),
    ]);
    let key = iam(&[
        ("Action", "CreateAccessKey"),
        ("UserName", "motif"),
        ("Version", "2010-05-08"),
    ]);
    ureq::put(&format!("{endpoint}/{bucket}"))
        .call()
        .unwrap_or_else(|e| panic!("creating the bucket {bucket}: {e}"));
    Moto {
        _proc: proc,
        endpoint,
        key_id: xml_text(&key, "AccessKeyId"),
        secret: xml_text(&key, "SecretAccessKey"),
    }
}

impl Moto {
    /// The environment of a process that uses this bucket store.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
    }

    /// Keys and sizes of the objects in `bucket`, from moto's dump of its
    /// state (which needs no signature).
    fn objects(&self, bucket: &str) -> Vec<(String, u64)> {
        let state: Value = ureq::get(&format!("{}/moto-api/data.json", self.endpoint))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        state["s3"]["FakeKey"]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            // The dump keeps deleted and overwritten objects, marked disposed.
            .filter(|k| k["bucket_name"] == bucket && k["disposed"] == false)
            .map(|k| {
                (
                    k["name"].as_str().unwrap().to_string(),
                    k["contentsize"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Runs `motif ARGS` that must exit (within 60 s): its status and stderr.
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut child = motif_command(args, env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("motif {args:?} still running after 60 s: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn s3_store_worker_writes_the_bucket_and_the_server_streams_it() {
    let bucket = "motif-clips";
    let store = format!("s3://{bucket}/runs");
    let moto = moto(bucket);
    let env = moto.env();
    let env = env_refs(&env);
    let database = PgDatabase::create("s3");
    let url = database.url.clone();
    let data = temp_dir("s3-server");
    let s3 = [
        "--store",
        store.as_str(),
        "--s3-endpoint",
        moto.endpoint.as_str(),
    ];
    let mut args = vec!["--workers", "0", "--database", url.as_str()];
    args.extend_from_slice(&s3);
    let server = Server::start_with_env(&data, &args, &env);
    let token = create_token(&["--database", &url], false);
    let prompt = "a red kite over a green hill";
    let id = submit(&server, &token, &tiny_job(prompt, 21));
    // A worker on "another machine": no shared folder, only the database and
    // the bucket (no --data: it keeps its scratch files in the temporary folder).
    let mut worker_args = vec![
        "worker",
        "--database",
        url.as_str(),
        "--lease-seconds",
        "10",
    ];
    worker_args.extend_from_slice(&s3);
    let _worker = Proc::spawn_with_env("motif-worker-s3", &worker_args, &env);
    let job = wait_for_state(
        &server,
        &token,
        &id,
        &["finished", "failed"],
        Duration::from_secs(240),
    );
    assert_eq!(job["state"], "finished", "{job}");
    let clip = check_clip(&server, &token, &id, prompt, 4);

    // The clip and its recipe are objects under the prefix, nothing else is
    // (the startup checks cleaned up after themselves), and the server
    // streamed exactly the stored clip.
    let mut objects = moto.objects(bucket);
    objects.sort();
    let names: Vec<&str> = objects.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names.len(), 2, "{objects:?}");
    assert!(
        names.iter().all(|k| k.starts_with(&format!("runs/{id}-"))),
        "{objects:?}"
    );
    let stored_clip = objects
        .iter()
        .find(|(k, _)| k.ends_with(".mp4"))
        .expect("no .mp4 object");
    assert_eq!(stored_clip.1, clip.len() as u64, "{objects:?}");
    // Nothing went to the server's own folder.
    let local: Vec<_> = std::fs::read_dir(data.join("clips"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(local.is_empty(), "{local:?}");
}

#[test]
fn s3_store_misconfiguration_stops_startup_with_a_clear_error() {
    let bucket = "motif-clips";
    let moto = moto(bucket);
    let good = moto.env();
    let data = temp_dir("s3-bad");
    let data = data.to_str().unwrap();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let mut wrong_secret = good.clone();
    wrong_secret[1].1 = "not-the-secret".into();
    let serve = |store: &str, endpoint: &str, env: &[(&'static str, String)]| {
        run_to_exit(
            &[
                "serve",
                "--data",
                data,
                "--workers",
                "0",
                "--listen",
                "127.0.0.1:0",
                "--store",
                store,
                "--s3-endpoint",
                endpoint,
            ],
            &env_refs(env),
        )
    };
    let cases: Vec<(&str, (bool, String), Vec<&str>)> = vec![
        (
            "no such bucket",
            serve("s3://no-such-bucket/x", &moto.endpoint, &good),
            vec!["--store s3://no-such-bucket/x", "no such bucket"],
        ),
        (
            "wrong secret",
            serve("s3://motif-clips/x", &moto.endpoint, &wrong_secret),
            vec![
                "--store s3://motif-clips/x",
                "credentials were refused",
                "AWS_SECRET_ACCESS_KEY",
            ],
        ),
        (
            "no credentials",
            serve("s3://motif-clips/x", &moto.endpoint, &[]),
            vec!["--store s3://motif-clips/x", "AWS_ACCESS_KEY_ID is not set"],
        ),
        (
            "nothing at the endpoint",
            serve("s3://motif-clips/x", &closed, &good),
            vec!["--store s3://motif-clips/x", &closed, "--s3-endpoint"],
        ),
        (
            "not an s3:// URL",
            serve("/srv/clips", &moto.endpoint, &good),
            vec!["--store /srv/clips", "s3://BUCKET"],
        ),
    ];
    for (what, (ok, stderr), expected) in &cases {
        assert!(!ok, "{what}: the server started");
        for e in expected {
            assert!(stderr.contains(e), "{what}: `{e}` not in: {stderr}");
        }
    }
    // A worker checks the same way before it claims any job.
    let (ok, stderr) = run_to_exit(
        &[
            "worker",
            "--database",
            "postgres://nobody@127.0.0.1:1/none",
            "--store",
            "s3://no-such-bucket",
            "--s3-endpoint",
            &moto.endpoint,
        ],
        &env_refs(&good),
    );
    assert!(
        !ok && stderr.contains("--store s3://no-such-bucket") && stderr.contains("no such bucket"),
        "{stderr}"
    );
    // The good configuration starts.
    let server = Server::start_with_env(
        Path::new(data),
        &[
            "--workers",
            "0",
            "--store",
            "s3://motif-clips/x",
            "--s3-endpoint",
            &moto.endpoint,
        ],
        &env_refs(&good),
    );
    assert_eq!(get(&server, "/api/v1/health", None).status, 200);
}

// ---- the OpenAPI document against the running server ----

#[test]
fn openapi_document_holds_under_schemathesis() {
    // schemathesis from PyPI; `tools/test.sh` installs it.
    let st = std::env::var("MOTIF_SCHEMATHESIS").unwrap_or_else(|_| "st".to_string());
    let found = Command::new(&st).arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|o| o.status.success()),
        "schemathesis (`{st}`) is not installed: `python3 -m pip install schemathesis` (or set MOTIF_SCHEMATHESIS)"
    );
    let data = temp_dir("schemathesis");
    // API only: the fuzzer's jobs stay queued. Limits high enough that valid
    // submissions are judged on their content, not refused with 429.
    let server = Server::start(
        &data,
        &[
            "--workers",
            "0",
            "--max-active-per-token",
            "100000",
            "--submissions-per-minute",
            "100000",
        ],
    );
    let token = create_token(&["--data", data.to_str().unwrap()], false);
    let out = Command::new(&st)
        .current_dir(&data)
        .args([
            "run",
            &server.url("/api/v1/openapi.json"),
            "--header",
            &format!("Authorization: Bearer {token}"),
            "--checks",
            // positive_data_acceptance: every request the document allows is
            // accepted, which holds because the served document lists this
            // server's style and model names.
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,positive_data_acceptance",
            // The stateful phase would follow Location links into event streams
            // of jobs that never run here.
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "40",
            // Event streams of queued jobs stay open: cut them short.
            "--request-timeout",
            "2",
            "--seed",
            "1",
            "--no-color",
        ])
        // Real PNG stills for `image`, which no JSON schema can describe.
        .env(
            "SCHEMATHESIS_HOOKS",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis_hooks.py"),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
}

// ---- API throughput (docs/PERFORMANCE.md), run by hand ----

/// `cargo test --release --test serve -- --ignored api_throughput --nocapture`:
/// jobs accepted per second, then p99 latency of `GET /api/v1/jobs/{id}`, with
/// 200 concurrent clients against an API-only server on the SQLite file.
#[test]
#[ignore = "a measurement for docs/PERFORMANCE.md, not a check"]
fn api_throughput() {
    const CLIENTS: usize = 200;
    const REQUESTS_PER_CLIENT: usize = 20;
    let data = temp_dir("throughput");
    let server = Server::start(
        &data,
        &[
            "--workers",
            "0",
            "--max-active-per-token",
            "1000000",
            "--submissions-per-minute",
            "1000000",
        ],
    );
    let token = create_token(&["--data", data.to_str().unwrap()], false);
    let run = |path_of: &(dyn Fn(usize, usize) -> Option<String> + Sync)| -> (f64, Vec<f64>) {
        let start = Instant::now();
        let latencies: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..CLIENTS)
                .map(|c| {
                    let (server, token) = (&server, &token);
                    s.spawn(move || {
                        let agent = ureq::AgentBuilder::new().build();
                        let mut times = Vec::new();
                        for i in 0..REQUESTS_PER_CLIENT {
                            let t = Instant::now();
                            let auth = format!("Bearer {token}");
                            let status = match path_of(c, i) {
                                Some(path) => agent
                                    .get(&server.url(&path))
                                    .set("Authorization", &auth)
                                    .call()
                                    .map(|r| r.status()),
                                None => agent
                                    .post(&server.url("/api/v1/jobs"))
                                    .set("Authorization", &auth)
                                    .send_json(tiny_job("a red ball", (c * 1000 + i) as u64))
                                    .map(|r| r.status()),
                            };
                            assert!(matches!(status, Ok(200 | 202)), "{status:?}");
                            times.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        times
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        (start.elapsed().as_secs_f64(), latencies)
    };
    let report = |what: &str, (seconds, mut ms): (f64, Vec<f64>)| {
        ms.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| ms[((ms.len() as f64 * p) as usize).min(ms.len() - 1)];
        println!(
            "{what}: {} requests from {CLIENTS} clients in {seconds:.2} s = {:.0}/s; latency p50 {:.1} ms, p99 {:.1} ms",
            ms.len(),
            ms.len() as f64 / seconds,
            pct(0.5),
            pct(0.99)
        );
    };
    report("POST /api/v1/jobs", run(&|_, _| None));
    let id = submit(&server, &token, &tiny_job("a red ball", 1));
    let path = format!("/api/v1/jobs/{id}");
    report("GET /api/v1/jobs/{id}", run(&|_, _| Some(path.clone())));
}

/// A Wan 2.1 folder in the server's models folder (`MOTIF_MODELS`): listed
/// by `motif models` with its family, named by a job, run by a worker into a
/// 5-frame H.264 MP4 (a preview with every step event).
#[test]
fn a_job_runs_on_a_wan_model_from_the_models_folder() {
    let data = temp_dir("wan");
    let models = data.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let wan = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan-a");
    std::os::unix::fs::symlink(&wan, models.join("wan-tiny")).unwrap();
    let models_env = models.to_str().unwrap();
    let no_cache = data.join("no-hf-cache");
    let env = [
        ("MOTIF_MODELS", models_env),
        ("HF_HUB_CACHE", no_cache.to_str().unwrap()),
    ];

    let listed = motif_command(&["models"], &env).output().unwrap();
    assert!(listed.status.success());
    let text = String::from_utf8_lossy(&listed.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("wan-tiny"))
        .unwrap_or_else(|| panic!("wan-tiny not listed:\n{text}"));
    assert!(
        line.contains("Wan") && line.contains("WanPipeline") && line.contains("models folder"),
        "{line}"
    );

    let server = Server::start_with_env(&data, &["--workers", "1"], &env);
    let token = create_token(&["--data", data.to_str().unwrap()], false);
    let prompt = "a red ball bouncing on grass";
    let job = json!({"prompt": prompt, "model": "wan-tiny", "width": 48, "height": 32,
                     "frames": 5, "steps": 2, "seed": 11});
    let id = submit(&server, &token, &job);
    let events = read_events(&server, &token, &id);
    // The stream sends the latest progress, and a tiny model's steps can
    // all fall between two sends (under load): every step event that did
    // come counts 2 steps and carries the forming clip's preview.
    for (name, d) in &events {
        if name == "progress" {
            assert_eq!(d["total"], json!(2), "{d}");
            if d["step"].as_u64() > Some(0) {
                let preview = d["preview"].as_str().unwrap_or_default();
                assert!(preview.starts_with("data:image/png;base64,"), "{d}");
            }
        }
    }
    let (last, done) = events.last().unwrap();
    assert_eq!(
        (last.as_str(), &done["state"]),
        ("done", &json!("finished")),
        "{done}"
    );
    check_clip(&server, &token, &id, prompt, 5);
    let recipe = get(&server, &format!("/api/v1/jobs/{id}/recipe"), Some(&token)).body;
    assert_eq!(recipe["model"], "wan-tiny", "{recipe}");
    assert_eq!(
        (recipe["width"].as_u64(), recipe["height"].as_u64()),
        (Some(48), Some(32))
    );
}

/// Native image-to-video through `motif serve`: Wan2.1-I2V and first-last
/// frame folders in the models folder take their stills as multipart parts
/// (`image`, `last_image`), the gallery's recipe says they were uploaded,
/// and every still a model cannot take is refused at submission with a 4xx
/// naming its part.
#[test]
fn image_to_video_jobs_take_image_and_last_image_parts() {
    let data = temp_dir("i2v");
    let models = data.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (folder, name) in [
        ("wan-i2v", "wan-i2v"),
        ("wan-flf2v", "wan-flf2v"),
        ("wan-a", "wan-tiny"),
    ] {
        std::os::unix::fs::symlink(fixtures.join(folder), models.join(name)).unwrap();
    }
    let no_cache = data.join("no-hf-cache");
    let env = [
        ("MOTIF_MODELS", models.to_str().unwrap()),
        ("HF_HUB_CACHE", no_cache.to_str().unwrap()),
    ];
    let server = Server::start_with_env(&data, &["--workers", "1"], &env);
    let token = create_token(&["--data", data.to_str().unwrap()], false);

    let job = |model: &str, prompt: &str| {
        json!({"prompt": prompt, "model": model, "width": 48, "height": 32, "frames": 5,
               "steps": 2, "seed": 11})
    };
    let (first, last) = (png_still(48, 32), png_still(60, 40));
    let json_part = "application/json";
    let submit_parts = |recipe: &Value, parts: &[(&str, &[u8])]| {
        let text = recipe.to_string();
        let mut all: Vec<(&str, Option<&str>, &str, &[u8])> =
            vec![("recipe", None, json_part, text.as_bytes())];
        for (name, bytes) in parts {
            all.push((name, Some("still.png"), "image/png", bytes));
        }
        let (content_type, body) = multipart(&all);
        post_multipart(&server, &token, &content_type, &body)
    };
    let finished = |a: &Answer| -> String {
        assert_eq!(a.status, 202, "{}", a.body);
        let id = a.body["id"].as_str().unwrap().to_string();
        let done = wait_for_state(
            &server,
            &token,
            &id,
            &["finished", "failed"],
            Duration::from_secs(300),
        );
        assert_eq!(done["state"], "finished", "{done}");
        id
    };

    // First-last frame: both parts, a clip of 5 frames whose recipe says
    // both stills were uploaded (never the worker's paths).
    let prompt = "a ball rolling from left to right";
    let a = submit_parts(
        &job("wan-flf2v", prompt),
        &[("image", &first), ("last_image", &last)],
    );
    let id = finished(&a);
    check_clip(&server, &token, &id, prompt, 5);
    let recipe = get(&server, &format!("/api/v1/jobs/{id}/recipe"), Some(&token)).body;
    assert_eq!(
        (&recipe["image"], &recipe["last_image"], &recipe["model"]),
        (
            &json!("(uploaded)"),
            &json!("(uploaded)"),
            &json!("wan-flf2v")
        ),
        "{recipe}"
    );
    // The job's own fields never carry the stills.
    let shown = get(&server, &format!("/api/v1/jobs/{id}"), Some(&token)).body;
    assert!(shown["request"].get("last_image").is_none(), "{shown}");

    // Wan2.1-I2V with the still as base64 in the JSON, as the viewer sends it.
    let mut body = job("wan-i2v", prompt);
    body["image"] = json!(base64_encode(&first));
    let id = submit(&server, &token, &body);
    let done = wait_for_state(
        &server,
        &token,
        &id,
        &["finished", "failed"],
        Duration::from_secs(300),
    );
    assert_eq!(done["state"], "finished", "{done}");
    check_clip(&server, &token, &id, prompt, 5);

    // Refused at submission, each naming its part.
    let mut broken = png_still(48, 32);
    broken.truncate(20);
    let small = png_still(12, 20);
    let big = vec![0x89u8; 5 << 20];
    let mut with_strength = job("wan-i2v", "a");
    with_strength["strength"] = json!(0.5);
    // (recipe, still parts, status, field named, words of the error)
    type Case<'a> = (Value, Vec<(&'a str, &'a [u8])>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            job("wan-flf2v", "a"),
            vec![("last_image", &last)],
            400,
            "last_image",
            "first image",
        ),
        (
            job("wan-flf2v", "a"),
            vec![("image", &first), ("last_image", b"not an image at all")],
            400,
            "last_image",
            "PNG, JPEG or WebP",
        ),
        (
            job("wan-flf2v", "a"),
            vec![("image", &first), ("last_image", &broken)],
            400,
            "last_image",
            "",
        ),
        (
            job("wan-flf2v", "a"),
            vec![("image", &first), ("last_image", &small)],
            400,
            "last_image",
            "12x20",
        ),
        (
            job("wan-i2v", "a"),
            vec![("image", &small)],
            400,
            "image",
            "16",
        ),
        (
            job("wan-flf2v", "a"),
            vec![("image", &first), ("last_image", &big)],
            400,
            "last_image",
            "larger than",
        ),
        (
            job("wan-flf2v", "a"),
            vec![
                ("image", &first),
                ("last_image", &last),
                ("last_image", &last),
            ],
            400,
            "last_image",
            "twice",
        ),
        (
            job("wan-i2v", "a"),
            vec![("image", &first), ("last_image", &last)],
            400,
            "last_image",
            "first-last-frame",
        ),
        (
            json!({"prompt": "a", "width": 64, "height": 64, "frames": 4, "steps": 2}),
            vec![("image", &first), ("last_image", &last)],
            400,
            "last_image",
            "first-last-frame",
        ),
        (
            job("wan-tiny", "a"),
            vec![("image", &first)],
            400,
            "image",
            "takes no still",
        ),
        (job("wan-i2v", "a"), vec![], 400, "image", "image-to-video"),
        (
            job("wan-flf2v", "a"),
            vec![("image", &first)],
            400,
            "last_image",
            "first-last-frame",
        ),
        (
            with_strength,
            vec![("image", &first)],
            400,
            "strength",
            "does not apply",
        ),
    ];
    for (recipe, parts, status, field, says) in &cases {
        let a = submit_parts(recipe, parts);
        let names: Vec<&str> = parts.iter().map(|p| p.0).collect();
        assert_eq!(a.status, *status, "{recipe} {names:?}: {}", a.body);
        assert_eq!(a.body["field"], *field, "{recipe} {names:?}: {}", a.body);
        let error = a.body["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{recipe} {names:?}: {}", a.body);
    }
    // The same rule in a JSON body: a last image without a first.
    let mut body = job("wan-flf2v", "a");
    body["last_image"] = json!(base64_encode(&last));
    let a = post(&server, "/api/v1/jobs", Some(&token), &body.to_string());
    assert_eq!(
        (a.status, a.body["field"].as_str()),
        (400, Some("last_image")),
        "{}",
        a.body
    );
}
