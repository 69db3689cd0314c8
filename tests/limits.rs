//! `motif serve`'s limits under concurrency and against slow clients (issue
//! #25): each test sends what an attacker would, at least 40 requests at
//! once, to a real server on 127.0.0.1, on SQLite and on PostgreSQL
//! (`MOTIF_TEST_DATABASE_URL`, which `tools/test.sh` sets). No job runs
//! (`--workers 0`): the tests are about what the server accepts.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{temp_dir, PgDatabase, Server, MOTIF};

/// Requests sent at once in the race tests.
const PARALLEL: usize = 40;

/// Where a test's server keeps its data: the SQLite file of its folder, or
/// a PostgreSQL database of its own (dropped with it).
struct Store {
    data: std::path::PathBuf,
    pg: Option<PgDatabase>,
}

impl Store {
    fn sqlite(name: &str) -> Store {
        Store {
            data: temp_dir(name),
            pg: None,
        }
    }

    fn postgres(name: &str) -> Store {
        Store {
            data: temp_dir(name),
            pg: Some(PgDatabase::create(name)),
        }
    }

    /// `--data DIR` and, on PostgreSQL, `--database URL`.
    fn args(&self) -> Vec<String> {
        let mut args = vec!["--data".to_string(), self.data.display().to_string()];
        if let Some(pg) = &self.pg {
            args.extend(["--database".to_string(), pg.url.clone()]);
        }
        args
    }

    /// `motif serve --workers 0` on this store with `extra` flags.
    fn serve(&self, extra: &[&str]) -> Server {
        let store = self.args();
        let mut args: Vec<&str> = store[2..].iter().map(String::as_str).collect();
        args.extend(["--workers", "0"]);
        args.extend_from_slice(extra);
        Server::start(&self.data, &args)
    }

    /// An API token of no member (`motif admin create-token`).
    fn admin_token(&self) -> String {
        let out = Command::new(MOTIF)
            .args(["admin", "create-token"])
            .args(self.args())
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
}

/// An answer's status, Retry-After and body; transport errors are answers
/// too (status 0), so that a dropped connection fails the test's assertions.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: String,
    set_cookies: Vec<String>,
}

fn answer(result: Result<ureq::Response, ureq::Error>) -> Answer {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => {
            return Answer {
                status: 0,
                retry_after: None,
                body: format!("transport error: {e}"),
                set_cookies: Vec::new(),
            }
        }
    };
    let status = response.status();
    let retry_after = response.header("Retry-After").map(str::to_string);
    let set_cookies = response
        .all("set-cookie")
        .iter()
        .map(|s| s.to_string())
        .collect();
    let body = response.into_string().unwrap_or_default();
    Answer {
        status,
        retry_after,
        body,
        set_cookies,
    }
}

/// Runs `request(i)` for i in 0..n on n threads released at the same moment.
fn at_once<F>(n: usize, request: F) -> Vec<Answer>
where
    F: Fn(usize) -> Answer + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let request = request.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                request(i)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// How many answers had each status.
fn tally(answers: &[Answer]) -> HashMap<u16, usize> {
    let mut counts = HashMap::new();
    for a in answers {
        *counts.entry(a.status).or_insert(0) += 1;
    }
    counts
}

fn tiny_job(i: usize) -> String {
    json!({"prompt": format!("a red ball {i}"), "width": 64, "height": 64, "frames": 4, "steps": 2})
        .to_string()
}

fn submit_api(base: &str, token: &str, i: usize) -> Answer {
    answer(
        ureq::post(&format!("{base}/api/v1/jobs"))
            .set("Authorization", &format!("Bearer {token}"))
            .set("Content-Type", "application/json")
            .timeout(Duration::from_secs(120))
            .send_string(&tiny_job(i)),
    )
}

fn health(base: &str) -> Value {
    let text = ureq::get(&format!("{base}/api/v1/health"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A gallery visitor's cookies (CSRF, and the session once signed up),
/// shareable between threads.
#[derive(Clone)]
struct Member {
    base: String,
    csrf: String,
    session: Option<String>,
}

fn cookie_value(set_cookies: &[String], name: &str) -> Option<String> {
    set_cookies.iter().find_map(|c| {
        let pair = c.split(';').next()?;
        let (k, v) = pair.split_once('=')?;
        (k == name && !v.is_empty()).then(|| v.to_string())
    })
}

impl Member {
    /// A visitor with a CSRF cookie from the front page.
    fn visit(base: &str) -> Member {
        let a = answer(ureq::get(&format!("{base}/")).call());
        assert_eq!(a.status, 200, "{}", a.body);
        Member {
            base: base.to_string(),
            csrf: cookie_value(&a.set_cookies, "motif_csrf").expect("a CSRF cookie"),
            session: None,
        }
    }

    fn cookies(&self) -> String {
        match &self.session {
            Some(s) => format!("motif_csrf={}; motif_session={s}", self.csrf),
            None => format!("motif_csrf={}", self.csrf),
        }
    }

    fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let mut all = vec![("csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        answer(
            ureq::AgentBuilder::new()
                .redirects(0)
                .build()
                .post(&format!("{}{path}", self.base))
                .set("Cookie", &self.cookies())
                .timeout(Duration::from_secs(120))
                .send_form(&all),
        )
    }

    fn signup(&mut self, name: &str, password: &str) {
        let a = self.post_form("/signup", &[("name", name), ("password", password)]);
        assert_eq!(a.status, 303, "sign-up of {name}: {}", a.body);
        self.session = Some(cookie_value(&a.set_cookies, "motif_session").expect("a session"));
    }

    /// `POST /me/tokens`: the new token's page (or the refusal).
    fn new_token(&self) -> Answer {
        self.post_form("/me/tokens", &[])
    }

    /// A job from the create page's script.
    fn submit_web(&self, i: usize) -> Answer {
        answer(
            ureq::post(&format!("{}/create/jobs", self.base))
                .set("Cookie", &self.cookies())
                .set("X-CSRF-Token", &self.csrf)
                .set("Content-Type", "application/json")
                .timeout(Duration::from_secs(120))
                .send_string(&tiny_job(i)),
        )
    }
}

/// The token shown on the new-token page.
fn token_of(page: &str) -> String {
    let start = page.find("motif_").expect("a token on the page");
    page[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

// ------------------------------------------------ point 2: job limits race

/// 40 submissions at once with one token where 10 jobs may be active: the
/// count and the insert happen under one lock, so exactly 10 get in.
fn parallel_submissions_stop_at_the_active_limit(store: Store) {
    let server = store.serve(&["--submissions-per-minute", "1000"]);
    let token = store.admin_token();
    let base = server.base.clone();
    let answers = at_once(PARALLEL, move |i| submit_api(&base, &token, i));
    let counts = tally(&answers);
    assert_eq!(
        counts.get(&202).copied().unwrap_or(0),
        10,
        "accepted where 10 may be active: {counts:?}"
    );
    assert_eq!(
        counts.get(&429).copied().unwrap_or(0),
        PARALLEL - 10,
        "{counts:?}"
    );
    for a in answers.iter().filter(|a| a.status == 429) {
        assert!(
            a.retry_after.is_some(),
            "429 without Retry-After: {}",
            a.body
        );
    }
}

#[test]
fn parallel_submissions_stop_at_the_active_limit_sqlite() {
    parallel_submissions_stop_at_the_active_limit(Store::sqlite("active"));
}

#[test]
fn parallel_submissions_stop_at_the_active_limit_postgres() {
    parallel_submissions_stop_at_the_active_limit(Store::postgres("limits_active"));
}

/// The per-minute limit under the same race: 40 at once where 12 a minute
/// are allowed (and 100 may be active).
fn parallel_submissions_stop_at_the_per_minute_limit(store: Store) {
    let server = store.serve(&[
        "--max-active-per-token",
        "100",
        "--submissions-per-minute",
        "12",
    ]);
    let token = store.admin_token();
    let base = server.base.clone();
    let counts = tally(&at_once(PARALLEL, move |i| submit_api(&base, &token, i)));
    assert_eq!(counts.get(&202).copied().unwrap_or(0), 12, "{counts:?}");
    assert_eq!(
        counts.get(&429).copied().unwrap_or(0),
        PARALLEL - 12,
        "{counts:?}"
    );
}

#[test]
fn parallel_submissions_stop_at_the_per_minute_limit_sqlite() {
    parallel_submissions_stop_at_the_per_minute_limit(Store::sqlite("perminute"));
}

#[test]
fn parallel_submissions_stop_at_the_per_minute_limit_postgres() {
    parallel_submissions_stop_at_the_per_minute_limit(Store::postgres("limits_perminute"));
}

// ------------------------------------- point 3: limits per member, token cap

/// A member asks for 40 API tokens at once and gets 10; then 40 jobs at
/// once through four of those tokens and the web page together get 10 in:
/// the member's tokens share one limit.
fn a_members_tokens_are_capped_and_share_one_limit(store: Store) {
    let server = store.serve(&["--submissions-per-minute", "1000"]);
    let mut member = Member::visit(&server.base);
    member.signup("ada", "ada's long password");

    let asking = member.clone();
    let answers = at_once(PARALLEL, move |_| asking.new_token());
    let counts = tally(&answers);
    assert_eq!(
        counts.get(&200).copied().unwrap_or(0),
        10,
        "tokens made where a member may hold 10: {counts:?}"
    );
    assert_eq!(
        counts.get(&409).copied().unwrap_or(0),
        PARALLEL - 10,
        "{counts:?}"
    );
    let tokens: Vec<String> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| token_of(&a.body))
        .collect();
    // The page says why the 11th is refused.
    let refused = answers.iter().find(|a| a.status == 409).unwrap();
    assert!(refused.body.contains("revoke one"), "{}", refused.body);

    let base = server.base.clone();
    let via: Vec<String> = tokens[..4].to_vec();
    let answers = at_once(PARALLEL, move |i| match i % 5 {
        4 => member.submit_web(i),
        k => submit_api(&base, &via[k], i),
    });
    let counts = tally(&answers);
    assert_eq!(
        counts.get(&202).copied().unwrap_or(0),
        10,
        "jobs accepted for one member over five tokens, 10 allowed: {counts:?}"
    );
    assert_eq!(
        counts.get(&429).copied().unwrap_or(0),
        PARALLEL - 10,
        "{counts:?}"
    );
}

#[test]
fn a_members_tokens_are_capped_and_share_one_limit_sqlite() {
    a_members_tokens_are_capped_and_share_one_limit(Store::sqlite("member"));
}

#[test]
fn a_members_tokens_are_capped_and_share_one_limit_postgres() {
    a_members_tokens_are_capped_and_share_one_limit(Store::postgres("limits_member"));
}

// --------------------------------------------- point 4: failed logins race

/// 40 wrong passwords at once for one account where 5 failures are
/// allowed: at most 5 are checked (401), the rest wait (429). Then 40 at
/// once for 40 names from one address where 20 are allowed per address.
fn parallel_wrong_passwords_stop_at_the_limits(store: Store) {
    let server = store.serve(&["--login-failures", "5", "--login-failures-per-ip", "20"]);
    let mut owner = Member::visit(&server.base);
    owner.signup("grace", "grace's real password");

    let guesser = Member::visit(&server.base);
    let g = guesser.clone();
    let answers = at_once(PARALLEL, move |i| {
        g.post_form(
            "/login",
            &[("name", "grace"), ("password", &format!("wrong guess {i}"))],
        )
    });
    let counts = tally(&answers);
    let checked = counts.get(&401).copied().unwrap_or(0);
    // 503: the password-hashing cap was full; those were not checked either.
    let unexpected: Vec<_> = counts
        .keys()
        .filter(|s| ![401, 429, 503].contains(*s))
        .collect();
    assert!(unexpected.is_empty(), "{counts:?}");
    assert!(
        (1..=5).contains(&checked),
        "{checked} passwords checked for one account, 5 allowed: {counts:?}"
    );

    for a in answers
        .iter()
        .filter(|a| a.status == 429 || a.status == 503)
    {
        assert!(a.retry_after.is_some(), "{} without Retry-After", a.status);
    }

    // The address has spent `checked` of its 20 on grace.
    let by_name = checked;
    let g = guesser.clone();
    let answers = at_once(PARALLEL, move |i| {
        g.post_form(
            "/login",
            &[
                ("name", &format!("name{i}")),
                ("password", "a common password"),
            ],
        )
    });
    let counts = tally(&answers);
    let checked = counts.get(&401).copied().unwrap_or(0);
    assert!(
        checked >= 1 && by_name + checked <= 20,
        "{} passwords checked from one address, 20 allowed: {counts:?}",
        by_name + checked
    );
}

#[test]
fn parallel_wrong_passwords_stop_at_the_limits_sqlite() {
    parallel_wrong_passwords_stop_at_the_limits(Store::sqlite("logins"));
}

#[test]
fn parallel_wrong_passwords_stop_at_the_limits_postgres() {
    parallel_wrong_passwords_stop_at_the_limits(Store::postgres("limits_logins"));
}
// --------------------------------- point 5: hashes in flight, sign-up rate

/// With one password hash allowed at a time, 40 sign-ups and then 40
/// logins at once: those that find the slot taken get 503 with Retry-After
/// (nothing else fails), and the server's own count of hashes in flight
/// never passed 1.
fn password_hashes_in_flight_stay_under_the_cap(store: &Store) {
    let server = store.serve(&[
        "--max-password-hashes",
        "1",
        "--signups-per-address",
        "1000",
        "--login-failures",
        "1000",
        "--login-failures-per-ip",
        "1000",
    ]);
    let visitor = Member::visit(&server.base);
    let v = visitor.clone();
    let signups = at_once(PARALLEL, move |i| {
        v.post_form(
            "/signup",
            &[
                ("name", &format!("user{i}")),
                ("password", "a long password"),
            ],
        )
    });
    let v = visitor.clone();
    let logins = at_once(PARALLEL, move |i| {
        v.post_form(
            "/login",
            &[
                ("name", &format!("user{i}")),
                ("password", "a long password"),
            ],
        )
    });
    for (what, answers, done) in [("sign-up", &signups, 303), ("login", &logins, 303)] {
        let counts = tally(answers);
        // A login of a name whose sign-up was refused is 401.
        let allowed = [done, 401, 503];
        assert!(
            counts.keys().all(|s| allowed.contains(s))
                && (what == "login" || !counts.contains_key(&401)),
            "{what}: {counts:?}"
        );
        // At least one request got the hash (a login may check a name whose sign-up was refused).
        let checked =
            counts.get(&done).copied().unwrap_or(0) + counts.get(&401).copied().unwrap_or(0);
        assert!(checked >= 1, "{what}: {counts:?}");
        assert!(
            counts.get(&503).copied().unwrap_or(0) >= 1,
            "{what}: no refusal with one hash allowed at a time: {counts:?}"
        );
        for a in answers.iter().filter(|a| a.status == 503) {
            assert_eq!(a.retry_after.as_deref(), Some("1"), "{what}: {}", a.body);
        }
    }
    let refusals = [&signups, &logins]
        .iter()
        .flat_map(|a| a.iter())
        .filter(|a| a.status == 503)
        .count() as u64;
    let hashing = &health(&server.base)["password_hashing"];
    assert_eq!(hashing["max_in_flight"], 1, "{hashing}");
    assert_eq!(hashing["peak_in_flight"], 1, "{hashing}");
    assert_eq!(hashing["in_flight"], 0, "{hashing}");
    assert_eq!(hashing["refused"].as_u64(), Some(refusals), "{hashing}");
}

/// 40 sign-ups at once from one address where 5 an hour are allowed: 5
/// accounts, 35 answers of 429 with Retry-After.
fn signups_stop_at_the_per_address_limit(store: &Store) {
    let server = store.serve(&["--signups-per-address", "5", "--max-password-hashes", "64"]);
    let visitor = Member::visit(&server.base);
    let answers = at_once(PARALLEL, move |i| {
        visitor.post_form(
            "/signup",
            &[
                ("name", &format!("member{i}")),
                ("password", "a long password"),
            ],
        )
    });
    let counts = tally(&answers);
    assert_eq!(counts.get(&303).copied().unwrap_or(0), 5, "{counts:?}");
    assert_eq!(
        counts.get(&429).copied().unwrap_or(0),
        PARALLEL - 5,
        "{counts:?}"
    );
    for a in answers.iter().filter(|a| a.status == 429) {
        let wait: u64 = a.retry_after.as_deref().unwrap_or("").parse().unwrap_or(0);
        assert!(
            (1..=3600).contains(&wait),
            "Retry-After {:?}",
            a.retry_after
        );
    }
}

#[test]
fn password_hashing_is_capped_and_signups_limited_per_address_sqlite() {
    let store = Store::sqlite("hashing");
    password_hashes_in_flight_stay_under_the_cap(&store);
    signups_stop_at_the_per_address_limit(&Store::sqlite("signups"));
}

#[test]
fn password_hashing_is_capped_and_signups_limited_per_address_postgres() {
    password_hashes_in_flight_stay_under_the_cap(&Store::postgres("limits_hashing"));
    signups_stop_at_the_per_address_limit(&Store::postgres("limits_signups"));
}

// ------------------------------------------------- point 7: slow clients

/// Reads until the server closes the connection or `limit` passes: true
/// when it closed (end of stream or reset), with what it sent before.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> (bool, String) {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return (true, String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (true, String::from_utf8_lossy(&got).into_owned()),
        }
    }
    (false, String::from_utf8_lossy(&got).into_owned())
}

fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(server.base.trim_start_matches("http://")).unwrap()
}

#[test]
fn slow_clients_are_dropped_and_connections_per_address_capped() {
    let store = Store::sqlite("slow");
    let server = store.serve(&["--header-timeout", "1", "--body-timeout", "1"]);
    // Headers begun and never finished; nothing at all; a body that stalls.
    let mut half_headers = connect(&server);
    half_headers
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let mut silent = connect(&server);
    let mut stalled_body = connect(&server);
    stalled_body
        .write_all(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\n\
              Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\":",
        )
        .unwrap();
    // Each is closed well before this bound (10x the timeouts), where
    // today's server kept them all open.
    for (what, stream) in [
        ("half-sent headers", &mut half_headers),
        ("a silent connection", &mut silent),
        ("a stalled body", &mut stalled_body),
    ] {
        let (closed, sent) = closed_within(stream, Duration::from_secs(10));
        assert!(closed, "{what}: still open after 10 s (sent {sent:?})");
        // The stalled body is answered (the token is checked first, or the
        // body read fails) before the close; the others get no answer or a 408.
        assert!(
            !sent.starts_with("HTTP/1.1 5"),
            "{what}: a server error: {sent}"
        );
    }
    // A keep-alive connection that goes quiet after its answer closes too.
    let mut idle = connect(&server);
    idle.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let (closed, sent) = closed_within(&mut idle, Duration::from_secs(10));
    assert!(closed && sent.starts_with("HTTP/1.1 200"), "{sent}");
    drop(server);

    // The per-address cap: 40 connections that send nothing where 20 are
    // allowed (and the header timeout is long): 20 are held, 20 closed at once.
    let server = Store::sqlite("peraddress").serve(&[
        "--header-timeout",
        "60",
        "--max-connections-per-address",
        "20",
    ]);
    // The start-up health check's connection is closed by now.
    std::thread::sleep(Duration::from_millis(500));
    let mut streams: Vec<TcpStream> = (0..PARALLEL).map(|_| connect(&server)).collect();
    let closed = streams
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(1500)).0)
        .filter(|closed| *closed)
        .count();
    assert_eq!(
        closed,
        PARALLEL - 20,
        "connections closed where 20 may be open"
    );
    // Held ones are released when their clients leave; the address may connect again.
    drop(streams);
    let start = Instant::now();
    while ureq::get(&server.url("/api/v1/health")).call().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no connection after the others left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
