//! `motif discord register` against a stand-in for Discord's API on
//! 127.0.0.1 that records every request (nothing here reaches the internet).

use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use serde_json::Value;

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Value,
}

/// A stand-in answering every request with `status`: on 200, the command
/// list it was sent (as Discord answers a bulk overwrite).
struct StandIn {
    base: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

fn stand_in(status: u16) -> StandIn {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("binding a local port");
    let base = format!("http://{}/api/v10", server.server_addr().to_ip().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut body = String::new();
            std::io::Read::read_to_string(request.as_reader(), &mut body).unwrap();
            let authorization = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
                .map(|h| h.value.to_string());
            seen.lock().unwrap().push(Recorded {
                method: request.method().to_string(),
                path: request.url().to_string(),
                authorization,
                body: serde_json::from_str(&body).unwrap_or(Value::Null),
            });
            let answer = if status == 200 {
                body
            } else {
                r#"{"message": "401: Unauthorized", "code": 0}"#.to_string()
            };
            let header = "Content-Type: application/json"
                .parse::<tiny_http::Header>()
                .unwrap();
            let response = tiny_http::Response::from_string(answer)
                .with_status_code(status)
                .with_header(header);
            let _ = request.respond(response);
        }
    });
    StandIn { base, requests }
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
