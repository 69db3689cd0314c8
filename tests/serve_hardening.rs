//! Issue #25's points 1, 6, 8, 9, 10, 11 and 12 against real `motif serve`
//! and `motif worker` processes on 127.0.0.1: a job's size bound however it
//! is expressed, run errors that name the input and fail at once, Discord
//! replays, unsatisfiable ranges, leases on the database's clock, database
//! outages, and per-job worker logs. SQLite throughout; PostgreSQL
//! (`MOTIF_TEST_DATABASE_URL`) where the point is about the shared queue.
//! Generations are tiny, on the bundled model.

mod common;

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};

use common::{temp_dir, PgDatabase, Proc, Server, MOTIF};

fn create_token(store: &[&str], extra: &[&str]) -> String {
    let mut args = vec!["admin", "create-token"];
    args.extend_from_slice(store);
    args.extend_from_slice(extra);
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
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Status, `Retry-After` and JSON body of an answer, errors included.
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
    let text = response.into_string().unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        retry_after,
        body,
    }
}

fn post_job(server: &Server, token: &str, job: &Value) -> Answer {
    answer(
        ureq::post(&server.url("/api/v1/jobs"))
            .set("Authorization", &format!("Bearer {token}"))
            .set("Content-Type", "application/json")
            .send_string(&job.to_string()),
    )
}

fn get(server: &Server, path: &str, token: &str) -> Answer {
    answer(
        ureq::get(&server.url(path))
            .set("Authorization", &format!("Bearer {token}"))
            .call(),
    )
}

fn submit(server: &Server, token: &str, job: &Value) -> String {
    let a = post_job(server, token, job);
    assert_eq!(a.status, 202, "{}", a.body);
    a.body["id"].as_str().unwrap().to_string()
}

fn tiny_job(prompt: &str) -> Value {
    json!({"prompt": prompt, "width": 64, "height": 64, "frames": 4, "steps": 2, "seed": 1})
}

/// A job at the tests' size limit, the longest these tests may run: long
/// enough to be seen running after its first step.
fn slow_job(prompt: &str) -> Value {
    json!({"prompt": prompt, "width": 64, "height": 64, "frames": 4, "steps": 2, "seed": 2})
}

fn wait_for(server: &Server, token: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let a = get(server, &format!("/api/v1/jobs/{id}"), token);
        assert_eq!(a.status, 200, "{}", a.body);
        if done(&a.body) {
            return a.body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "job {id}: {}",
            a.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_state(server: &Server, token: &str, id: &str, states: &[&str]) -> Value {
    wait_for(server, token, id, |job| {
        states.contains(&job["state"].as_str().unwrap_or_default())
    })
}

fn log_of(proc: &Proc) -> String {
    std::fs::read_to_string(&proc.log).unwrap_or_default()
}

fn sqlite_url(data: &Path) -> String {
    format!("sqlite://{}/motif.db?mode=rwc", data.display())
}

/// `motif worker` on `url` with scratch (and clips) in `data`.
fn start_worker(url: &str, data: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "worker",
        "--database",
        url,
        "--data",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::spawn("motif-worker", &args)
}

/// A JSON body's base64 (the API's `image` field).
fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---- 1: `aspect` cannot escape the size bound ----

#[test]
fn aspect_cannot_escape_the_size_bound() {
    let data = temp_dir("aspect");
    let server = Server::start(&data, &["--workers", "0"]);
    let token = create_token(&["--data", data.to_str().unwrap()], &[]);
    for job in [
        // 1024x102400, 64 frames, 100 steps.
        json!({"prompt": "a red ball", "width": 1024, "aspect": "1:100", "frames": 64, "steps": 100}),
        // 16x1600.
        json!({"prompt": "a red ball", "width": 16, "aspect": "1:100"}),
        json!({"prompt": "a red ball", "height": 16, "aspect": "100:1"}),
        // The bundled model's 128x128 area at 1:100: 16x1280.
        json!({"prompt": "a red ball", "aspect": "1:100"}),
    ] {
        let a = post_job(&server, &token, &job);
        assert_eq!(a.status, 400, "{job} was accepted: {}", a.body);
        assert_eq!(a.body["field"], "aspect", "{}", a.body);
        assert!(
            a.body["error"].as_str().unwrap().contains("at most 1024"),
            "{}",
            a.body
        );
    }
    // Within the bound, an aspect ratio still works.
    let id = submit(
        &server,
        &token,
        &json!({"prompt": "a red ball", "width": 64, "aspect": "1:2"}),
    );
    assert_eq!(
        get(&server, "/api/v1/jobs", &token).body["jobs"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "only {id} was queued"
    );
}

// ---- 6: errors name the input, and input that cannot succeed fails at once ----

#[test]
fn a_corrupt_still_fails_at_once_without_server_paths() {
    let data = temp_dir("corrupt");
    let server = Server::start(&data, &["--workers", "1", "--max-attempts", "3"]);
    let token = create_token(&["--data", data.to_str().unwrap()], &[]);
    // A PNG whose header is sound (the API checks it) but whose pixels are cut off.
    let mut png = Vec::new();
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 9]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png.truncate(png.len() - 20);
    let mut job = tiny_job("a red ball");
    job["image"] = json!(base64(&png));
    let id = submit(&server, &token, &job);
    let job = wait_for_state(&server, &token, &id, &["failed", "finished"]);
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"], 1, "a corrupt still was retried: {job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("the uploaded image"), "{error}");
    let data_dir = std::fs::canonicalize(&data).unwrap();
    for path in [data_dir.to_str().unwrap(), "/tmp", ".png", "motif-"] {
        assert!(!error.contains(path), "the error shows `{path}`: {error}");
    }
    // The cause, with its path, is in the server's log for the operator.
    let log = log_of(&server.proc);
    assert!(log.contains(&format!("job {id}")), "{log}");
}

// ---- 8: Discord interactions are answered once ----

const APP_ID: &str = "424242";
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `motif serve` as the Discord app of `key`, Discord's API at a closed port
/// (what it posts back does not matter here).
fn discord_server(data: &Path, key: &SigningKey, extra: &[&str]) -> Server {
    let public_key: String = (key.verifying_key().as_bytes().iter())
        .map(|b| format!("{b:02x}"))
        .collect();
    let api_base = format!("http://127.0.0.1:{}/api/v10", common::free_port());
    let mut args = vec![
        "--workers",
        "0",
        "--discord-public-key",
        &public_key,
        "--discord-application-id",
        APP_ID,
        "--discord-api-base",
        &api_base,
        "--discord-defaults",
        r#"{"width": 64, "height": 64, "frames": 4, "steps": 2}"#,
    ];
    args.extend_from_slice(extra);
    Server::start_with_env(
        data,
        &args,
        &[("MOTIF_DISCORD_BOT_TOKEN", "test-bot-token")],
    )
}

/// A signed `/create` as Discord sends it: the same bytes each time it is posted.
fn signed_create(key: &SigningKey) -> (Vec<u8>, String, String) {
    let id = ((now_ms() - DISCORD_EPOCH_MS) << 22) | 7;
    let body = json!({
        "type": 2, "id": id.to_string(), "application_id": APP_ID, "token": format!("itoken{id}"),
        "channel_id": "555", "guild_id": "777",
        "member": { "user": { "id": "1001", "username": "ada" } },
        "data": { "id": "1", "name": "create", "type": 1,
                  "options": [{"name": "prompt", "value": "a red fox in the snow"}] },
    })
    .to_string()
    .into_bytes();
    let timestamp = (now_ms() / 1000).to_string();
    let mut message = timestamp.as_bytes().to_vec();
    message.extend_from_slice(&body);
    let signature: String = (key.sign(&message).to_bytes().iter())
        .map(|b| format!("{b:02x}"))
        .collect();
    (body, timestamp, signature)
}

fn post_interaction(server: &Server, signed: &(Vec<u8>, String, String)) -> Answer {
    answer(
        ureq::post(&server.url("/discord/interactions"))
            .set("Content-Type", "application/json")
            .set("X-Signature-Timestamp", &signed.1)
            .set("X-Signature-Ed25519", &signed.2)
            .send_bytes(&signed.0),
    )
}

/// Every job on the server, as an admin token sees them.
fn all_jobs(server: &Server, admin: &str) -> usize {
    let a = get(server, "/api/v1/jobs", admin);
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["jobs"].as_array().unwrap().len()
}

/// Sends one signed interaction to `first`, then the same bytes to `second`
/// (the same server, or another on the same database): one job, and 409.
fn replay_is_refused(first: &Server, second: &Server, admin: &str, key: &SigningKey) {
    let signed = signed_create(key);
    let a = post_interaction(first, &signed);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body, json!({"type": 5}));
    let start = Instant::now();
    while all_jobs(first, admin) < 1 {
        assert!(start.elapsed() < Duration::from_secs(30), "no job queued");
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = post_interaction(second, &signed);
    assert_eq!(again.status, 409, "a replay was answered: {}", again.body);
    assert!(
        again.body["error"]
            .as_str()
            .unwrap()
            .contains("already answered"),
        "{}",
        again.body
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(all_jobs(first, admin), 1, "the replay queued a second job");
}

#[test]
fn a_replayed_discord_interaction_is_refused() {
    let data = temp_dir("replay");
    let key = SigningKey::from_bytes(&[7; 32]);
    let server = discord_server(&data, &key, &[]);
    let admin = create_token(&["--data", data.to_str().unwrap()], &["--admin"]);
    replay_is_refused(&server, &server, &admin, &key);
}

#[test]
fn postgres_a_discord_interaction_replayed_to_another_server_is_refused() {
    let database = PgDatabase::create("replay");
    let url = database.url.clone();
    let key = SigningKey::from_bytes(&[9; 32]);
    let one = discord_server(&temp_dir("replay-a"), &key, &["--database", &url]);
    let two = discord_server(&temp_dir("replay-b"), &key, &["--database", &url]);
    let admin = create_token(&["--database", &url], &["--admin"]);
    replay_is_refused(&one, &two, &admin, &key);
}

// ---- 9: an unsatisfiable Range gets 416 ----

#[test]
fn an_unsatisfiable_range_gets_416() {
    let data = temp_dir("range");
    let server = Server::start(&data, &["--workers", "1"]);
    common::create_user(
        &["--data", data.to_str().unwrap()],
        "ranger",
        "a long enough password",
        false,
    );
    let token = create_token(&["--data", data.to_str().unwrap()], &["--user", "ranger"]);
    let id = submit(&server, &token, &tiny_job("a blue kite"));
    let job = wait_for_state(&server, &token, &id, &["finished", "failed"]);
    assert_eq!(job["state"], "finished", "{job}");
    let published = answer(
        ureq::post(&server.url(&format!("/api/v1/jobs/{id}/publish")))
            .set("Authorization", &format!("Bearer {token}"))
            .call(),
    );
    assert_eq!(published.status, 200, "{}", published.body);

    let video = server.url(&format!("/clips/{id}/video"));
    let whole = ureq::get(&video).call().unwrap();
    assert_eq!(whole.status(), 200);
    let mut bytes = Vec::new();
    whole.into_reader().read_to_end(&mut bytes).unwrap();
    let len = bytes.len();
    assert!(len > 100, "{len} bytes");

    // A range that can be served still is.
    let part = ureq::get(&video)
        .set("Range", "bytes=10-19")
        .call()
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.header("Content-Range"),
        Some(format!("bytes 10-19/{len}").as_str())
    );

    for range in [
        format!("bytes={len}-"),
        format!("bytes={}-{}", len + 100, len + 200),
        "bytes=-0".to_string(),
    ] {
        let response = match ureq::get(&video).set("Range", &range).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{range}: {e}"),
        };
        assert_eq!(response.status(), 416, "{range}");
        assert_eq!(
            response.header("Content-Range"),
            Some(format!("bytes */{len}").as_str()),
            "{range}"
        );
    }
}

// ---- 10: leases on the database's clock ----

/// A worker whose clock runs two minutes ahead of the one running a job
/// (lease 30 s) must not take that job: it is still running elsewhere.
/// Sends `signal` (STOP or CONT) to a worker.
fn signal(proc: &Proc, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &proc.child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} failed");
}

fn clock_offset_does_not_steal_a_running_job(server: &Server, token: &str, url: &str, data: &Path) {
    let id = submit(server, token, &slow_job("a green lantern"));
    let honest = start_worker(url, data, &["--lease-seconds", "30"]);
    wait_for(server, token, &id, |job| job["state"] == "running");
    // The job's worker is frozen mid-run (its lease, 30 s by the database's
    // clock, still far from expiry), so the job is running elsewhere however
    // fast this machine is, while a worker whose clock is 120 s ahead looks.
    signal(&honest, "STOP");
    let ahead = start_worker(
        url,
        data,
        &["--lease-seconds", "30", "--clock-offset-seconds", "120"],
    );
    // Once it is up, the second worker looks at the queue every half second.
    let start = Instant::now();
    while !log_of(&ahead).contains("motif worker ") {
        if start.elapsed() > Duration::from_secs(30) {
            signal(&honest, "CONT");
            panic!("the second worker did not start:\n{}", log_of(&ahead));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let job = get(server, &format!("/api/v1/jobs/{id}"), token).body;
    signal(&honest, "CONT");
    assert_eq!(job["attempts"], 1, "the job was taken again: {job}");
    assert_eq!(job["state"], "running", "{job}");
    let job = wait_for_state(server, token, &id, &["finished", "failed"]);
    assert_eq!(job["state"], "finished", "{job}");
    assert_eq!(
        job["attempts"],
        1,
        "the worker whose clock runs ahead took the job: {job}\n{}",
        log_of(&ahead)
    );
    assert!(
        !log_of(&ahead).contains(&id),
        "the worker whose clock runs ahead touched the job:\n{}",
        log_of(&ahead)
    );
    drop(honest);
}

#[test]
fn a_worker_with_a_clock_ahead_does_not_take_a_running_job() {
    let data = temp_dir("clock");
    let server = Server::start(&data, &["--workers", "0"]);
    let token = create_token(&["--data", data.to_str().unwrap()], &[]);
    clock_offset_does_not_steal_a_running_job(&server, &token, &sqlite_url(&data), &data);
}

#[test]
fn postgres_a_worker_with_a_clock_ahead_does_not_take_a_running_job() {
    let database = PgDatabase::create("clock");
    let url = database.url.clone();
    let data = temp_dir("pg-clock");
    let server = Server::start(&data, &["--workers", "0", "--database", &url]);
    let token = create_token(&["--database", &url], &[]);
    clock_offset_does_not_steal_a_running_job(&server, &token, &url, &data);
}

// ---- 11: database outages ----

#[test]
fn a_worker_started_before_its_sqlite_database_waits_for_it() {
    let root = temp_dir("late-db");
    // The folder of the database does not exist yet: SQLite cannot open it.
    let data = root.join("data");
    let url = sqlite_url(&data);
    let scratch = temp_dir("late-db-scratch");
    let mut worker = start_worker(&url, &scratch, &["--db-acquire-timeout-seconds", "1"]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker exited while its database was unreachable:\n{}",
        log_of(&worker)
    );
    assert!(
        log_of(&worker).contains("trying again in"),
        "{}",
        log_of(&worker)
    );
    // The database appears; the worker finds it and runs a job. Its clips go
    // to its own scratch folder, so only the state is checked.
    let server = Server::start(&data, &["--workers", "0"]);
    let token = create_token(&["--data", data.to_str().unwrap()], &[]);
    let id = submit(&server, &token, &tiny_job("a late start"));
    let job = wait_for_state(&server, &token, &id, &["running", "finished", "failed"]);
    assert_ne!(job["state"], "failed", "{job}");
    worker.kill();
}

/// A TCP forwarder to PostgreSQL that the test can cut: while down it drops
/// every connection, open or new, as a network outage would.
struct Outage {
    port: u16,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Outage {
    fn start(target: String) -> Outage {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (up2, open2) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut open = open2.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Outage { port, up, open }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// `url` (postgres://USER:PASSWORD@HOST:PORT/DB) through this forwarder.
    fn url(&self, url: &str) -> String {
        let at = url.rfind('@').unwrap();
        let slash = at + url[at..].find('/').unwrap();
        format!("{}@127.0.0.1:{}{}", &url[..at], self.port, &url[slash..])
    }
}

/// HOST:PORT of a postgres:// URL.
fn host_port(url: &str) -> String {
    let at = url.rfind('@').unwrap();
    let rest = &url[at + 1..];
    rest[..rest.find('/').unwrap()].to_string()
}

#[test]
fn postgres_outage_answers_503_and_workers_wait_for_the_database() {
    let database = PgDatabase::create("outage");
    let outage = Outage::start(host_port(&database.url));
    let url = outage.url(&database.url);
    let data = temp_dir("pg-outage");
    let server = Server::start(
        &data,
        &[
            "--workers",
            "0",
            "--database",
            &url,
            "--db-acquire-timeout-seconds",
            "1",
        ],
    );
    let token = create_token(&["--database", &database.url], &[]);
    let id = submit(&server, &token, &tiny_job("through an outage"));

    outage.down();
    let mut worker = start_worker(&url, &data, &["--db-acquire-timeout-seconds", "1"]);
    // During the outage: 503 with Retry-After, soon, on every try.
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    for _ in 0..3 {
        let started = Instant::now();
        let a = answer(
            agent
                .get(&server.url(&format!("/api/v1/jobs/{id}")))
                .set("Authorization", &format!("Bearer {token}"))
                .call(),
        );
        assert_eq!(a.status, 503, "{}", a.body);
        assert_eq!(a.retry_after.as_deref(), Some("1"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker exited during the outage:\n{}",
        log_of(&worker)
    );
    assert!(
        log_of(&worker).contains("trying again in"),
        "{}",
        log_of(&worker)
    );

    // Back up: the worker connects and runs the job; the API answers again.
    outage.restore();
    let job = wait_for_state(&server, &token, &id, &["finished", "failed"]);
    assert_eq!(job["state"], "finished", "{job}");
    worker.kill();
}

// ---- 12: per-job worker logs; a re-queued job's progress is reset ----

#[test]
fn workers_log_each_job_and_a_requeued_job_starts_its_progress_over() {
    let data = temp_dir("logs");
    let server = Server::start(&data, &["--workers", "0"]);
    let token = create_token(&["--data", data.to_str().unwrap()], &[]);
    let url = sqlite_url(&data);
    let worker = start_worker(&url, &data, &[]);

    let quick = submit(&server, &token, &tiny_job("a logged job"));
    let job = wait_for_state(&server, &token, &quick, &["finished", "failed"]);
    assert_eq!(job["state"], "finished", "{job}");
    let log = log_of(&worker);
    for expected in [
        format!("job {quick}: claimed, attempt 1 of 3"),
        format!("job {quick}: finished after "),
    ] {
        assert!(log.contains(&expected), "no `{expected}` in:\n{log}");
    }

    // Stopped mid-run (SIGTERM), the worker puts its job back: queued, its
    // progress back at 0 of 0 until another worker reports its own.
    let slow = submit(&server, &token, &slow_job("a job put back"));
    // Frozen as soon as it has claimed the job (not at its first step: with
    // the faster CPU kernels the whole 2-step job takes about 0.6 s, and it
    // once finished between the first step's report and the signal), so the
    // job is mid-run however fast this machine is: the SIGTERM waits until
    // the worker runs again.
    wait_for(&server, &token, &slow, |job| job["state"] == "running");
    signal(&worker, "STOP");
    signal(&worker, "TERM");
    signal(&worker, "CONT");
    let job = wait_for_state(&server, &token, &slow, &["queued", "finished", "failed"]);
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(
        (job["step"].as_i64(), job["total"].as_i64()),
        (Some(0), Some(0)),
        "{job}"
    );
    let start = Instant::now();
    while !log_of(&worker).contains(&format!("job {slow}: put back in the queue")) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            log_of(&worker)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
