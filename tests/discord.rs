//! Motif as a Discord app, against stand-ins for Discord's API and its
//! attachment host on 127.0.0.1 that record every request (nothing here
//! reaches the internet): `motif discord register`, and `motif serve`'s
//! interactions endpoint with interactions signed by a generated Ed25519 key,
//! clips made by the bundled model at 64x64, 4 frames, 2 steps.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{temp_dir, PgDatabase, MOTIF};
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    raw: Vec<u8>,
    /// The body as JSON, or Null.
    body: Value,
}

/// A stand-in answering GETs of its `files` with their bytes and every other
/// request with `status`: on 200, the body it was sent (as Discord answers a
/// bulk overwrite).
struct StandIn {
    base: String,
    origin: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl StandIn {
    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits for a request that `pick` accepts, returning what it gives.
    fn wait_for<T>(&self, what: &str, pick: impl Fn(&Recorded) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(found) = self.requests().iter().find_map(&pick) {
                return found;
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "no {what} within 180 s; the stand-in saw: {:#?}",
                self.requests()
                    .iter()
                    .map(|r| format!(
                        "{} {} {}",
                        r.method,
                        r.path,
                        String::from_utf8_lossy(&r.raw)
                            .chars()
                            .take(300)
                            .collect::<String>()
                    ))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn stand_in(status: u16) -> StandIn {
    serve_stand_in(status, HashMap::new())
}

fn serve_stand_in(status: u16, files: HashMap<String, Vec<u8>>) -> StandIn {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("binding a local port");
    let origin = format!("http://{}", server.server_addr().to_ip().unwrap());
    let base = format!("{origin}/api/v10");
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut raw = Vec::new();
            std::io::Read::read_to_end(request.as_reader(), &mut raw).unwrap();
            let header = |name: &'static str| {
                request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv(name))
                    .map(|h| h.value.to_string())
            };
            let recorded = Recorded {
                method: request.method().to_string(),
                path: request.url().to_string(),
                authorization: header("Authorization"),
                content_type: header("Content-Type"),
                body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
                raw,
            };
            seen.lock().unwrap().push(recorded.clone());
            let (code, answer) = if recorded.method == "GET" {
                match files.get(&recorded.path) {
                    Some(bytes) => (200, bytes.clone()),
                    None => (404, b"not here".to_vec()),
                }
            } else if status == 200 {
                (200, recorded.raw.clone())
            } else {
                (
                    status,
                    br#"{"message": "401: Unauthorized", "code": 0}"#.to_vec(),
                )
            };
            let header = "Content-Type: application/json"
                .parse::<tiny_http::Header>()
                .unwrap();
            let response = tiny_http::Response::from_data(answer)
                .with_status_code(code)
                .with_header(header);
            let _ = request.respond(response);
        }
    });
    StandIn {
        base,
        origin,
        requests,
    }
}

fn register(base: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_motif"));
    cmd.args(["discord", "register", "--api-base", base])
        .args(args)
        .env_remove("MOTIF_DISCORD_APPLICATION_ID")
        .env_remove("MOTIF_DISCORD_BOT_TOKEN");
    if let Some(t) = token {
        cmd.env("MOTIF_DISCORD_BOT_TOKEN", t);
    }
    cmd.output().expect("running motif")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn register_overwrites_the_commands_globally_or_per_guild_and_again_identically() {
    let s = stand_in(200);
    let out = register(&s.base, Some("bot-secret"), &["--application-id", "123"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("registered 3 commands for all guilds"),
        "{}",
        text(&out)
    );
    let again = register(&s.base, Some("bot-secret"), &["--application-id", "123"]);
    assert!(again.status.success(), "{}", text(&again));
    let guild = register(
        &s.base,
        Some("bot-secret"),
        &["--application-id", "123", "--guild", "777"],
    );
    assert!(guild.status.success(), "{}", text(&guild));
    assert!(text(&guild).contains("guild 777"), "{}", text(&guild));

    let requests = s.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3, "{requests:?}");
    for r in &requests {
        assert_eq!(r.method, "PUT");
        assert_eq!(r.authorization.as_deref(), Some("Bot bot-secret"));
    }
    assert_eq!(requests[0].path, "/api/v10/applications/123/commands");
    assert_eq!(
        requests[2].path,
        "/api/v10/applications/123/guilds/777/commands"
    );
    // The same list every time: registering again changes nothing.
    assert_eq!(requests[0].body, requests[1].body);
    assert_eq!(requests[0].body, requests[2].body);
    let list = requests[0].body.as_array().expect("a list of commands");
    let names: Vec<&str> = list.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["create", "animate", "remix"]);
    // The bundled style presets and the eight camera moves are the choices.
    let option = |command: usize, name: &str| {
        list[command]["options"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("/{} has no option {name}", list[command]["name"]))
    };
    let styles = option(0, "style")["choices"].clone();
    assert!(
        styles
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["value"] == "anime"),
        "{styles}"
    );
    assert_eq!(option(0, "camera")["choices"].as_array().unwrap().len(), 8);
    assert_eq!(option(1, "image")["type"], 11);
    assert_eq!(option(2, "clip")["required"], true);
}

#[test]
fn register_errors_say_what_to_fix() {
    let s = stand_in(401);
    let out = register(&s.base, None, &["--application-id", "123"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("MOTIF_DISCORD_BOT_TOKEN is not set"),
        "{}",
        text(&out)
    );

    let out = register(&s.base, Some("tok"), &["--application-id", "my-app"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("numeric id"), "{}", text(&out));
    assert!(
        s.requests.lock().unwrap().is_empty(),
        "nothing is sent before the checks pass"
    );

    let out = register(&s.base, Some("wrong"), &["--application-id", "123"]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("401") && t.contains("check MOTIF_DISCORD_BOT_TOKEN"),
        "{t}"
    );
    assert!(!t.contains("wrong"), "the token must not be printed: {t}");

    // Nothing listening: the error names the URL it tried.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/api/v10", l.local_addr().unwrap())
    };
    let out = register(&closed, Some("tok"), &["--application-id", "123"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("/applications/123/commands"),
        "{}",
        text(&out)
    );
}

// ---- the interactions endpoint on `motif serve` ----

const APP_ID: &str = "424242";
const BOT_TOKEN: &str = "test-bot-token";
const CHANNEL: &str = "555";
/// Discord's epoch in Unix milliseconds.
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A `motif serve` acting as the Discord app, killed when dropped.
struct Server {
    base: String,
    data: PathBuf,
    server: common::Server,
    key: SigningKey,
    /// Makes each interaction's id and token unique.
    counter: Mutex<u64>,
}

/// What tiny clips cost: the size every Discord job starts from.
const TINY: &str = r#"{"width": 64, "height": 64, "frames": 4, "steps": 2}"#;

impl Server {
    /// With Discord at `discord` and attachments allowed from `attachments`.
    fn start(name: &str, discord: &StandIn, attachments: &StandIn, extra: &[&str]) -> Server {
        Server::start_in(&temp_dir(name), discord, attachments, extra)
    }

    /// The same, on the data folder `data`.
    fn start_in(data: &Path, discord: &StandIn, attachments: &StandIn, extra: &[&str]) -> Server {
        Server::start_with(data, discord, attachments, TINY, extra, &[])
    }

    /// The same, with these `--discord-defaults` and more environment.
    fn start_with(
        data: &Path,
        discord: &StandIn,
        attachments: &StandIn,
        defaults: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let key = SigningKey::from_bytes(&rand_bytes());
        let public_key: String = key
            .verifying_key()
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut args = vec![
            "--discord-public-key",
            &public_key,
            "--discord-application-id",
            APP_ID,
            "--discord-api-base",
            &discord.base,
            "--discord-attachment-host",
            &attachments.origin,
            "--discord-defaults",
            defaults,
        ];
        args.extend_from_slice(extra);
        let mut env = env.to_vec();
        env.push(("MOTIF_DISCORD_BOT_TOKEN", BOT_TOKEN));
        let server = common::Server::start_with_env(data, &args, &env);
        Server {
            base: server.base.clone(),
            data: data.to_path_buf(),
            server,
            key,
            counter: Mutex::new(0),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.server.proc.log).unwrap_or_default()
    }

    /// Nothing in the server's log says a thread panicked.
    fn assert_no_panic(&self) {
        let log = self.log_text();
        assert!(!log.contains("panicked"), "{log}");
    }

    /// Whether the SQLite files (the database and its write-ahead log) hold `text`.
    fn database_holds(&self, text: &str) -> bool {
        std::fs::read_dir(&self.data)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("motif.db"))
            .any(|e| {
                find(
                    &std::fs::read(e.path()).unwrap_or_default(),
                    text.as_bytes(),
                )
                .is_some()
            })
    }

    /// A new snowflake made `age_ms` ago, and a token for it.
    fn new_ids(&self, age_ms: u64) -> (String, String) {
        let mut n = self.counter.lock().unwrap();
        *n += 1;
        let id = ((now_ms() - age_ms - DISCORD_EPOCH_MS) << 22) | *n;
        (id.to_string(), format!("itoken{n}x{}", now_ms()))
    }

    /// Posts `body` signed with `key` at `timestamp` (None: unsigned).
    fn post_signed(&self, body: &[u8], key: Option<&SigningKey>, timestamp: u64) -> (u16, Value) {
        let mut request = ureq::post(&format!("{}/discord/interactions", self.base))
            .set("Content-Type", "application/json");
        if let Some(key) = key {
            request = request
                .set("X-Signature-Ed25519", &sign(key, timestamp, body))
                .set("X-Signature-Timestamp", &timestamp.to_string());
        }
        let answer = match request.send_bytes(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("posting an interaction: {e}"),
        };
        let status = answer.status();
        (status, answer.into_json().unwrap_or(Value::Null))
    }

    /// Sends an interaction as Discord would; returns its token and the answer.
    fn interact(
        &self,
        kind: u64,
        user: (&str, &str),
        data: Value,
        extra: Value,
    ) -> (String, Value) {
        self.interact_aged(kind, user, data, extra, 0)
    }

    fn interact_aged(
        &self,
        kind: u64,
        user: (&str, &str),
        data: Value,
        extra: Value,
        age_ms: u64,
    ) -> (String, Value) {
        let (id, token) = self.new_ids(age_ms);
        let mut body = json!({
            "type": kind, "id": id, "application_id": APP_ID, "token": token,
            "channel_id": CHANNEL, "guild_id": "777",
            "member": { "user": { "id": user.0, "username": user.1 } },
            "data": data,
        });
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        let (status, answer) = self.post_signed(
            body.to_string().as_bytes(),
            Some(&self.key),
            now_ms() / 1000,
        );
        assert_eq!(status, 200, "{answer}\n{}", self.log_text());
        (token, answer)
    }

    fn command(&self, user: (&str, &str), name: &str, options: Value) -> (String, Value) {
        self.command_with(user, name, options, json!({}))
    }

    fn command_with(
        &self,
        user: (&str, &str),
        name: &str,
        options: Value,
        resolved: Value,
    ) -> (String, Value) {
        let data =
            json!({ "id": "1", "name": name, "type": 1, "options": options, "resolved": resolved });
        self.interact(2, user, data, json!({}))
    }

    fn button(&self, user: (&str, &str), custom_id: &str, message: &str) -> Value {
        let data = json!({ "custom_id": custom_id, "component_type": 2 });
        self.interact(3, user, data, json!({ "message": { "content": message } }))
            .1
    }

    fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&format!("{}{path}", self.base)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }
}

/// Discord's signature: Ed25519 over the timestamp and the body, in hex.
fn sign(key: &SigningKey, timestamp: u64, body: &[u8]) -> String {
    let mut message = timestamp.to_string().into_bytes();
    message.extend_from_slice(body);
    key.sign(&message)
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn rand_bytes() -> [u8; 32] {
    // Unpredictable enough for a test key: the time and the process.
    let seed = now_ms() as u128 * 6364136223846793005 + std::process::id() as u128;
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = (seed >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
    }
    out
}

const ADA: (&str, &str) = ("1001", "ada");
const BO: (&str, &str) = ("1002", "bo");

/// A multipart body's parts: (name, bytes).
fn multipart_parts(content_type: &str, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let boundary = content_type
        .split("boundary=")
        .nth(1)
        .expect("a multipart boundary")
        .trim_matches('"');
    let delimiter = format!("--{boundary}").into_bytes();
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(at) = find(rest, &delimiter) {
        rest = &rest[at + delimiter.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let Some(head_end) = find(rest, b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&rest[..head_end]).to_string();
        let content = &rest[head_end + 4..];
        let end = find(content, &delimiter).unwrap_or(content.len());
        let bytes = content[..end.saturating_sub(2)].to_vec();
        let name = head
            .split("name=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_string();
        parts.push((name, bytes));
    }
    parts
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A result as the stand-in received it: the message JSON and the attached clip.
#[derive(Debug)]
struct Posted {
    method: String,
    authorization: Option<String>,
    message: Value,
    clip: Option<Vec<u8>>,
}

fn posted(r: &Recorded) -> Posted {
    let (message, clip) = match r.content_type.as_deref() {
        Some(t) if t.starts_with("multipart/form-data") => {
            let parts = multipart_parts(t, &r.raw);
            let get = |n: &str| parts.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            let message = serde_json::from_slice(&get("payload_json").unwrap_or_default())
                .unwrap_or(Value::Null);
            (message, get("files[0]"))
        }
        _ => (r.body.clone(), None),
    };
    Posted {
        method: r.method.clone(),
        authorization: r.authorization.clone(),
        message,
        clip,
    }
}

fn original(token: &str) -> String {
    format!("/api/v10/webhooks/{APP_ID}/{token}/messages/@original")
}

/// The result edited into the interaction's response (its components set:
/// not the "queued" note).
fn result_of(discord: &StandIn, token: &str) -> Posted {
    let path = original(token);
    discord.wait_for(&format!("the result for {token}"), |r| {
        let p = posted(r);
        (r.method == "PATCH" && r.path == path && p.message.get("components").is_some())
            .then_some(p)
    })
}

/// The error edited into the interaction's response.
fn error_of(discord: &StandIn, token: &str) -> String {
    let path = original(token);
    discord.wait_for(&format!("the error for {token}"), |r| {
        let text = r.body["content"].as_str()?;
        (r.method == "PATCH" && r.path == path && text.starts_with("⚠️")).then(|| text.to_string())
    })
}

/// Frames, width and height of an MP4 as ffprobe reads it.
fn ffprobe(clip: &[u8]) -> (String, u64, u64, u64) {
    let file = temp_dir("probe").join("clip.mp4");
    std::fs::write(&file, clip).unwrap();
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames",
        ])
        .args(["-of", "json"])
        .arg(&file)
        .output()
        .expect("ffprobe (Debian's ffmpeg) must be installed");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let s = &v["streams"][0];
    let n = |k: &str| {
        s[k].as_u64()
            .or_else(|| s[k].as_str()?.parse().ok())
            .unwrap_or(0)
    };
    (
        s["codec_name"].as_str().unwrap_or("").to_string(),
        n("nb_read_frames"),
        n("width"),
        n("height"),
    )
}

/// The seed in a result's recipe line.
fn seed_of(p: &Posted) -> u64 {
    let text = p.message["content"].as_str().unwrap_or("");
    text.split("seed `")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no seed in {text}"))
}

/// The job id of a result, from its gallery link.
fn job_of(p: &Posted) -> String {
    let text = p.message["content"].as_str().unwrap_or("");
    text.split("/clips/")
        .nth(1)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect()
        })
        .unwrap_or_else(|| panic!("no gallery link in {text}"))
}

fn assert_clip(p: &Posted, what: &str) -> Vec<u8> {
    let clip = p
        .clip
        .clone()
        .unwrap_or_else(|| panic!("{what}: no clip attached: {:?}", p.message));
    assert_eq!(
        ffprobe(&clip),
        ("h264".to_string(), 4, 64, 64),
        "{what}: the attachment is not a 4-frame 64x64 H.264 clip"
    );
    assert_eq!(
        p.message["attachments"][0]["filename"]
            .as_str()
            .map(|n| n.ends_with(".mp4")),
        Some(true),
        "{what}: {}",
        p.message
    );
    clip
}

fn png_still() -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

fn attachment(id: &str, name: &str, url: &str, size: u64) -> Value {
    json!({ "attachments": { id: {
        "id": id, "filename": name, "url": url, "size": size, "content_type": "image/png"
    } } })
}

#[test]
fn interactions_are_verified_before_anything_else() {
    let discord = stand_in(200);
    let server = Server::start("verify", &discord, &discord, &[]);
    let now = now_ms() / 1000;
    let ping = json!({"type": 1, "id": "1", "application_id": APP_ID}).to_string();

    assert_eq!(
        server.post_signed(ping.as_bytes(), Some(&server.key), now),
        (200, json!({"type": 1}))
    );
    let create = json!({"type": 2, "id": "2", "application_id": APP_ID, "token": "t",
        "channel_id": CHANNEL, "member": {"user": {"id": "1", "username": "mallory"}},
        "data": {"name": "create", "options": [{"name": "prompt", "value": "a forged fox"}]}})
    .to_string();
    let other_key = SigningKey::from_bytes(&[7u8; 32]);
    for (what, body, key, timestamp, error) in [
        (
            "another key",
            create.as_str(),
            Some(&other_key),
            now,
            "does not match",
        ),
        ("no signature", create.as_str(), None, now, "missing header"),
        (
            "a stale timestamp",
            create.as_str(),
            Some(&server.key),
            now - 600,
            "600 s",
        ),
        (
            "a future timestamp",
            create.as_str(),
            Some(&server.key),
            now + 600,
            "600 s",
        ),
    ] {
        let (status, answer) = server.post_signed(body.as_bytes(), key, timestamp);
        assert_eq!(status, 401, "{what}: {answer}");
        assert!(
            answer["error"].as_str().unwrap_or("").contains(error),
            "{what}: {answer}"
        );
    }
    // Signed, then changed on the way: the signature no longer matches.
    let signature = sign(&server.key, now, create.as_bytes());
    let tampered = create.replace("forged", "hacked");
    let answer = ureq::post(&format!("{}/discord/interactions", server.base))
        .set("X-Signature-Ed25519", &signature)
        .set("X-Signature-Timestamp", &now.to_string())
        .send_bytes(tampered.as_bytes());
    assert!(
        matches!(answer, Err(ureq::Error::Status(401, _))),
        "{answer:?}"
    );

    for (what, body) in [
        ("not JSON", "{not json"),
        (
            "a command without a prompt",
            r#"{"type":2,"id":"3","application_id":"424242","token":"t","member":{"user":{"id":"1","username":"a"}},"data":{"name":"create","options":[]}}"#,
        ),
        (
            "an unknown type",
            r#"{"type":42,"id":"3","application_id":"424242","token":"t"}"#,
        ),
    ] {
        let (status, answer) = server.post_signed(body.as_bytes(), Some(&server.key), now);
        assert_eq!(status, 400, "{what}: {answer}");
        assert!(answer["error"].is_string(), "{what}: {answer}");
    }
    // Nothing was queued, nothing was sent to Discord, nothing panicked.
    std::thread::sleep(Duration::from_secs(2));
    assert!(discord.requests().is_empty(), "{:?}", discord.requests());
    assert!(!server.database_holds("a forged fox"), "a job was stored");
    server.assert_no_panic();
}

#[test]
fn commands_queue_clips_that_come_back_with_buttons() {
    let discord = stand_in(200);
    let still = png_still();
    let files = HashMap::from([
        ("/attachments/cat.png".to_string(), still.clone()),
        (
            "/attachments/notes.png".to_string(),
            b"these are notes, not an image".to_vec(),
        ),
        ("/attachments/huge.png".to_string(), vec![0x89; 300_000]),
    ]);
    let cdn = serve_stand_in(200, files.clone());
    let elsewhere = serve_stand_in(200, files);
    let server = Server::start(
        "flow",
        &discord,
        &cdn,
        &[
            "--discord-per-minute",
            "100",
            "--discord-max-attachment-bytes",
            "200000",
        ],
    );

    // /create: "thinking…" at once, then the clip with its recipe and buttons.
    let (token, answer) = server.command(
        ADA,
        "create",
        json!([{"name": "prompt", "value": "a red fox in the snow @everyone"},
               {"name": "style", "value": "anime"}, {"name": "camera", "value": "pan-left"}]),
    );
    assert_eq!(answer, json!({"type": 5}));
    let first = result_of(&discord, &token);
    assert_clip(&first, "/create");
    let content = first.message["content"].as_str().unwrap().to_string();
    assert!(
        content.contains("<@1001>") && content.contains("anime"),
        "{content}"
    );
    assert!(
        content.contains("\\@everyone"),
        "mentions are escaped: {content}"
    );
    assert_eq!(
        first.message["allowed_mentions"],
        json!({"parse": [], "users": ["1001"]})
    );
    let id = job_of(&first);
    let link = format!("{}/clips/{id}", server.base);
    assert!(content.contains(&link), "{content}");
    let custom_ids: Vec<&str> = first.message["components"][0]["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["custom_id"].as_str())
        .collect();
    assert_eq!(
        custom_ids,
        [
            format!("reroll:{id}"),
            format!("publish:{id}"),
            format!("remix:{id}")
        ]
    );
    // The "queued" note came before the result, never after it.
    let edits: Vec<Posted> = discord
        .requests()
        .iter()
        .filter(|r| r.path == original(&token))
        .map(posted)
        .collect();
    assert_eq!(edits.len(), 2, "{edits:?}");
    assert!(edits[0].message["content"]
        .as_str()
        .unwrap()
        .starts_with("⏳ Queued"));
    // Its page opens by the link; the gallery lists it only once published.
    let (status, page) = server.get(&format!("/clips/{id}"));
    assert_eq!(status, 200);
    assert!(page.contains(">unlisted<"), "{page}");
    assert!(!server.get("/").1.contains(&id));

    // Publish: only the author.
    let refused = server.button(BO, &format!("publish:{id}"), &content);
    assert_eq!(refused["type"], 4);
    assert_eq!(refused["data"]["flags"], 64);
    assert!(refused["data"]["content"]
        .as_str()
        .unwrap()
        .contains("Only <@1001>"));
    assert!(!server.get("/").1.contains(&id));
    let published = server.button(ADA, &format!("publish:{id}"), &content);
    assert_eq!(published["type"], 7, "{published}");
    let updated = published["data"]["content"].as_str().unwrap();
    assert!(
        updated.starts_with(&content) && updated.contains("Published"),
        "{updated}"
    );
    assert_eq!(
        published["data"]["components"][0]["components"][1]["disabled"],
        true
    );
    assert!(server.get("/").1.contains(&id), "the gallery lists it now");
    assert!(!server.get(&format!("/clips/{id}")).1.contains(">unlisted<"));
    let again = server.button(ADA, &format!("publish:{id}"), &content);
    assert!(again["data"]["content"]
        .as_str()
        .unwrap()
        .contains("already"));

    // Re-roll (anyone): the same recipe with a new seed, as Bo's clip.
    let (reroll, answer) = server.interact(
        3,
        BO,
        json!({"custom_id": format!("reroll:{id}"), "component_type": 2}),
        json!({}),
    );
    assert_eq!(answer, json!({"type": 5}));
    let rerolled = result_of(&discord, &reroll);
    assert_clip(&rerolled, "Re-roll");
    assert_ne!(seed_of(&rerolled), seed_of(&first));
    assert!(rerolled.message["content"]
        .as_str()
        .unwrap()
        .contains("<@1002>"));

    // Remix: a modal with the prompt, then the clip with the new prompt and the same seed.
    let modal = server.button(BO, &format!("remix:{id}"), &content);
    assert_eq!(modal["type"], 9, "{modal}");
    assert_eq!(modal["data"]["custom_id"], format!("remix:{id}"));
    let input = &modal["data"]["components"][0]["components"][0];
    assert_eq!(input["value"], "a red fox in the snow @everyone");
    let (remix, answer) = server.interact(
        5,
        BO,
        json!({"custom_id": format!("remix:{id}"), "components": [{"type": 1, "components": [
            {"type": 4, "custom_id": "prompt", "value": "a blue fox in the snow"}]}]}),
        json!({}),
    );
    assert_eq!(answer, json!({"type": 5}));
    let remixed = result_of(&discord, &remix);
    assert_clip(&remixed, "the Remix modal");
    assert!(remixed.message["content"]
        .as_str()
        .unwrap()
        .contains("a blue fox"));
    assert_eq!(seed_of(&remixed), seed_of(&first));

    // /remix by the page's URL, overriding the seed.
    let (token, _) = server.command(
        BO,
        "remix",
        json!([{"name": "clip", "value": link}, {"name": "seed", "value": 99}]),
    );
    let remixed = result_of(&discord, &token);
    assert_clip(&remixed, "/remix");
    assert_eq!(seed_of(&remixed), 99);
    assert!(remixed.message["content"]
        .as_str()
        .unwrap()
        .contains("a red fox"));

    // /animate with a still from the attachment host.
    let url = format!("{}/attachments/cat.png", cdn.origin);
    let (token, answer) = server.command_with(
        ADA,
        "animate",
        json!([{"name": "image", "value": "900"}, {"name": "prompt", "value": "a gradient"},
               {"name": "strength", "value": 0.7}]),
        attachment("900", "cat.png", &url, still.len() as u64),
    );
    assert_eq!(answer, json!({"type": 5}));
    let animated = result_of(&discord, &token);
    assert_clip(&animated, "/animate");
    let content = animated.message["content"].as_str().unwrap();
    assert!(content.contains("strength 0.7"), "{content}");
    // The bundled AnimateDiff model has no native image-to-video: the
    // reply says the still anchors the first frame.
    assert!(content.contains("Anchored"), "{content}");

    // Stills that are refused, each with a message saying why.
    let animate = |name: &str, url: &str, size: u64| {
        let (token, answer) = server.command_with(
            ADA,
            "animate",
            json!([{"name": "image", "value": "901"}]),
            attachment("901", name, url, size),
        );
        assert_eq!(answer, json!({"type": 5}));
        error_of(&discord, &token)
    };
    let e = animate(
        "notes.png",
        &format!("{}/attachments/notes.png", cdn.origin),
        29,
    );
    assert!(e.contains("not an image"), "{e}");
    // Larger than declared: stopped while downloading.
    let e = animate(
        "huge.png",
        &format!("{}/attachments/huge.png", cdn.origin),
        1000,
    );
    assert!(e.contains("at most 200000 bytes"), "{e}");
    // Declared too large: not even fetched.
    let e = animate(
        "big.png",
        &format!("{}/attachments/big.png", cdn.origin),
        50_000_000,
    );
    assert!(e.contains("at most 200000 bytes"), "{e}");
    assert!(!cdn.requests().iter().any(|r| r.path.contains("big.png")));
    // Another host: refused without a request to it.
    let e = animate(
        "cat.png",
        &format!("{}/attachments/cat.png", elsewhere.origin),
        100,
    );
    assert!(e.contains("attachment host"), "{e}");
    assert!(
        elsewhere.requests().is_empty(),
        "{:?}",
        elsewhere.requests()
    );

    // A recipe the server refuses: the error is posted.
    let (token, _) = server.command(
        ADA,
        "create",
        json!([{"name": "prompt", "value": "a fox"}, {"name": "style", "value": "no-such-style"}]),
    );
    let e = error_of(&discord, &token);
    assert!(e.contains("style") && e.contains("no-such-style"), "{e}");
    // /remix of something that is not a clip here.
    let (token, _) = server.command(ADA, "remix", json!([{"name": "clip", "value": "ffff0000"}]));
    assert!(error_of(&discord, &token).contains("no clip"));
    server.assert_no_panic();
}

#[test]
fn late_results_go_through_the_bot_and_commands_are_rate_limited() {
    let discord = stand_in(200);
    // 300 bytes hold no MP4: results are linked, not attached.
    let server = Server::start(
        "late",
        &discord,
        &discord,
        &[
            "--discord-per-minute",
            "1",
            "--discord-upload-limit-bytes",
            "300",
        ],
    );
    // Made 20 minutes ago: its token has expired, so the bot posts in the channel.
    let (token, answer) = server.interact_aged(
        2,
        ADA,
        json!({"name": "create", "options": [{"name": "prompt", "value": "a late fox"}]}),
        json!({}),
        20 * 60 * 1000,
    );
    assert_eq!(answer, json!({"type": 5}));
    // One command a minute: the next is answered politely, to Ada only.
    let (_, answer) = server.command(ADA, "create", json!([{"name": "prompt", "value": "again"}]));
    assert_eq!(answer["type"], 4);
    assert_eq!(answer["data"]["flags"], 64);
    assert!(
        answer["data"]["content"]
            .as_str()
            .unwrap()
            .contains("Try again in"),
        "{answer}"
    );
    // Bo is not limited by Ada's commands.
    assert_eq!(
        server
            .command(
                BO,
                "create",
                json!([{"name": "prompt", "value": "a fox of Bo"}])
            )
            .1,
        json!({"type": 5})
    );

    let channel_path = format!("/api/v10/channels/{CHANNEL}/messages");
    let late = discord.wait_for("the late result", |r| {
        let p = posted(r);
        let text = p.message["content"].as_str()?;
        (r.path == channel_path && text.contains("a late fox")).then_some(p)
    });
    assert_eq!(late.method, "POST");
    assert_eq!(
        late.authorization.as_deref(),
        Some(&*format!("Bot {BOT_TOKEN}"))
    );
    // 300 bytes hold no MP4: the clip is linked, not attached.
    assert!(late.clip.is_none());
    let text = late.message["content"].as_str().unwrap();
    assert!(
        text.contains("Too large") && text.contains("/clips/"),
        "{text}"
    );
    assert!(!discord
        .requests()
        .iter()
        .any(|r| r.path == original(&token) && posted(r).message.get("components").is_some()));
}

#[test]
fn clips_over_the_upload_limit_are_re_encoded_to_fit() {
    let discord = stand_in(200);
    let limit = 3000;
    let server = Server::start(
        "shrink",
        &discord,
        &discord,
        &["--discord-upload-limit-bytes", &limit.to_string()],
    );
    let (token, _) = server.command(
        ADA,
        "create",
        json!([{"name": "prompt", "value": "a lighthouse in a storm"}, {"name": "seed", "value": 3}]),
    );
    let result = result_of(&discord, &token);
    let id = job_of(&result);
    let (status, _) = server.get(&format!("/clips/{id}"));
    assert_eq!(status, 200);
    let full = ureq::get(&format!("{}/clips/{id}/video", server.base))
        .call()
        .unwrap();
    let mut original = Vec::new();
    std::io::Read::read_to_end(&mut full.into_reader(), &mut original).unwrap();
    assert!(
        original.len() > limit,
        "the clip is {} bytes, within the {limit} of this test: lower the limit",
        original.len()
    );
    let clip = result
        .clip
        .clone()
        .expect("the re-encoded clip is attached");
    assert!(clip.len() <= limit, "{} bytes attached", clip.len());
    let (codec, frames, width, height) = ffprobe(&clip);
    assert_eq!((codec.as_str(), frames), ("h264", 4));
    assert!(width <= 64 && height <= 64 && width > 0);
    let text = result.message["content"].as_str().unwrap();
    assert!(text.contains("Re-encoded smaller"), "{text}");
}

#[test]
fn results_survive_a_restart_and_cancelled_jobs_are_posted() {
    let discord = stand_in(200);
    let data = temp_dir("restart");
    // No workers: the jobs wait in the queue.
    let first = Server::start_in(&data, &discord, &discord, &["--workers", "0"]);
    let (patient, answer) = first.command(
        ADA,
        "create",
        json!([{"name": "prompt", "value": "a patient fox"}]),
    );
    assert_eq!(answer, json!({"type": 5}));
    let (cancelled, _) = first.command(
        ADA,
        "create",
        json!([{"name": "prompt", "value": "a cancelled fox"}]),
    );
    for token in [&patient, &cancelled] {
        let queued = discord.wait_for("the queued note", |r| {
            let text = r.body["content"].as_str()?;
            (r.path == original(token) && text.starts_with("⏳ Queued")).then(|| text.to_string())
        });
        assert!(queued.contains("fox"), "{queued}");
    }

    // An admin cancels one through the API: its post says so.
    let out = Command::new(MOTIF)
        .args([
            "admin",
            "create-token",
            "--admin",
            "--data",
            data.to_str().unwrap(),
        ])
        .env_remove("MOTIF_DATABASE_URL")
        .output()
        .unwrap();
    let admin = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let jobs: Value = ureq::get(&format!("{}/api/v1/jobs", first.base))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let id = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["request"]["prompt"] == "a cancelled fox")
        .and_then(|j| j["id"].as_str())
        .unwrap_or_else(|| panic!("{jobs}"))
        .to_string();
    ureq::post(&format!("{}/api/v1/jobs/{id}/cancel", first.base))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .unwrap();
    let note = discord.wait_for("the cancelled note", |r| {
        let text = r.body["content"].as_str()?;
        (r.path == original(&cancelled) && text.contains("cancelled.")).then(|| text.to_string())
    });
    assert!(
        note.contains("<@1001>") && note.contains("a cancelled fox"),
        "{note}"
    );

    // The server stops with the other job queued; the next one on the same
    // data runs it and posts it.
    drop(first);
    let second = Server::start_in(&data, &discord, &discord, &[]);
    let result = result_of(&discord, &patient);
    assert_clip(&result, "after the restart");
    assert!(result.message["content"]
        .as_str()
        .unwrap()
        .contains("a patient fox"));
    // Each result is posted once.
    std::thread::sleep(Duration::from_secs(2));
    let posts = discord
        .requests()
        .iter()
        .filter(|r| {
            r.path == original(&cancelled)
                && r.body["content"]
                    .as_str()
                    .is_some_and(|t| t.contains("cancelled."))
        })
        .count();
    assert_eq!(posts, 1);
    drop(second);
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn postgres_discord_round_trip() {
    // Declared first, dropped last: after the server is gone.
    let pg = PgDatabase::create("discord");
    let discord = stand_in(200);
    let server = Server::start(
        "postgres",
        &discord,
        &discord,
        &["--database", &pg.url, "--discord-per-minute", "10"],
    );
    let (token, _) = server.command(
        ADA,
        "create",
        json!([{"name": "prompt", "value": "a fox on postgres"}]),
    );
    let result = result_of(&discord, &token);
    assert_clip(&result, "on PostgreSQL");
    let id = job_of(&result);
    let content = result.message["content"].as_str().unwrap();
    assert!(!server.get("/").1.contains(&id));
    assert_eq!(
        server.button(BO, &format!("publish:{id}"), content)["type"],
        4
    );
    assert_eq!(
        server.button(ADA, &format!("publish:{id}"), content)["type"],
        7
    );
    assert!(server.get("/").1.contains(&id));
    let (token, _) = server.command(
        ADA,
        "remix",
        json!([{"name": "clip", "value": id}, {"name": "seed", "value": 5}]),
    );
    let remixed = result_of(&discord, &token);
    assert_clip(&remixed, "/remix on PostgreSQL");
    assert_eq!(seed_of(&remixed), 5);
}

#[test]
fn bad_discord_settings_stop_startup_with_a_clear_error() {
    let data = temp_dir("settings");
    let key = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
    let serve = |extra: &[&str], token: Option<&str>| {
        let mut args = vec![
            "serve",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let env: Vec<(&str, &str)> = token
            .map(|t| ("MOTIF_DISCORD_BOT_TOKEN", t))
            .into_iter()
            .collect();
        let mut child = common::motif_command(&args, &env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A server that starts anyway is stopped, not waited for.
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{extra:?} started");
        text(&out)
    };
    let app = ["--discord-application-id", APP_ID];
    for (extra, token, expected) in [
        (
            vec!["--discord-public-key", "abc"],
            Some("t"),
            "64 hex digits",
        ),
        (
            vec!["--discord-public-key", key],
            Some("t"),
            "MOTIF_DISCORD_APPLICATION_ID",
        ),
        (
            vec!["--discord-public-key", key, app[0], app[1]],
            None,
            "MOTIF_DISCORD_BOT_TOKEN",
        ),
        (
            vec![
                "--discord-public-key",
                key,
                app[0],
                app[1],
                "--discord-defaults",
                r#"{"stepz": 3}"#,
            ],
            Some("t"),
            "unknown field `stepz`",
        ),
        (
            vec![
                "--discord-public-key",
                key,
                app[0],
                app[1],
                "--discord-defaults",
                r#"{"steps": 100000}"#,
            ],
            Some("t"),
            "`steps`",
        ),
        (
            vec![
                "--discord-public-key",
                key,
                app[0],
                app[1],
                "--discord-attachment-host",
                "cdn.example",
            ],
            Some("t"),
            "attachment host",
        ),
        (
            vec![
                "--discord-public-key",
                key,
                "--discord-application-id",
                "my-app",
            ],
            Some("t"),
            "numeric id",
        ),
    ] {
        let said = serve(&extra, token);
        assert!(
            said.contains(expected),
            "{extra:?}: expected {expected:?} in: {said}"
        );
        assert!(!said.contains("panicked"), "{said}");
    }
}

/// The "queued" note edited into the interaction's response.
fn queued_of(discord: &StandIn, token: &str) -> String {
    let path = original(token);
    discord.wait_for(&format!("the queued note for {token}"), |r| {
        let text = r.body["content"].as_str()?;
        (r.method == "PATCH" && r.path == path && text.starts_with("⏳")).then(|| text.to_string())
    })
}

/// /animate on a server whose model is Wan2.1-I2V: the attachment goes
/// through the model's own image-to-video (no `strength`, which it does not
/// take), and both replies say so.
#[test]
fn animate_is_native_on_an_image_to_video_model() {
    let discord = stand_in(200);
    let still = png_still();
    let cdn = serve_stand_in(
        200,
        HashMap::from([("/attachments/cat.png".to_string(), still.clone())]),
    );
    let data = temp_dir("i2v");
    let models = data.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let i2v = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan-i2v");
    std::os::unix::fs::symlink(&i2v, models.join("wan-i2v")).unwrap();
    let no_cache = data.join("no-hf-cache");
    let server = Server::start_with(
        &data,
        &discord,
        &cdn,
        r#"{"model": "wan-i2v", "width": 48, "height": 32, "frames": 5, "steps": 2}"#,
        &[],
        &[
            ("MOTIF_MODELS", models.to_str().unwrap()),
            ("HF_HUB_CACHE", no_cache.to_str().unwrap()),
        ],
    );
    let url = format!("{}/attachments/cat.png", cdn.origin);
    let (token, answer) = server.command_with(
        ADA,
        "animate",
        json!([{"name": "image", "value": "900"}, {"name": "prompt", "value": "a gradient"},
               {"name": "strength", "value": 0.7}]),
        attachment("900", "cat.png", &url, still.len() as u64),
    );
    assert_eq!(answer, json!({"type": 5}));
    let queued = queued_of(&discord, &token);
    assert!(
        queued.contains("Native image-to-video") && queued.contains("`strength` does not apply"),
        "{queued}"
    );
    let animated = result_of(&discord, &token);
    let clip = animated
        .clip
        .clone()
        .unwrap_or_else(|| panic!("no clip attached: {:?}", animated.message));
    assert_eq!(ffprobe(&clip), ("h264".to_string(), 5, 48, 32));
    let content = animated.message["content"].as_str().unwrap();
    assert!(
        content.contains("Native image-to-video") && content.contains("model wan-i2v"),
        "{content}"
    );
    server.assert_no_panic();
}
