//! The slash commands Motif's Discord app offers, and `motif discord
//! register`: one bulk overwrite (PUT) of the application's commands, global
//! or for one guild, which Discord treats as idempotent (the same list twice
//! changes nothing).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Discord's REST API, version 10.
pub const DEFAULT_API_BASE: &str = "https://discord.com/api/v10";

/// Discord allows at most 25 choices per option.
const MAX_CHOICES: usize = 25;

/// Option types (developer documentation, "Application Commands").
const STRING: u8 = 3;
const INTEGER: u8 = 4;
const NUMBER: u8 = 10;
const ATTACHMENT: u8 = 11;

pub const ASPECTS: [&str; 4] = ["16:9", "9:16", "1:1", "4:5"];

fn choices(names: &[String]) -> Value {
    names
        .iter()
        .take(MAX_CHOICES)
        .map(|n| json!({ "name": n, "value": n }))
        .collect()
}

fn option(kind: u8, name: &str, description: &str, required: bool) -> Value {
    json!({ "type": kind, "name": name, "description": description, "required": required })
}

fn with(mut v: Value, field: &str, value: Value) -> Value {
    v[field] = value;
    v
}

/// The recipe options shared by /create and /remix (the prompt aside).
fn recipe_options(styles: &[String], cameras: &[String]) -> Vec<Value> {
    let aspects: Vec<String> = ASPECTS.iter().map(|a| a.to_string()).collect();
    vec![
        option(STRING, "negative", "what to keep out of the clip", false),
        with(
            option(STRING, "style", "a style preset", false),
            "choices",
            choices(styles),
        ),
        with(
            option(STRING, "camera", "a camera move", false),
            "choices",
            choices(cameras),
        ),
        with(
            with(
                option(NUMBER, "motion", "how much things move, 0 to 4", false),
                "min_value",
                json!(0),
            ),
            "max_value",
            json!(4),
        ),
        with(
            option(STRING, "aspect", "the clip's shape", false),
            "choices",
            choices(&aspects),
        ),
        with(
            option(INTEGER, "seed", "the same seed gives the same clip", false),
            "min_value",
            json!(0),
        ),
        with(
            with(
                option(INTEGER, "frames", "length of the clip in frames", false),
                "min_value",
                json!(1),
            ),
            "max_value",
            json!(64),
        ),
    ]
}

/// The command list: /create, /animate and /remix, with the server's style
/// presets and camera moves as choices.
pub fn definitions(styles: &[String], cameras: &[String]) -> Value {
    let mut create = vec![with(
        option(STRING, "prompt", "what the clip shows", true),
        "max_length",
        json!(1000),
    )];
    create.extend(recipe_options(styles, cameras));

    let mut animate = vec![
        option(
            ATTACHMENT,
            "image",
            "the still to animate (PNG, JPEG or WebP)",
            true,
        ),
        option(STRING, "prompt", "what happens in the clip", false),
    ];
    animate.extend(
        recipe_options(styles, cameras)
            .into_iter()
            .filter(|o| matches!(o["name"].as_str(), Some("camera" | "motion"))),
    );
    animate.push(with(
        with(
            option(
                NUMBER,
                "strength",
                "how far the frames may move from the still",
                false,
            ),
            "min_value",
            json!(0.05),
        ),
        "max_value",
        json!(1),
    ));

    let mut remix = vec![
        option(
            STRING,
            "clip",
            "a gallery clip: its id or its page's URL",
            true,
        ),
        option(STRING, "prompt", "a new prompt (else the clip's)", false),
    ];
    remix.extend(recipe_options(styles, cameras));

    json!([
        { "name": "create", "type": 1, "description": "Make a short clip from a prompt", "options": create },
        { "name": "animate", "type": 1, "description": "Animate a still image", "options": animate },
        { "name": "remix", "type": 1, "description": "Make a new clip from a gallery clip's recipe", "options": remix },
    ])
}

/// Where the commands went and how many Discord now lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub url: String,
    pub commands: usize,
}

/// Overwrites the application's commands (global, or one guild's, which
/// update at once where global ones may take a while) with `commands`.
pub async fn register(
    client: &reqwest::Client,
    api_base: &str,
    application_id: &str,
    bot_token: &str,
    guild: Option<&str>,
    commands: &Value,
) -> Result<Registration> {
    let base = api_base.trim_end_matches('/');
    let url = match guild {
        Some(g) => format!("{base}/applications/{application_id}/guilds/{g}/commands"),
        None => format!("{base}/applications/{application_id}/commands"),
    };
    let response = client
        .put(&url)
        .header("Authorization", format!("Bot {bot_token}"))
        .json(commands)
        .send()
        .await
        .with_context(|| format!("PUT {url}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        let hint = match status.as_u16() {
            401 => " (check MOTIF_DISCORD_BOT_TOKEN)",
            403 | 404 => " (check MOTIF_DISCORD_APPLICATION_ID, and that the bot is in the guild)",
            _ => "",
        };
        bail!(
            "PUT {url}: Discord answered {status}{hint}: {}",
            body.chars().take(500).collect::<String>()
        );
    }
    let listed: Value = serde_json::from_str(&body)
        .with_context(|| format!("PUT {url}: Discord's answer is not JSON"))?;
    let commands = listed
        .as_array()
        .map(Vec::len)
        .with_context(|| format!("PUT {url}: Discord's answer is not a list of commands"))?;
    Ok(Registration { url, commands })
}

/// [`register`] from synchronous code (`motif discord register`).
pub fn register_blocking(
    api_base: &str,
    application_id: &str,
    bot_token: &str,
    guild: Option<&str>,
    commands: &Value,
) -> Result<Registration> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client = reqwest::Client::builder()
        .user_agent(concat!(
            "DiscordBot (https://github.com/motif, ",
            env!("CARGO_PKG_VERSION"),
            ")"
        ))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    runtime.block_on(register(
        &client,
        api_base,
        application_id,
        bot_token,
        guild,
        commands,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_follow_discords_limits() {
        let styles: Vec<String> = (0..30).map(|i| format!("style-{i}")).collect();
        let cameras = vec!["zoom-in".to_string(), "pan-left".to_string()];
        let defs = definitions(&styles, &cameras);
        let list = defs.as_array().unwrap();
        assert_eq!(
            list.iter()
                .map(|c| c["name"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["create", "animate", "remix"]
        );
        for c in list {
            let options = c["options"].as_array().unwrap();
            assert!(options.len() <= 25);
            // Required options come first, as Discord demands.
            let first_optional = options.iter().position(|o| o["required"] == false).unwrap();
            assert!(
                options[first_optional..]
                    .iter()
                    .all(|o| o["required"] == false),
                "{}",
                c["name"]
            );
            for o in options {
                let name = o["name"].as_str().unwrap();
                assert!(
                    name.len() <= 32 && name.chars().all(|ch| ch.is_ascii_lowercase()),
                    "{name}"
                );
                assert!(!o["description"].as_str().unwrap().is_empty());
                if let Some(choices) = o["choices"].as_array() {
                    assert!(choices.len() <= 25, "{name}");
                }
            }
        }
        let create = &list[0]["options"];
        assert_eq!(create[0]["name"], "prompt");
        assert_eq!(create[0]["required"], true);
        let camera = create
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "camera")
            .unwrap();
        assert_eq!(camera["choices"][1]["value"], "pan-left");
        let animate = list[1]["options"].as_array().unwrap();
        assert_eq!(animate[0]["type"], 11);
        assert!(animate.iter().any(|o| o["name"] == "strength"));
        assert!(!animate.iter().any(|o| o["name"] == "style"));
    }
}
